"""Per-call times of int8 linear layers' element-wise passes: the C++ kernel
(``registry_xf/layers/cpu_int8.cpp``) against the ``torch.compile``d loops, on
all-MiniLM-L6-v2's shapes (width 384, feed-forward 1536), in one process, on the same
inputs, alternating call by call.

Steps: quantise rows (384 and 1536 wide); dequantise the products (plain, + residual,
+ GELU); a whole feed-forward layer (up, GELU, down, + residual) by the kernel in one go
against the layers one by one with the compiled loops. ``--clock cpu`` (the default)
times the calling thread's CPU time, which on a busy machine leaves out the time other
work held the core; ``--clock wall`` the wall clock. The loops run on one thread, as they
do up to two torch threads.

    python bench/bench_cpu_int8.py                  # 16, 256 and 2048 rows
    python bench/bench_cpu_int8.py --rows 2048 --calls 200 --clock wall
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("bench_cpu_int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 256, 2048], help="tokens")
    p.add_argument("--calls", type=int, default=100, help="timed calls per step and side")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from registry_xf.layers import cpu_int8
    from registry_xf.layers import int8_linear as il
    from registry_xf.layers.feedforward import FeedForward

    torch.set_num_threads(1)
    lib = cpu_int8.library()
    if isinstance(lib, str):
        print(f"the kernel is unavailable here: {lib}")
        return 1
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    qkv, up = il.Int8Linear(torch.nn.Linear(384, 1152)), il.Int8Linear(torch.nn.Linear(384, 1536))
    block = FeedForward(384, 1536, torch.nn.GELU()).eval()
    il.quantize_int8(block)

    def compiled(fn: Callable) -> Callable:
        return lambda *a: il._Fused.run(fn, *a)

    def unfused_block(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        os.environ[cpu_int8.SWITCH] = "0"
        try:
            return block(x, residual)
        finally:
            os.environ[cpu_int8.SWITCH] = "1"

    def steps_for(rows: int) -> dict[str, tuple[Callable, Callable]]:
        """Each step's (kernel, compiled) calls on ``rows`` random tokens."""
        x = torch.randn(rows, 384)
        h = torch.nn.functional.gelu(torch.randn(rows, 1536))
        residual = torch.randn(rows, 384)
        q, scale, shift = il.quantize_rows_shifted(x)
        products = {n: torch._int_mm(q, layer.qweight) for n, layer in (("qkv", qkv), ("up", up))}
        down = block.down_proj
        hq, hs, hsh = il.quantize_rows_shifted(h)
        down_products = torch._int_mm(hq, down.qweight)
        cols = {n: layer._columns() for n, layer in (("qkv", qkv), ("up", up), ("down", down))}
        f32 = torch.float32
        return {
            "quantise 384": (
                lambda: cpu_int8.quantize_rows(lib, x),
                lambda: compiled(il.quantize_rows_shifted)(x),
            ),
            "quantise 1536": (
                lambda: cpu_int8.quantize_rows(lib, h),
                lambda: compiled(il.quantize_rows_shifted)(h),
            ),
            "dequantise 1152": (
                lambda: cpu_int8.dequantize(
                    lib, products["qkv"], scale, shift, *cols["qkv"], None, None
                ),
                lambda: compiled(il._dequantize)(
                    products["qkv"], scale, shift, *cols["qkv"], None, None, f32
                ),
            ),
            "dequantise 384 + residual": (
                lambda: cpu_int8.dequantize(
                    lib, down_products, hs, hsh, *cols["down"], residual, None
                ),
                lambda: compiled(il._dequantize_plus)(
                    down_products, hs, hsh, *cols["down"], residual, None, f32
                ),
            ),
            "dequantise 1536 + GELU": (
                lambda: cpu_int8.dequantize(
                    lib, products["up"], scale, shift, *cols["up"], None, "gelu"
                ),
                lambda: compiled(il._dequantize_activated)(
                    products["up"], scale, shift, *cols["up"], None, "gelu", f32
                ),
            ),
            "feed-forward layer": (
                lambda: block(x, residual),
                lambda: unfused_block(x, residual),
            ),
        }

    rows_out = []
    for rows in args.rows:
        steps = steps_for(rows)
        with torch.inference_mode():
            for name, (ours, theirs) in steps.items():
                for fn in (ours, theirs, ours, theirs):  # warm-up (and compiling)
                    fn()
                times: dict[str, list[float]] = {"kernel": [], "compiled": []}
                for _ in range(args.calls):
                    for side, fn in (("kernel", ours), ("compiled", theirs)):
                        start = clock()
                        fn()
                        times[side].append((clock() - start) * 1e6)
                k, c = (statistics.median(times[s]) for s in ("kernel", "compiled"))
                rows_out.append((rows, name, k, c))
                logger.info("%d rows, %s: kernel %.1f µs, compiled %.1f µs", rows, name, k, c)
    print(
        f"median µs per call ({args.clock} clock, {args.calls} calls per side, one thread); "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"{'rows':>6} {'step':<28} {'kernel':>10} {'compiled':>10} {'speed-up':>9}")
    for rows, name, k, c in rows_out:
        print(f"{rows:>6} {name:<28} {k:>10.1f} {c:>10.1f} {c / k:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
