"""One rank of the tensor-parallel tests: runs every check in one process group and
writes what it found as JSON (the test process compares the ranks and asserts)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

GENERATED = 32


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of every distinct storage the model's parameters live in."""
    storages = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def owns_its_bytes(model: torch.nn.Module) -> bool:
    """No parameter is a view into a bigger storage (a whole file's memory map)."""
    return all(
        p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters()
    )


def inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def compare(path: str, mesh: Any, causal: bool) -> dict[str, Any]:
    import registry_xf as rx

    whole = rx.load(path)
    sharded = rx.load(path, device_mesh=mesh)
    found: dict[str, Any] = {
        "bytes_ratio": weight_bytes(sharded) / weight_bytes(whole),
        "owns_its_bytes": owns_its_bytes(sharded),
        "parallel": sharded.record.parallel is not None,
    }
    vocab = sharded.decoder.embeddings.vocab_size if causal else sharded.embeddings.vocab_size
    ids, mask = inputs(vocab)
    with torch.inference_mode():
        a = whole(ids, mask, output_hidden_states=True)
        b = sharded(ids, mask, output_hidden_states=True)
    real = mask.bool()
    found["hidden_diff"] = max(
        float((x - y)[real].abs().max())
        for x, y in zip(a.hidden_states, b.hidden_states, strict=True)
    )
    if not causal:
        return found
    found["logits_diff"] = float((a.logits - b.logits)[real].abs().max())
    prompts = [[3, 9, 27, 4], [5, 6]]
    greedy = {"max_new_tokens": GENERATED, "eos_token_ids": []}
    expected = rx.Generator(whole).generate_ids(prompts, **greedy)
    got = rx.Generator(sharded).generate_ids(prompts, **greedy)
    found["greedy_equal"] = expected == got
    found["greedy_lengths"] = [len(g) for g in got]
    sampled = {"max_new_tokens": 8, "eos_token_ids": [], "temperature": 1.0}
    found["sampled_seeded"] = rx.Generator(sharded).generate_ids(prompts, seed=3, **sampled)
    found["sampled_unseeded"] = rx.Generator(sharded).generate_ids(prompts, **sampled)
    found["cache_heads"] = [
        sharded.new_cache(1, 8).keys[0].shape[1],
        whole.new_cache(1, 8).keys[0].shape[1],
    ]
    return found


def config_plan(path: str, mesh: Any) -> dict[str, Any]:
    """A config whose [parallel] section names the plan with the vocabulary replicated."""
    import registry_xf as rx
    from registry_xf.parallel.sharded_layers import VocabShardedEmbedding

    config = rx.config_from_hf(path)
    config["parallel"] = {"@sharding": "registry_xf.TensorParallelPlan.v1", "vocab": "replicate"}
    whole = rx.load(path)
    sharded = rx.load(config, device_mesh=mesh)
    ids, mask = inputs(sharded.decoder.embeddings.vocab_size)
    with torch.inference_mode():
        diff = float((whole(ids, mask).logits - sharded(ids, mask).logits)[mask.bool()].abs().max())
    embedding = sharded.decoder.embeddings.word_embeddings
    return {
        "vocab_sharded": isinstance(embedding, VocabShardedEmbedding),
        "embedding_rows": embedding.weight.shape[0],
        "logits_diff": diff,
        "save": error_of(lambda: rx.save(sharded, Path(path).parent / "never-written")),
        "export": error_of(lambda: rx.export_hf(sharded, Path(path).parent / "never-exported")),
    }


def error_of(call: Any) -> dict[str, Any] | None:
    from registry_xf.errors import RegistryXFError

    try:
        call()
    except Exception as e:
        return {
            "type": type(e).__name__,
            "typed": isinstance(e, RegistryXFError),
            "message": str(e),
        }
    return None


def error_cases(paths: dict[str, str], mesh: Any, rank: int) -> dict[str, Any]:
    import registry_xf as rx

    llama = paths["llama"]
    return {
        "indivisible": error_of(lambda: rx.load(paths["odd"], device_mesh=mesh)),
        "disagree": error_of(
            lambda: rx.load(
                llama, device_mesh=mesh, overrides={"hyper.norm_eps": 1e-3} if rank else None
            )
        ),
        "mixed_devices": error_of(
            lambda: rx.load(llama, device_mesh=mesh, device="meta" if rank else "cpu")
        ),
        "missing_on_one_rank": error_of(
            lambda: rx.load(llama + ("-absent" if rank else ""), device_mesh=mesh)
        ),
        "not_a_mesh": error_of(lambda: rx.load(llama, device_mesh="cpu")),
    }


def cli_run(argv: list[str], rank: int, world: int) -> dict[str, Any]:
    """``registry-xf argv`` as torchrun would start it on this rank."""
    from registry_xf import cli

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return {"code": code, "stdout": out.getvalue()}


def cli_cases(paths: dict[str, str], rank: int, world: int) -> dict[str, Any]:
    generate = ["generate", "--model", paths["llama_text"], "hello", "--max-new-tokens", "12"]
    embed = ["embed", "--model", paths["bert"], "the cat sat", "hello world"]
    return {
        "generate": cli_run(generate, rank, world),
        "generate_alone": cli_run(generate, 0, 1),
        "embed": cli_run(embed, rank, world),
        "embed_alone": cli_run(embed, 0, 1),
    }


def run(rank: int, world: int, port: int, paths: dict[str, str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), REGISTRY_XF_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    try:
        results["bert"] = compare(paths["bert"], mesh, causal=False)
        for family in ("llama", "gpt_neox", "falcon"):
            results[family] = compare(paths[family], mesh, causal=True)
        results["config_plan"] = config_plan(paths["llama"], mesh)
        results["errors"] = error_cases(paths, mesh, rank)
        check = torch.ones(1)
        dist.all_reduce(check)  # the group still works after the errors
        results["group_after_errors"] = float(check)
        results["cli"] = cli_cases(paths, rank, world)
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if dist.is_initialized():
            dist.destroy_process_group()
