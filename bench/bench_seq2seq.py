"""Encoder-decoder benchmark: greedy generation with a T5-small-shaped model, registry_xf
against HF transformers' ``generate``.

Writes a randomly initialised checkpoint of T5-small's shape (d_model 512, 6 + 6 layers,
8 heads of 64, d_ff 2048, ReLU, 32,128 tokens, 32 relative buckets, tied head: about 60M
parameters), loads it on both sides, and times greedy generation of ``--new-tokens`` new
tokens per prompt at batch 1 and batch 8, in one process, the sides taking turns: ours
eager (``registry_xf.Generator``), ours compiled (``compile=True``; the time to compile is
reported apart, not counted) and HF ``generate``. Both sides are told the same minimum of
new tokens, so that every sequence runs to the end, and the tokens are checked equal.

    python bench/bench_seq2seq.py                    # full run, 2 threads
    python bench/bench_seq2seq.py --quick            # smoke run: 2 + 2 layers, 8 tokens
    python bench/bench_seq2seq.py --no-compile --runs 7 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_encoder import load_average  # noqa: E402  (bench/ is on sys.path)

VOCAB = 32128
EOS = 1


def write_checkpoint(path: Path, quick: bool) -> int:
    """Write the T5-small-shaped checkpoint; return its number of parameters."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=VOCAB,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=2 if quick else 6,
        num_decoder_layers=2 if quick else 6,
        num_heads=8,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=EOS,
    )
    model = tf.T5ForConditionalGeneration(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def generate(side: str, model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list]:
    """Greedy generation of exactly ``new_tokens`` per prompt: (seconds, new ids)."""
    start = time.perf_counter()
    if side.startswith("ours"):
        out = model.generate_ids(
            prompts.tolist(), max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
    else:
        generated = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
        )
        out = generated[:, 1:].tolist()  # after the decoder start token
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 + 2 layers and 8 new tokens")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side and batch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled side")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    new_tokens = 8 if args.quick else args.new_tokens

    import transformers as tf

    import registry_xf

    results: dict = {"threads": torch.get_num_threads(), "new_tokens": new_tokens, "loads": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t5-small-shaped"
        n_params = write_checkpoint(path, args.quick)
        ours = registry_xf.load(path)
        hf = tf.T5ForConditionalGeneration.from_pretrained(path).eval()
        sides: dict = {"ours": registry_xf.Generator(ours)}
        if not args.no_compile:
            sides["ours_compiled"] = registry_xf.Generator(ours, compile=True)
        sides["hf"] = hf
        print(
            f"T5-small shape, {n_params / 1e6:.1f}M parameters, float32, CPU, "
            f"{torch.get_num_threads()} threads, {new_tokens} new tokens, "
            f"{args.prompt_tokens}-token prompts"
        )
        g = torch.Generator().manual_seed(0)
        for batch in args.batches:
            prompts = torch.randint(3, VOCAB, (batch, args.prompt_tokens), generator=g)
            prompts[:, -1] = EOS
            times: dict[str, list[float]] = {side: [] for side in sides}
            outputs: dict[str, list] = {}
            for side, model in sides.items():  # warm-up; compiles the compiled side
                seconds, _ = generate(side, model, prompts, 4)
                if side == "ours_compiled":
                    results[f"compile_s_batch{batch}"] = seconds
            for run in range(args.runs):
                results["loads"].append(load_average())
                for side, model in sides.items():  # taking turns
                    seconds, outputs[side] = generate(side, model, prompts, new_tokens)
                    times[side].append(seconds)
                rates = ", ".join(f"{s} {batch * new_tokens / t[-1]:.1f}" for s, t in times.items())
                print(f"batch {batch}, run {run + 1}: tokens/s {rates}", flush=True)
            for side, out in outputs.items():
                if out != outputs["hf"]:
                    raise SystemExit(f"batch {batch}: {side}'s tokens differ from HF's")
                if any(len(row) != new_tokens for row in out):
                    raise SystemExit(f"batch {batch}: {side} stopped before {new_tokens} tokens")
            for side, values in times.items():
                rates = sorted(batch * new_tokens / s for s in values)
                results[f"tokens_s_batch{batch}_{side}"] = {
                    "median": statistics.median(rates),
                    "min": rates[0],
                    "max": rates[-1],
                }
            results[f"tokens_equal_batch{batch}"] = True

    print(f"\n{'tokens/s (median, range)':34} {'ours':>22} {'HF':>22} {'ratio':>7}")
    labels = {"ours": "eager", "ours_compiled": "compiled"}
    for batch in args.batches:
        theirs = results[f"tokens_s_batch{batch}_hf"]
        for side in (s for s in sides if s != "hf"):
            mine = results[f"tokens_s_batch{batch}_{side}"]
            ratio = mine["median"] / theirs["median"]
            results[f"ratio_batch{batch}_{side}"] = ratio
            print(
                f"{f'batch {batch}, {labels[side]}':34} "
                f"{mine['median']:7.1f} ({mine['min']:6.1f}-{mine['max']:6.1f}) "
                f"{theirs['median']:7.1f} ({theirs['min']:6.1f}-{theirs['max']:6.1f}) "
                f"{ratio:6.2f}x  (target >= 1.5x)"
            )
    if "ours_compiled" in sides:
        print(
            "time to compile (first call, 4 tokens): "
            + ", ".join(f"batch {b}: {results[f'compile_s_batch{b}']:.0f} s" for b in args.batches)
        )
    print("tokens equal to HF's: yes, every side and batch")
    print(f"load average during the runs: {', '.join(results['loads'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
