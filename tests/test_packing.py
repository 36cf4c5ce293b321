"""Prepacked CPU linear weights: same results, training untouched, never stale."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from pathlib import Path

import pytest
import torch
from conftest import random_batch

import registry_xf as rx
from registry_xf.layers import packed_linear
from registry_xf.layers.packed_linear import PackedLinear, _packing_available

pytestmark = pytest.mark.skipif(not _packing_available(), reason="oneDNN not available")


def _packed(model: torch.nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def test_pack_choice(checkpoints: dict[str, Path]) -> None:
    assert _packed(rx.load(checkpoints["bert"])) > 0  # small CPU model: automatic
    assert _packed(rx.load(checkpoints["bert"], pack=False)) == 0
    assert _packed(rx.load(checkpoints["bert"], dtype="float16", pack=True)) == 0  # not packable


def test_packed_outputs_match_plain(checkpoints: dict[str, Path]) -> None:
    packed = rx.load(checkpoints["bert"], pack=True)
    plain = rx.load(checkpoints["bert"], pack=False)
    ids, mask = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            packed(ids, mask).last_hidden_state,
            plain(ids, mask).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_training_uses_the_parameters(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"], pack=True).train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = random_batch()
    model(ids, mask).last_hidden_state.sum().backward()
    linear = model.layers[0].attention.qkv_proj
    assert isinstance(linear, PackedLinear) and linear.weight.grad is not None


def test_changed_weights_are_repacked(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"], pack=True)
    ids, mask = random_batch()
    with torch.no_grad():
        before = model(ids, mask).last_hidden_state
        model.layers[0].feed_forward.up_proj.weight.mul_(2.0)  # in place
        after = model(ids, mask).last_hidden_state
        reference = rx.load(checkpoints["bert"], pack=False)
        reference.layers[0].feed_forward.up_proj.weight.mul_(2.0)
        expected = reference(ids, mask).last_hidden_state
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_packed_model_pickles(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"], pack=True)
    again = pickle.loads(pickle.dumps(model))
    ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).last_hidden_state, again(ids, mask).last_hidden_state)


def _packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy kept on ``weight``, if one was made."""
    copy = weight.__dict__.get(packed_linear._COPY)
    return None if copy is None else copy.tensor


def test_packed_copies_live_as_long_as_their_weights() -> None:
    """One packed copy per weight (tied weights share it), freed with the model."""
    from registry_xf.layers.packed_linear import pack_linear_weights

    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 16)
    )
    model[2].weight = torch.nn.Parameter(model[1].weight.detach().t().contiguous())
    model.append(torch.nn.Linear(16, 8))
    model[3].weight = model[1].weight  # tied
    assert pack_linear_weights(model) == 4
    assert all(_packed_copy(m.weight) is None for m in model)  # made on first use
    with torch.no_grad():
        model(torch.randn(2, 16))
    copies = [_packed_copy(m.weight) for m in model]
    assert all(c is not None for c in copies)
    assert len({id(c) for c in copies}) == 3 and copies[1] is copies[3]
    alive = [weakref.ref(c) for c in copies]
    del model, copies
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_packed_copies_are_not_pickled() -> None:
    """A pickled or deep-copied packed layer carries no packed copy; it makes its own."""
    from registry_xf.layers.packed_linear import pack_linear_weights

    layer = torch.nn.Linear(16, 8)
    pack_linear_weights(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
        assert _packed_copy(layer.weight) is not None
        for again in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            assert _packed_copy(again.weight) is None
            assert torch.equal(again(x), expected)
            assert _packed_copy(again.weight) is not None


def test_the_operator_is_registered_explicitly_once() -> None:
    """Importing the module defines nothing in torch; registering twice is harmless."""
    first = packed_linear.register_packed_linear()
    assert packed_linear.register_packed_linear() is first
    assert hasattr(torch.ops.registry_xf, "packed_linear")


def test_the_packed_operator_is_a_linear_layer() -> None:
    """``registry_xf::packed_linear``, what compiled graphs call, computes F.linear."""
    packed_linear.register_packed_linear()
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 4, 16), torch.randn(24, 16), torch.randn(24)
    expected = torch.nn.functional.linear(x, weight, bias)
    with torch.no_grad():
        got = torch.ops.registry_xf.packed_linear(x, weight, bias)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        got = torch.ops.registry_xf.packed_linear(x, weight, None)
        torch.testing.assert_close(got, expected - bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_single_row_reads_the_plain_weight(dtype: torch.dtype) -> None:
    """One row (a decoding step of one sequence) multiplies with the plain weight, and
    needs no packed copy; more rows use the packed one. Both give F.linear's result."""
    from registry_xf.layers.packed_linear import pack_linear_weights

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40).to(dtype)
    assert pack_linear_weights(layer) == 1
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        for shape in [(1, 1, 48), (48,)]:
            x = torch.randn(shape, dtype=dtype)
            expected = torch.nn.functional.linear(
                x.float(), layer.weight.float(), layer.bias.float()
            )
            torch.testing.assert_close(layer(x).float(), expected, atol=atol, rtol=0)
        assert _packed_copy(layer.weight) is None
        x = torch.randn(3, 2, 48, dtype=dtype)
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(layer(x).float(), expected, atol=atol, rtol=0)
        assert _packed_copy(layer.weight) is not None


def test_weights_loaded_under_inference_mode_are_packed(checkpoints: dict[str, Path]) -> None:
    """Tensors made under ``torch.inference_mode`` keep no version counter; packing copes."""
    plain = rx.load(checkpoints["bert"], pack=False)
    ids, mask = random_batch()
    with torch.inference_mode():
        model = rx.load(checkpoints["bert"], pack=True)
        torch.testing.assert_close(
            model(ids, mask).last_hidden_state,
            plain(ids, mask).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_autocast_products_use_a_kept_bfloat16_copy(checkpoints: dict[str, Path]) -> None:
    """Under CPU autocast to bfloat16 a float32 packed layer multiplies with a packed
    bfloat16 copy of its weight, made once and kept: autocast's own results (the plain
    products bit for bit; a fused GELU within a bfloat16 step), outputs in bfloat16."""
    from registry_xf.layers.packed_linear import linear_then_activation, packed_weight_in

    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 64)
    layer = copy.deepcopy(plain)
    packed_linear.pack_linear_weights(layer)
    gelu = torch.nn.GELU()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for shape in [(1, 48), (3, 5, 48), (1, 1, 48), (48,), (0, 48)]:
            x = torch.randn(shape)
            got, expected = layer(x), plain(x)
            assert got.dtype == expected.dtype == torch.bfloat16
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
            fused, unfused = linear_then_activation(layer, gelu, x), gelu(plain(x))
            assert fused.dtype == torch.bfloat16
            torch.testing.assert_close(fused.float(), unfused.float(), atol=2e-2, rtol=1e-2)
        kept = packed_weight_in(layer.weight, torch.bfloat16)
        layer(torch.randn(4, 48))
        assert packed_weight_in(layer.weight, torch.bfloat16) is kept  # not made again
    assert _packed_copy(layer.weight) is None  # the float32 packed copy was never needed
    with torch.no_grad():  # a changed weight is converted again
        layer.weight.mul_(2.0)
        plain.weight.mul_(2.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.randn(3, 48)
            torch.testing.assert_close(layer(x), plain(x), atol=0, rtol=0)
    # whole models: the same hidden states as autocast over plain layers
    packed = rx.load(checkpoints["bert"], pack=True)
    reference = rx.load(checkpoints["bert"], pack=False)
    ids, mask = random_batch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(
            packed(ids, mask).last_hidden_state.float(),
            reference(ids, mask).last_hidden_state.float(),
            atol=3e-2,
            rtol=0,
        )
