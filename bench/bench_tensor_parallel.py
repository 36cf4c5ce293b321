"""Tensor-parallel decoding on the CPU: 2 processes (gloo, 1 thread each) against 1
process with 2 threads and with 1 thread, on the same Llama-shaped checkpoint.

Information only: on a CPU, two ranks share one machine's memory bandwidth and pay an
all-reduce per attention and feed-forward block per token, so this shows the cost of the
communication rather than a speed-up (which needs devices with memory of their own).
Each setting runs in fresh processes, the settings alternate round by round, and the
script prints each one's median decode tokens/s, its range, and the ratios.

    python bench/bench_tensor_parallel.py            # full run (~60M parameters)
    python bench/bench_tensor_parallel.py --quick    # smoke run (small model, few tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = [[1, *range(10, 25)]]  # 16 tokens, batch 1
SETTINGS = {
    "1 process, 1 thread": ("single", 1),
    "1 process, 2 threads": ("single", 2),
    "2 processes, 1 thread each": ("sharded", 1),
}


def write_checkpoint(path: Path, quick: bool) -> int:
    """A random Llama-shaped checkpoint; returns its parameter count."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=256 if quick else 512,
        intermediate_size=768 if quick else 1536,
        num_hidden_layers=2 if quick else 8,
        num_attention_heads=4 if quick else 8,
        num_key_value_heads=2 if quick else 4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def decode_rates(model: torch.nn.Module, tokens: int, repeats: int) -> list[float]:
    """Tokens/s of greedy decoding, ``repeats`` times after one warm-up."""
    import registry_xf

    generator = registry_xf.Generator(model)
    settings = {"max_new_tokens": tokens, "eos_token_ids": []}
    generator.generate_ids(PROMPT, **settings)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        generator.generate_ids(PROMPT, **settings)
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def _sharded_rank(rank: int, port: int, path: str, tokens: int, repeats: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import registry_xf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = registry_xf.load(path, device_mesh=init_device_mesh("cpu", (2,)))
    rates = decode_rates(model, tokens, repeats)
    if rank == 0:
        Path(out).write_text(json.dumps(rates))
    dist.destroy_process_group()


def run_setting(kind: str, threads: int, path: str, tokens: int, repeats: int) -> list[float]:
    """One setting's rates, measured in this (fresh) process."""
    if kind == "single":
        import registry_xf

        torch.set_num_threads(threads)
        return decode_rates(registry_xf.load(path), tokens, repeats)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rates.json")
        mp.spawn(_sharded_rank, args=(port, path, tokens, repeats, out), nprocs=2)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few tokens")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="generations per round")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (16 if args.quick else 64)
    if args.setting:
        kind, threads = SETTINGS[args.setting]
        print(json.dumps(run_setting(kind, threads, args.path, tokens, args.repeats)))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        n = write_checkpoint(path, args.quick)
        print(
            f"Llama-shaped checkpoint, {n / 1e6:.1f}M parameters, float32; batch 1, "
            f"{len(PROMPT[0])}-token prompt, {tokens} new tokens"
        )
        for round_ in range(rounds):
            for name in SETTINGS:
                print(f"round {round_ + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
                command = [sys.executable, __file__, "--setting", name, "--path", str(path)]
                command += ["--tokens", str(tokens), "--repeats", str(args.repeats)]
                found = subprocess.run(command, capture_output=True, text=True, check=True)
                rates[name] += json.loads(found.stdout.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])
    print(f"load average (1 min) while it ran: {min(loads):.2f} to {max(loads):.2f}\n")
    medians = {name: statistics.median(found) for name, found in rates.items()}
    print(f"{'setting':30} {'tokens/s (median)':>18} {'range':>18}")
    for name, found in rates.items():
        print(f"{name:30} {medians[name]:18.1f} {min(found):8.1f} to {max(found):6.1f}")
    sharded = medians["2 processes, 1 thread each"]
    for name in ("1 process, 1 thread", "1 process, 2 threads"):
        print(f"2 processes / {name}: {sharded / medians[name]:.2f}x")


if __name__ == "__main__":
    main()
