"""Decoder benchmark: registry_xf against HF transformers on a ~100M-parameter Llama shape.

Writes a randomly initialised Llama-shaped checkpoint, then measures, on the same inputs:
load time and peak memory (each in a fresh process, from after the imports to the first
logits), and greedy decoding speed (tokens/s) at batch 1 and batch 8, ours
(``registry_xf.Generator``, eager and with ``compile=True``; on a CUDA device also with
``cuda_graphs=True``, eager and compiled) against HF ``generate``, same dtype on both
sides (the time to compile is reported apart, not counted). Batch 1 is bound by memory
bandwidth (every weight but the input embedding table is read once per token), so the
script also measures the machine's matrix-vector read bandwidth and prints the bound it
implies.

    python bench/bench_decoder.py            # full run
    python bench/bench_decoder.py --quick    # smoke run (small model, few tokens)
    python bench/bench_decoder.py --device cuda --dtype bfloat16 --bound-only --size 1b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

LOAD_SCRIPT = r"""
import sys, time, json
import torch
side, path, dtype, device = sys.argv[1:5]
torch.set_grad_enabled(False)
if side == "ours":
    import registry_xf
else:
    import transformers
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
ids = torch.randint(0, 1000, (1, 16), device=device)
start = time.perf_counter()
if side == "ours":
    model = registry_xf.load(path, device=device, dtype=dtype)
    logits = model(ids).logits
else:
    where = {"device_map": device} if device != "cpu" else {}  # HF's own straight-to-GPU
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), **where
    )
    logits = model(ids).logits
float(logits[0, -1, 0])
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_bytes": rss("VmHWM:") - base}))
"""


# Llama shapes: (width, intermediate width, layers, heads, key/value heads). "1b" is
# TinyLlama-1.1B's.
SIZES = {
    "quick": (256, 688, 2, 4, 2),
    "100m": (768, 2048, 12, 12, 4),
    "1b": (2048, 5632, 22, 32, 4),
}


def write_checkpoint(
    path: Path, size: str, dtype: torch.dtype, device: str = "cpu"
) -> tuple[int, int]:
    """Write the checkpoint; return its weight bytes and the bytes one decode step reads
    (every weight but the input embedding table, of which a step reads one row). The
    random weights are drawn on ``device`` (a 1B model's take minutes on a CPU)."""
    import transformers as tf

    torch.manual_seed(0)
    width, intermediate, layers, heads, kv_heads = SIZES[size]
    config = tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.get_input_embeddings().weight
    return total, total - table.numel() * table.element_size()


def load_in_fresh_process(side: str, path: Path, dtype: str, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, side, str(path), dtype, device],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"loading with {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Bytes per second a matrix-vector product reads (the decode-step access pattern)."""
    n = 8192
    matrix = torch.randn(n, n, device=device).to(dtype)
    vector = torch.randn(n, device=device).to(dtype)
    for _ in range(3):
        torch.mv(matrix, vector)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / min(times)


def decode(side: str, model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list]:
    """Greedy decoding; ``model`` is a registry_xf Generator for our sides, else HF's model."""
    start = time.perf_counter()
    if side.startswith("ours"):
        out = model.generate_ids(prompts.tolist(), max_new_tokens=new_tokens, eos_token_ids=[])
    else:
        generated = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        out = generated[:, prompts.shape[1] :].tolist()
    if prompts.device.type != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def leading_agreement(got: list[list[int]], expected: list[list[int]]) -> int:
    """How many new tokens, from the first, equal the reference's in every row. In float32
    that is all of them; in bfloat16 a random model's near-tied logits round differently
    in the two implementations sooner or later, and the sequences part there."""
    agreed = []
    for row, ref in zip(got, expected, strict=True):
        n = 0
        while n < min(len(row), len(ref)) and row[n] == ref[n]:
            n += 1
        agreed.append(n)
    return min(agreed)


def bound_only(path: Path, args: argparse.Namespace, new_tokens: int, step_bytes: int) -> None:
    """Batch 1, our two generators alone (no reference model in the process): each run's
    share of the bound, with the bandwidth measured just before it."""
    import registry_xf

    dtype = getattr(torch, args.dtype)
    model = registry_xf.load(path, device=args.device, dtype=args.dtype)
    sides = our_sides(model, args)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (1, args.prompt_tokens), generator=g).to(args.device)
    for side, generator in sides.items():  # warm-up: compiles, and records the graphs
        decode(side, generator, prompts, warm_up_tokens(side, new_tokens))
    shares: dict[str, list[float]] = {side: [] for side in sides}
    outputs: dict[str, list] = {}
    for _ in range(args.runs):
        bound = read_bandwidth(args.device, dtype) / step_bytes
        for side, generator in sides.items():
            seconds, outputs[side] = decode(side, generator, prompts, new_tokens)
            shares[side].append(new_tokens / seconds / bound)
        last = ", ".join(f"{side} {values[-1]:.0%}" for side, values in shares.items())
        print(f"bound {bound:.1f} tok/s: {last}")
    print(
        "median share of the bound: "
        + ", ".join(f"{s} {statistics.median(v):.0%}" for s, v in shares.items())
    )
    agreement = {s: leading_agreement(o, outputs["ours"]) for s, o in outputs.items()}
    print(
        f"new tokens equal to eager's (from the first, of {new_tokens}): "
        + ", ".join(f"{s} {n}" for s, n in agreement.items())
    )
    if args.json:
        medians = {s: statistics.median(v) for s, v in shares.items()}
        Path(args.json).write_text(
            json.dumps({"share_of_bound_batch1": medians, "tokens_equal_to_eager": agreement})
        )


def warm_up_tokens(side: str, new_tokens: int) -> int:
    """New tokens of a side's warm-up: a few, but as many as the timed runs for a side
    that records CUDA graphs (a step is recorded per cache length, in blocks)."""
    return new_tokens if "graphs" in side else 4


# Our generators: eager, compiled, and (CUDA only) recorded in CUDA graphs.
OUR_SIDES = {
    "ours": {},
    "ours_compiled": {"compile": True},
    "ours_graphs": {"cuda_graphs": True},
    "ours_compiled_graphs": {"compile": True, "cuda_graphs": True},
}


def our_sides(model, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """The generators of our sides that the options leave in ("ours", eager, always)."""
    import registry_xf

    names = args.sides or list(OUR_SIDES)
    if args.no_compile:
        names = [n for n in names if "compiled" not in n]
    if args.no_graphs or not args.device.startswith("cuda"):
        names = [n for n in names if "graphs" not in n]
    names = ["ours", *(n for n in names if n != "ours")]
    return {n: registry_xf.Generator(model, **OUR_SIDES[n]) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--bound-only",
        action="store_true",
        help="only batch 1's share of the bound, ours alone (no HF model in the process)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the compiled sides (compiling takes minutes on some machines)",
    )
    parser.add_argument(
        "--no-graphs", action="store_true", help="leave out the CUDA-graph sides (CUDA only)"
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="100m", help="the Llama shape (--quick: quick)"
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=list(OUR_SIDES),
        help="our sides to run (default: all that the device and options allow)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = 16 if args.quick else args.new_tokens
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)

    import transformers as tf

    import registry_xf

    results: dict = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        size = "quick" if args.quick else args.size
        model_bytes, step_bytes = write_checkpoint(path, size, dtype, args.device)
        results["model_bytes"] = model_bytes
        results["bytes_read_per_step"] = step_bytes
        print(
            f"model: {model_bytes / 1e6:.0f} MB of {args.dtype} weights, device {args.device}, "
            f"{torch.get_num_threads()} threads"
        )
        if args.bound_only:
            bound_only(path, args, new_tokens, step_bytes)
            return

        loads = {side: [] for side in ("ours", "hf")}
        for _ in range(args.runs):
            for side in loads:
                loads[side].append(load_in_fresh_process(side, path, args.dtype, args.device))
        for side, runs in loads.items():
            results[f"load_s_{side}"] = statistics.median(r["seconds"] for r in runs)
            results[f"peak_bytes_{side}"] = statistics.median(r["peak_bytes"] for r in runs)

        ours = registry_xf.load(path, device=args.device, dtype=args.dtype)
        hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        sides = {**our_sides(ours, args), "hf": hf}
        ours_sides = [side for side in sides if side != "hf"]
        g = torch.Generator().manual_seed(0)
        bandwidths: list[float] = []
        shares: dict[str, list[float]] = {}
        for batch in (1, 8):
            prompts = torch.randint(3, 32000, (batch, args.prompt_tokens), generator=g)
            prompts = prompts.to(args.device)
            times: dict[str, list[float]] = {side: [] for side in sides}
            outputs = {}
            for side, model in sides.items():  # warm-up: compiles, and records the graphs
                seconds, _ = decode(side, model, prompts, warm_up_tokens(side, new_tokens))
                if side == "ours_compiled":
                    results[f"compile_s_batch{batch}"] = seconds
            for _ in range(args.runs):
                if batch == 1:  # the bound of this run: the bandwidth measured just before
                    bandwidths.append(read_bandwidth(args.device, dtype))
                for side, model in sides.items():
                    seconds, outputs[side] = decode(side, model, prompts, new_tokens)
                    times[side].append(seconds)
            if batch == 1:
                shares = {
                    side: [
                        new_tokens / seconds / (bw / step_bytes)
                        for seconds, bw in zip(times[side], bandwidths, strict=True)
                    ]
                    for side in ours_sides
                }
            for side in times:
                results[f"tokens_s_batch{batch}_{side}"] = (
                    batch * new_tokens / statistics.median(times[side])
                )
            results[f"tokens_equal_to_hf_batch{batch}"] = {
                side: leading_agreement(outputs[side], outputs["hf"]) for side in ours_sides
            }

    def row(name: str, ours_value: float, hf_value: float, unit: str, target: str) -> None:
        print(
            f"{name:34} {ours_value:10.3f} {hf_value:10.3f} {unit:8} "
            f"{ours_value / hf_value:6.2f}x  {target}"
        )

    print(f"\n{'':34} {'ours':>10} {'HF':>10} {'':8} {'ratio':>7}")
    row("load to first logits", results["load_s_ours"], results["load_s_hf"], "s", "")
    row(
        "peak memory beyond baseline",
        results["peak_bytes_ours"] / 1e6,
        results["peak_bytes_hf"] / 1e6,
        "MB",
        f"(weights: {model_bytes / 1e6:.0f} MB)",
    )
    labels = {
        "ours": "",
        "ours_compiled": ", compiled",
        "ours_graphs": ", CUDA graphs",
        "ours_compiled_graphs": ", compiled + graphs",
    }
    for batch, target in ((1, ""), (8, "target >= 1.5x")):
        for side in ours_sides:
            label = labels[side]
            row(
                f"greedy decode, batch {batch}{label}",
                results[f"tokens_s_batch{batch}_{side}"],
                results[f"tokens_s_batch{batch}_hf"],
                "tok/s",
                target,
            )
    if "ours_compiled" in sides:
        print(
            "time to compile (first call, 4 tokens): "
            + ", ".join(f"batch {b}: {results[f'compile_s_batch{b}']:.0f} s" for b in (1, 8))
        )
    bandwidth = statistics.median(bandwidths)
    bound = bandwidth / step_bytes
    results["read_bandwidth_gb_s"] = [b / 1e9 for b in bandwidths]
    results["bound_tokens_s_batch1"] = bound
    results["share_of_bound_batch1"] = shares
    print(
        f"\nmatrix-vector read bandwidth {bandwidth / 1e9:.1f} GB/s (median; measured before each "
        f"batch-1 run: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}), "
        f"{step_bytes / 1e6:.0f} MB read per step -> batch-1 bound {bound:.1f} tok/s. Share "
        "of it (median over runs of each run's share; target >= 90%): "
        + ", ".join(f"{side} {statistics.median(shares[side]):.0%}" for side in ours_sides)
    )
    print(
        f"new tokens equal to HF's (from the first, fewest over the batch, of {new_tokens}): "
        + "; ".join(
            f"batch {b}: "
            + ", ".join(f"{s} {n}" for s, n in results[f"tokens_equal_to_hf_batch{b}"].items())
            for b in (1, 8)
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
