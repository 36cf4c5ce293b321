"""Encoder forward throughput, registry_xf against transformers, per model shape.

For each shape in ``SHAPES`` (an HF config of a published model's size, random weights):
the model is written with ``save_pretrained`` to a temporary directory, loaded by
``registry_xf.load`` and by ``transformers.AutoModel.from_pretrained`` (the class's default
attention implementation), and both encode the same 32x128 batch of random token ids,
with a full attention mask and right-padded (random lengths 32..128), in float32 under
``torch.inference_mode``. The sides alternate run by run, so that machine noise falls on
both; each figure is the median of the timed runs after one warm-up, with the range.
Tokens/s counts real (unmasked) tokens. Target: ours/HF >= 1.2.

Run ``python bench/bench_encoder_forward.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers (or anything that imports huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import registry_xf as rx  # noqa: E402

logger = logging.getLogger("bench_encoder_forward")

TARGET = 1.2  # ours / HF tokens per second


def deberta_v3_base() -> tf.PretrainedConfig:
    """microsoft/deberta-v3-base's shape."""
    return tf.DebertaV2Config(
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


# name → the HF config of a model of that shape (random weights are made from it)
SHAPES: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "deberta-v3-base": deberta_v3_base,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family",
        action="append",
        choices=sorted(SHAPES),
        help="a shape to measure (repeatable; default: all)",
    )
    p.add_argument("--runs", type=int, default=7, help="timed runs per side after a warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads(N)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    p.add_argument("--quick", action="store_true", help="2 runs, batch 4 (a smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.batch = 2, 4
    args.family = args.family or sorted(SHAPES)
    return args


def inputs(
    config: tf.PretrainedConfig, batch: int, seq: int, padded: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random real token ids; right padding of random lengths when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    pad = getattr(config, "pad_token_id", None) or 0
    ids = torch.randint(pad + 1, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        lengths = torch.randint(min(32, seq), seq + 1, (batch,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def alternate(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """One warm-up each, then ``runs`` timed calls of each, interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = SHAPES[name]()
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tf.AutoModel.from_config(config).save_pretrained(tmp)
        hf = tf.AutoModel.from_pretrained(tmp).eval()
        ours = rx.load(tmp).eval()
    results: dict[str, Any] = {"hf_attention": hf.config._attn_implementation}
    for kind in ("full", "padded"):
        ids, mask = inputs(config, args.batch, args.seq, kind == "padded", args.seed)
        real = mask.bool()
        tokens = int(mask.sum())
        with torch.inference_mode():
            got = ours(ids, mask).last_hidden_state
            expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            difference = float((got[real] - expected[real]).abs().max())
            times = alternate(
                {
                    "ours": lambda ids=ids, mask=mask: ours(ids, mask),
                    "hf": lambda ids=ids, mask=mask: hf(input_ids=ids, attention_mask=mask),
                },
                args.runs,
            )
        row: dict[str, Any] = {"tokens": tokens, "max_abs_difference": difference}
        for side, seconds in times.items():
            row[side] = {
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "max_s": max(seconds),
                "tokens_per_s": tokens / statistics.median(seconds),
            }
        row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        results[kind] = row
    return results


def report(name: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{name}: forward {args.batch}x{args.seq}, fp32, {args.threads} threads, "
        + (f"{args.layers} layers, " if args.layers is not None else "")
        + f"HF attention {result['hf_attention']!r}, {args.runs} runs (median [min-max])"
    )
    print(f"  {'batch':<8}{'ours tok/s':>14}{'HF tok/s':>14}{'ours s':>26}{'HF s':>26}  ratio")
    for kind in ("full", "padded"):
        row = result[kind]
        cells = []
        for side in ("ours", "hf"):
            t = row[side]
            cells.append(f"{t['median_s']:.3f} [{t['min_s']:.3f}-{t['max_s']:.3f}]")
        verdict = "meets" if row["ratio"] >= TARGET else "BELOW"
        print(
            f"  {kind:<8}{row['ours']['tokens_per_s']:>14,.0f}{row['hf']['tokens_per_s']:>14,.0f}"
            f"{cells[0]:>26}{cells[1]:>26}  {row['ratio']:.2f}x ({verdict} {TARGET}x; "
            f"max |diff| {row['max_abs_difference']:.1e})"
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": tf.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    for name in args.family:
        results[name] = bench_shape(name, args)
        report(name, results[name], args)
    load = os.getloadavg()
    results["load_average"] = load
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
