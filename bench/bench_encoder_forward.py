"""Encoder forward throughput, registry_xf against HF transformers, per model shape.

For each shape in ``SHAPES`` (an HF config of a base-sized encoder): a random model is made
from the config, written with ``save_pretrained`` into a temporary directory, and loaded
by both libraries (``registry_xf.load``; the HF ``AutoModel`` with its default attention
for the class), on the CPU in float32. Both encode the same batches (default 32x128 of
random ids): one with a full attention mask, one right-padded (random lengths from 32 to
128, the first row full). Tokens/s counts the real (unmasked) tokens; each figure is the
median of ``--runs`` timed runs after a warm-up, the two sides alternating run by run so
that machine noise falls on both. Ratios are ours / HF.

    python bench/bench_encoder_forward.py                      # every shape
    python bench/bench_encoder_forward.py --family modernbert-base --threads 2
    python bench/bench_encoder_forward.py --family deberta-v3-base
    python bench/bench_encoder_forward.py --also hyper.unpad=true   # a second setting of ours

A shape is an entry of ``SHAPES``: a name and a function returning an HF
``PretrainedConfig``; nothing else here is specific to a family.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers (or anything that imports huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_encoder import alternate, load_average  # noqa: E402  (bench/ is on sys.path)
from transformers import PretrainedConfig  # noqa: E402

logger = logging.getLogger("bench_encoder_forward")

TARGET = 1.2  # ours / HF tokens/s, with a full mask and right-padded


def deberta_v3_base() -> PretrainedConfig:
    """microsoft/deberta-v3-base's shape."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        pad_token_id=0,
    )


def modernbert_base() -> PretrainedConfig:
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=50368,
        hidden_size=768,
        num_hidden_layers=22,
        num_attention_heads=12,
        intermediate_size=1152,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        max_position_embeddings=8192,
    )


SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    "deberta-v3-base": deberta_v3_base,
    "modernbert-base": modernbert_base,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family",
        action="append",
        choices=sorted(SHAPES),
        help="a shape to measure (repeatable; default: all)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads(N) (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=10, help="timed runs per side after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a config override for ours, e.g. hyper.attention_backend='\"eager\"' (repeatable)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a third side: ours with this override too (e.g. hyper.unpad=true), measured "
        "in the same rounds (repeatable: all apply to that one side)",
    )
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    args = p.parse_args(argv)
    args.family = args.family or sorted(SHAPES)
    return args


def make_inputs(vocab: int, batch: int, seq: int, padded: bool, seed: int) -> dict[str, Any]:
    """Random ids (away from the special ids at both ends of most vocabularies)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab - 300, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        lengths = torch.randint(min(32, seq), seq + 1, (batch,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def bench_shape(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    import transformers

    import registry_xf

    config = SHAPES[name]()
    overrides = parsed_overrides(args.override)
    also = {**overrides, **parsed_overrides(args.also)} if args.also else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        transformers.AutoModel.from_config(config).save_pretrained(tmp)
        ours = registry_xf.load(tmp, device="cpu", dtype=torch.float32, overrides=overrides)
        alt = (
            registry_xf.load(tmp, device="cpu", dtype=torch.float32, overrides=also)
            if also
            else None
        )
        hf = transformers.AutoModel.from_pretrained(tmp, dtype=torch.float32).eval()
        attention = hf.config._attn_implementation
        for padded in (False, True):
            inputs = make_inputs(config.vocab_size, args.batch, args.seq, padded, args.seed)
            real_tokens = int(inputs["attention_mask"].sum())
            keep = inputs["attention_mask"].bool()

            @torch.inference_mode()
            def run_ours(inputs: dict[str, Any] = inputs) -> torch.Tensor:
                return ours(**inputs).last_hidden_state

            @torch.inference_mode()
            def run_hf(inputs: dict[str, Any] = inputs) -> torch.Tensor:
                return hf(**inputs).last_hidden_state

            sides = {"ours": run_ours, "hf": run_hf}
            if alt is not None:

                @torch.inference_mode()
                def run_alt(inputs: dict[str, Any] = inputs) -> torch.Tensor:
                    return alt(**inputs).last_hidden_state

                sides["also"] = run_alt
            expected = run_hf()
            diff = max(float((run() - expected)[keep].abs().max()) for run in sides.values())
            times = alternate(sides, args.runs)
            row: dict[str, Any] = {
                "shape": name,
                "batch": "right-padded" if padded else "full mask",
                "size": [args.batch, args.seq],
                "real_tokens": real_tokens,
                "hf_attention": attention,
                "max_abs_diff": diff,
            }
            for side, seconds in times.items():
                row[side] = {
                    "median_s": statistics.median(seconds),
                    "min_s": min(seconds),
                    "max_s": max(seconds),
                    "tokens_per_s": real_tokens / statistics.median(seconds),
                }
            row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            if alt is not None:
                row["also_overrides"] = args.also
                row["also_ratio"] = row["also"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            results.append(row)
            logger.info("%s", "\n".join(report([row]).splitlines()[1:]))
    return results


def parsed_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` arguments as config overrides (a bare word is read as a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'shape':18} {'batch':13} {'ours tok/s [range]':>28} {'HF tok/s [range]':>28} "
        f"{'ratio':>6}  target",
    ]

    def rate(side: dict[str, Any], tokens: int) -> str:
        low, high = tokens / side["max_s"], tokens / side["min_s"]
        return f"{side['tokens_per_s']:9.0f} [{low:7.0f}-{high:7.0f}]"

    for row in rows:
        ok = "ok" if row["ratio"] >= TARGET else "MISSED"
        lines.append(
            f"{row['shape']:18} {row['batch']:13} {rate(row['ours'], row['real_tokens']):>28} "
            f"{rate(row['hf'], row['real_tokens']):>28} {row['ratio']:6.2f}x  "
            f">= {TARGET}x {ok}   (HF attention {row['hf_attention']}, "
            f"max |diff| {row['max_abs_diff']:.1e})"
        )
        if "also" in row:
            lines.append(
                f"{'  + ' + ' '.join(row['also_overrides']):32} "
                f"{rate(row['also'], row['real_tokens']):>28} {'':>28} "
                f"{row['also_ratio']:6.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import torch
    import transformers

    import registry_xf

    torch.set_num_threads(args.threads)
    logger.info(
        "torch %s, transformers %s, registry_xf %s; %d threads; %dx%d fp32 CPU; %d runs; "
        "load average before: %s",
        torch.__version__,
        transformers.__version__,
        registry_xf.__version__,
        args.threads,
        args.batch,
        args.seq,
        args.runs,
        load_average(),
    )
    rows = []
    for name in args.family:
        rows += bench_shape(name, args)
    logger.info("%s\nload average after: %s", report(rows), load_average())
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
