"""The CUDA path of the decoders: weights loaded straight onto the GPU, parity with HF
there in float32, bfloat16 no further from float32 than HF's own bfloat16, and greedy
generation (eager and compiled) on the GPU. Skipped where there is no CUDA device.

The checkpoints are the decoder tests' own tiny random ones, one per layout variant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_decoders_a as a
import test_decoders_b as b
import torch
from conftest import assert_close_on_real_tokens, hf_logits, our_logits

import registry_xf as rx
from registry_xf.generation import Generator

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

VARIANTS = [*a.VARIANTS, *b.FAMILIES, "llama"]
WRITERS: dict[str, Callable[..., Path]] = {
    **{v: a.write_checkpoint for v in a.VARIANTS},
    **{f: b.write_checkpoint for f in [*b.FAMILIES, "llama"]},
}
# float32 on the GPU: the same arithmetic as the CPU's, in another order
GPU_ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda_decoders")
    return {v: WRITERS[v](root / v, v) for v in VARIANTS}


def hf_on_gpu(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return b.hf_lm(path, dtype=dtype).to("cuda")


def padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return b.left_padded_batch(seed, batch=4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_straight_onto_the_gpu(checkpoints: dict[str, Path], variant: str) -> None:
    model = rx.load(checkpoints[variant], device="cuda", dtype="bfloat16")
    assert model.load_report.ok
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {t.device.type for t in model.buffers()} <= {"cuda"}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_parity_on_the_gpu(
    checkpoints: dict[str, Path], variant: str, backend: str
) -> None:
    ours = rx.load(
        checkpoints[variant], device="cuda", overrides={"hyper.attention_backend": backend}
    )
    ref = hf_on_gpu(checkpoints[variant])
    for seed in range(2):
        ids, mask = (t.cuda() for t in padded_batch(seed))
        assert_close_on_real_tokens(
            our_logits(ours, ids, mask), hf_logits(ref, ids, mask), mask, atol=GPU_ATOL
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_is_as_close_as_hfs(checkpoints: dict[str, Path], variant: str) -> None:
    """Our bfloat16 logits are no further from the float32 ones than HF's bfloat16 are."""
    path = checkpoints[variant]
    ids, mask = padded_batch(7)
    real = mask.bool()
    exact = our_logits(rx.load(path), ids, mask)[real]
    ours = our_logits(rx.load(path, device="cuda", dtype="bfloat16"), ids.cuda(), mask.cuda())
    hf = hf_logits(hf_on_gpu(path, torch.bfloat16), ids.cuda(), mask.cuda())

    def error(logits: torch.Tensor) -> float:
        got = logits.float().cpu()[real]
        return float((got - exact).norm() / exact.norm())

    assert error(ours) < 3e-2
    assert error(ours) <= 1.5 * error(hf) + 2e-3, (error(ours), error(hf))


PROMPTS = [[1, 40, 50, 60, 70, 80, 90], [1, 11, 12], [1, 14, 41, 42, 43]]


def test_greedy_generation_on_the_gpu_matches_hf(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama"]
    ours = Generator(rx.load(path, device="cuda")).generate_ids(
        PROMPTS, max_new_tokens=32, eos_token_ids=[]
    )
    on_cpu = Generator(rx.load(path)).generate_ids(PROMPTS, max_new_tokens=32, eos_token_ids=[])
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS], device="cuda")
    hf = hf_on_gpu(path).generate(
        ids,
        attention_mask=mask,
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
    )
    assert ours == hf[:, width:].tolist()
    assert ours == on_cpu


def test_compiled_generation_on_the_gpu_gives_the_eager_tokens(
    checkpoints: dict[str, Path],
) -> None:
    pytest.importorskip("triton")
    import torch._dynamo

    model = rx.load(checkpoints["llama"], device="cuda")
    eager = Generator(model).generate_ids(PROMPTS, max_new_tokens=24, eos_token_ids=[])
    torch._dynamo.reset()
    try:
        compiled = Generator(model, compile=True)
        assert compiled.generate_ids(PROMPTS, max_new_tokens=24, eos_token_ids=[]) == eager
        shorter = compiled.generate_ids(PROMPTS[1:], max_new_tokens=10, eos_token_ids=[])
        assert shorter == [tokens[:10] for tokens in eager[1:]]
    finally:
        torch._dynamo.reset()


def test_bfloat16_generation_on_the_gpu(checkpoints: dict[str, Path]) -> None:
    """bfloat16 greedy decoding with the cache equals greedy decoding by full forwards."""
    model = rx.load(checkpoints["llama"], device="cuda", dtype="bfloat16")
    got = Generator(model).generate_ids(PROMPTS[:1], max_new_tokens=16, eos_token_ids=[])[0]
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(16):
            logits = model(torch.tensor([ids], device="cuda")).logits
            ids.append(int(logits[0, -1].argmax()))
    # rounding may break a near tie differently; the first tokens must agree
    assert got[:4] == ids[len(PROMPTS[0]) :][:4]
