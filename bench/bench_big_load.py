"""Big-checkpoint load benchmark: registry_xf against HF transformers on a ~0.9B Llama.

Writes (once; reused when present) a ~0.9B-parameter Llama-shaped bfloat16 checkpoint in
HF's layout, in two shards, then loads it in fresh processes, alternating the sides:

- ours: ``registry_xf.load(dir, dtype="bfloat16")`` then one forward pass;
- HF: ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`` then one
  forward pass (with ``device_map`` on a GPU, HF's own way of loading straight onto it).

Each child measures from just after ``import torch`` to the first forward pass's output
(a 1x16 batch of token ids): the time with the library's import (``total``) and without
it (``load``), and its peak resident memory beyond the baseline after the imports (the
kernel's peak is reset there through ``/proc/self/clear_refs``), as a share of the
checkpoint files' size. Medians and ranges over ``--runs`` runs per side.

    python bench/bench_big_load.py                 # 5 runs per side, checkpoint in $TMPDIR
    python bench/bench_big_load.py --runs 3 --dir /data/big-llama --json results.json
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

TARGETS = {"load": 0.3, "peak": 1.05}  # ours / HF's time; our peak / the files' size

SHAPE = {  # 0.89B parameters, 1.77 GB of bfloat16
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

CHILD = r"""
import json, sys, time
import torch
start = time.perf_counter()
side, path, device = sys.argv[1:4]
extra = json.loads(sys.argv[4])
if side == "ours":
    import registry_xf
else:
    import transformers
imported = time.perf_counter()

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

try:  # reset the kernel's peak (VmHWM) to the current resident size
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS:")
torch.set_grad_enabled(False)
ids = torch.arange(100, 116, device=device)[None, :]
begin = time.perf_counter()
if side == "ours":
    model = registry_xf.load(path, device=device, dtype="bfloat16", **extra)
    logits = model(ids).logits
else:
    where = {"device_map": device} if device != "cpu" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, **where
    )
    logits = model(ids).logits
value = float(logits[0, -1, :8].float().sum())
end = time.perf_counter()
report = getattr(model, "load_report", None)
print(json.dumps({
    "load_s": end - begin,
    "total_s": end - start,
    "import_s": imported - start,
    "peak_bytes": status("VmHWM:") - base,
    "peak_reset": reset,
    "value": value,
    "report": None if report is None else str(report).splitlines()[-3:],
}))
"""


def write_checkpoint(path: Path) -> None:
    """A Llama of ``SHAPE`` in bfloat16, N(0, 0.02) weights, saved by transformers in two
    shards. Built on the meta device and filled tensor by tensor: no slow initialisation."""
    import torch
    import transformers as tf

    config = tf.LlamaConfig(**SHAPE, dtype="bfloat16")
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
        model.model.rotary_emb.__init__(config)  # the buffers to_empty left uninitialised
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial, max_shard_size="1GB")  # two shards
    partial.rename(path)


def files_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_child(side: str, path: Path, device: str, extra: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(path), device, json.dumps(extra)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"loading with {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "registry_xf-bench-llama-0.9b",
        help="where the checkpoint is written (reused when present)",
    )
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--ours",
        default="{}",
        help="extra keyword arguments of registry_xf.load, as JSON (e.g. '{\"pack\": true}')",
    )
    parser.add_argument("--only-ours", action="store_true", help="leave out HF's side")
    parser.add_argument("--json", type=Path, help="write every run's numbers to this file")
    args = parser.parse_args()

    if not (args.dir / "config.json").is_file():
        print(f"writing the checkpoint to {args.dir} ...", flush=True)
        start = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    size = files_size(args.dir)
    shards = len(list(args.dir.glob("*.safetensors")))
    print(f"checkpoint: {args.dir}, {shards} shards, {size / 1e9:.2f} GB; device {args.device}")
    extra = json.loads(args.ours)
    sides = ["ours"] if args.only_ours else ["ours", "hf"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.runs):
        for side in sides if i % 2 == 0 else sides[::-1]:
            result = run_child(side, args.dir, args.device, extra)
            runs[side].append(result)
            print(
                f"run {i + 1} {side:4}: load {result['load_s']:.3f} s, with import "
                f"{result['total_s']:.3f} s, peak {result['peak_bytes'] / size:.3f}x files",
                flush=True,
            )
    print(f"\nmedian (range) over {args.runs} runs per side")
    for side in sides:
        r = runs[side]
        print(
            f"{side:4}: load {spread([x['load_s'] for x in r])} s, with import "
            f"{spread([x['total_s'] for x in r])} s, peak beyond baseline "
            f"{spread([x['peak_bytes'] / size for x in r])}x the files"
        )
    results: dict = {"dir": str(args.dir), "files_bytes": size, "device": args.device, **runs}
    if "hf" in runs:
        # Ratios of run pairs taken side by side (run i of ours with run i of HF).
        pairs = list(zip(runs["ours"], runs["hf"], strict=True))
        load_ratios = [o["load_s"] / h["load_s"] for o, h in pairs]
        total_ratios = [o["total_s"] / h["total_s"] for o, h in pairs]
        median_ratio = statistics.median(r["load_s"] for r in runs["ours"]) / statistics.median(
            r["load_s"] for r in runs["hf"]
        )
        peak = statistics.median(r["peak_bytes"] / size for r in runs["ours"])
        print(
            f"\nours/HF load time: {median_ratio:.3f}x of the medians; per pair "
            f"{spread(load_ratios)} (target <= {TARGETS['load']}x: "
            f"{'met' if median_ratio <= TARGETS['load'] else 'NOT met'})"
        )
        print(f"ours/HF with the imports: per pair {spread(total_ratios)}")
        values = {side: {round(r["value"], 3) for r in runs[side]} for side in sides}
        print(f"sum of the first 8 logits of the last position: {values}")
        print(
            f"our peak beyond baseline: {peak:.3f}x the files (target <= {TARGETS['peak']}x: "
            f"{'met' if peak <= TARGETS['peak'] else 'NOT met'})"
        )
        results.update(load_ratio=median_ratio, load_ratios=load_ratios, peak_ratio=peak)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
