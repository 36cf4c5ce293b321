"""Tensor parallel models over 2 gloo processes on the CPU (loopback only).

Tiny random checkpoints written with transformers' ``save_pretrained``: BERT (an
encoder, a vocabulary the ranks do not divide: replicated), Llama (grouped-query
attention with one key/value head: replicated per rank), GPT-NeoX (partial rotary) and
Falcon (the new decoder architecture: heads grouped per key/value head in the files).
One process group (spawned once) runs every check; each rank reports, this process
compares: outputs equal the single-process model's, generation is identical, each rank
holds about half the weights, and bad cases fail with typed errors on every rank.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
TOLERANCE = 1e-5
DEADLINE_S = 300  # a hang fails the test instead of stalling the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save(model: Any, path: Path) -> str:
    """Random, not default, norms and biases: parity must hold for any values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name.lower() or "ln" in name.split(".")[-2]:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return str(path)


def _checkpoints(root: Path) -> dict[str, str]:
    import transformers as tf
    from test_generation import VOCAB as TEXT_VOCAB
    from test_generation import write_byte_level_tokenizer
    from tiny_tokenizer import write_tokenizer

    torch.manual_seed(0)
    decoder = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    paths = {
        "bert": _save(
            tf.BertModel(
                tf.BertConfig(
                    vocab_size=99,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=256,
                    max_position_embeddings=32,
                    type_vocab_size=2,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                )
            ),
            root / "bert",
        ),
        "llama": _save(
            tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, num_key_value_heads=1)), root / "llama"
        ),
        "gpt_neox": _save(
            tf.GPTNeoXForCausalLM(
                tf.GPTNeoXConfig(
                    **decoder,
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 500.0,
                        "partial_rotary_factor": 0.5,
                    },
                )
            ),
            root / "gpt_neox",
        ),
        "falcon": _save(
            tf.FalconForCausalLM(
                tf.FalconConfig(
                    **{k: v for k, v in decoder.items() if k != "intermediate_size"},
                    ffn_hidden_size=192,
                    new_decoder_architecture=True,
                    num_kv_heads=2,
                    bias=True,
                )
            ),
            root / "falcon",
        ),
        # 3 heads and 95 feed-forward columns: 2 ranks divide neither
        "odd": _save(
            tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    **{
                        **decoder,
                        "hidden_size": 48,
                        "num_attention_heads": 3,
                        "intermediate_size": 95,
                    },
                    num_key_value_heads=3,
                )
            ),
            root / "odd",
        ),
    }
    text = tf.LlamaConfig(**{**decoder, "vocab_size": TEXT_VOCAB}, num_key_value_heads=2)
    paths["llama_text"] = _save(tf.LlamaForCausalLM(text), root / "llama_text")
    write_byte_level_tokenizer(Path(paths["llama_text"]))
    write_tokenizer(Path(paths["bert"]))  # WordPiece over the 99 ids BERT has
    return paths


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's findings, from one spawned group of ``WORLD`` processes."""
    import torch.multiprocessing as mp
    from tensor_parallel_worker import run

    root = tmp_path_factory.mktemp("tensor_parallel")
    paths = _checkpoints(root)
    out = root / "results"
    out.mkdir()
    context = mp.start_processes(
        run,
        args=(WORLD, _free_port(), paths, str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the tensor-parallel processes did not finish in {DEADLINE_S} s")
    found = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(found):
        assert "crash" not in result, f"rank {rank}:\n{result['crash']}"
    return found


@pytest.mark.parametrize("family", ["bert", "llama", "gpt_neox", "falcon"])
def test_outputs_equal_the_whole_model(ranks: list[dict[str, Any]], family: str) -> None:
    for rank in ranks:
        assert rank[family]["parallel"]
        assert rank[family]["hidden_diff"] <= TOLERANCE
        if family != "bert":
            assert rank[family]["logits_diff"] <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "falcon"])
def test_greedy_generation_is_identical(ranks: list[dict[str, Any]], family: str) -> None:
    for rank in ranks:
        assert rank[family]["greedy_equal"]
        assert rank[family]["greedy_lengths"] == [32, 32]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "falcon"])
def test_ranks_sample_the_same_tokens(ranks: list[dict[str, Any]], family: str) -> None:
    """With a seed, and without one (rank 0's seed is shared): the ranks stay in step."""
    first, second = (r[family] for r in ranks)
    assert first["sampled_seeded"] == second["sampled_seeded"]
    assert first["sampled_unseeded"] == second["sampled_unseeded"]
    assert all(len(tokens) == 8 for tokens in first["sampled_unseeded"])


@pytest.mark.parametrize("family", ["bert", "llama", "gpt_neox", "falcon"])
def test_each_rank_holds_about_half_the_weights(ranks: list[dict[str, Any]], family: str) -> None:
    for rank in ranks:
        assert rank[family]["bytes_ratio"] <= 0.6
        assert rank[family]["owns_its_bytes"]  # slices read, not views of whole files


def test_the_cache_holds_this_ranks_heads(ranks: list[dict[str, Any]]) -> None:
    # Llama's one key/value head is replicated; Falcon's two are split
    assert [r["llama"]["cache_heads"] for r in ranks] == [[1, 1], [1, 1]]
    assert [r["falcon"]["cache_heads"] for r in ranks] == [[1, 2], [1, 2]]


def test_indivisible_sizes_fail_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        error = rank["errors"]["indivisible"]
        assert error["type"] == "TensorParallelError"
        assert "n_heads 3 is not divisible by 2 ranks" in error["message"]
        assert "intermediate width 95" in error["message"]
        assert "decoder.layers.0.attention" in error["message"]


def test_ranks_that_disagree_on_the_config_fail_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        error = rank["errors"]["disagree"]
        assert error["type"] == "TensorParallelError"
        assert "disagree on the config" in error["message"]


def test_a_mesh_on_mixed_devices_fails_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["errors"]["mixed_devices"] for r in ranks)
    assert second["type"] == "TensorParallelError" and "mesh's device type" in second["message"]
    assert first["type"] == "TensorParallelError" and "rank 1" in first["message"]


def test_a_failure_on_one_rank_reaches_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["errors"]["missing_on_one_rank"] for r in ranks)
    assert second["typed"] and "-absent" in second["message"]
    assert first["type"] == "TensorParallelError" and "-absent" in first["message"]


def test_a_bad_mesh_is_refused(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        error = rank["errors"]["not_a_mesh"]
        assert error["type"] == "TensorParallelError" and "DeviceMesh" in error["message"]
    assert [r["group_after_errors"] for r in ranks] == [2.0, 2.0]


@pytest.mark.parametrize("command", ["generate", "embed"])
def test_cli_under_torchrun_runs_sharded_and_rank_0_prints(
    ranks: list[dict[str, Any]], command: str
) -> None:
    first, second = (r["cli"][command] for r in ranks)
    assert first["code"] == second["code"] == 0
    assert first["stdout"].strip() and second["stdout"] == ""
    # the same output as one process (the printed precision hides float noise)
    assert first["stdout"] == ranks[0]["cli"][f"{command}_alone"]["stdout"]


def test_the_config_names_the_plan(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        found = rank["config_plan"]
        assert not found["vocab_sharded"] and found["embedding_rows"] == 128
        assert found["logits_diff"] <= TOLERANCE


def test_a_shard_is_not_saved_or_exported(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        for action in ("save", "export"):
            error = rank["config_plan"][action]
            assert error["typed"] and "tensor-parallel" in error["message"], action


# The plan on models built on meta, in this process: what it shards, and what it refuses.


def _meta_llama(**hyper: Any) -> Any:
    from importlib import resources

    import registry_xf as rx

    sizes = dict(hidden_width=64, n_layers=1, n_heads=4, n_kv_heads=2, head_width=16)
    sizes.update(intermediate_width=96, vocab_size=100, **hyper)
    llama = str(resources.files("registry_xf.configs") / "llama.cfg")
    return rx.build(llama, overrides={f"hyper.{k}": v for k, v in sizes.items()})


def _ranks(rank: int, size: int) -> Any:
    from registry_xf.parallel.ranks import Ranks

    # no process group: a model on meta is only resized, never run
    return Ranks(None, rank, size, torch.device("cpu"), "cpu")


def test_the_plan_keeps_the_same_heads_query_key_and_value_rows() -> None:
    from registry_xf.parallel.plan import TensorParallelPlan

    model = _meta_llama()
    layout = TensorParallelPlan().shard(model, _ranks(1, 2))
    attention = model.decoder.layers.applied()[0].attention
    shard = layout.shards[(attention.qkv_proj, "weight")]
    # rank 1: query heads 2-3 (rows 32-63), key head 1 (64 + 16-31), value head 1
    assert shard.runs == ((32, 64), (80, 96), (112, 128))
    assert (attention.n_heads, attention.n_kv_heads) == (2, 1)
    assert tuple(attention.qkv_proj.weight.shape) == (64, 64)
    down = model.decoder.layers.applied()[0].feed_forward.down_proj
    assert tuple(down.weight.shape) == (64, 48) and down.bias is None
    # a vocabulary of 100 splits in two; 99 would be replicated
    assert tuple(model.decoder.embeddings.word_embeddings.weight.shape) == (50, 64)
    assert model.lm_head.out_features == 100


class _Declared(torch.nn.Module):
    """A custom component that declares how it shards."""

    tensor_parallel_styles = {"fc_in": "column", "fc_out": "row"}

    def __init__(self) -> None:
        super().__init__()
        self.fc_in, self.fc_out = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)
        self.hidden = 6

    def shard_for_tensor_parallel(self, rank: int, size: int) -> None:
        self.hidden //= size


def test_a_custom_component_declares_how_it_shards() -> None:
    from registry_xf.parallel.plan import TensorParallelPlan

    with torch.device("meta"):
        model = torch.nn.Sequential(_Declared())
    TensorParallelPlan().shard(model, _ranks(0, 2))
    assert tuple(model[0].fc_in.weight.shape) == (3, 8)
    assert tuple(model[0].fc_out.weight.shape) == (8, 3)
    assert model[0].hidden == 3
    with torch.device("meta"):
        odd = torch.nn.Sequential(_Declared())
    problems = TensorParallelPlan().problems(odd, 4)
    assert problems == [
        "0.fc_in: width 6 is not divisible by 4 ranks",
        "0.fc_out: width 6 is not divisible by 4 ranks",
    ]


def test_the_plan_refuses_what_it_cannot_shard() -> None:
    from registry_xf.errors import TensorParallelError
    from registry_xf.parallel.plan import TensorParallelPlan

    model = _meta_llama(hidden_width=48, n_heads=6, n_kv_heads=3, head_width=8)
    with pytest.raises(TensorParallelError, match="n_kv_heads 3 neither divides"):
        TensorParallelPlan().shard(model, _ranks(0, 2))
