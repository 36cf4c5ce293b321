"""Token Merging: the merge on hand-made inputs, proportional attention, special tokens,
minimum length, padding, unmerged outputs, the config path through ``load``, decoders."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from conftest import VOCAB, requires_minilm, write_hf_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import registry_xf as rx
from registry_xf.config.families import family_config_text
from registry_xf.errors import ConfigError
from registry_xf.layers.attention import SelfAttention
from registry_xf.layers.attention_mask import AttentionMask
from registry_xf.layers.token_merging import (
    MergeState,
    TokenMerging,
    bipartite_merge,
    merged_mask,
    special_tokens,
)

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "200"))
CLS, SEP = 1, 2
MERGING = "registry_xf.TokenMerging.v1"


def state_of(sizes: torch.Tensor, protected: torch.Tensor | None = None) -> MergeState:
    """A state before any merge of this pass, with the given group sizes."""
    b, n = sizes.shape
    return MergeState(
        source=torch.arange(n).expand(b, n),
        sizes=sizes.float(),
        real=torch.ones(b, n, dtype=torch.bool),
        protected=torch.zeros(b, n, dtype=torch.bool) if protected is None else protected,
        positions=torch.arange(n).expand(b, n),
    )


# --- the merge on hand-made inputs --------------------------------------------------------


def hand_made() -> tuple[torch.Tensor, MergeState]:
    """Seven tokens, ends protected. A = 0, 2, 4, 6; B = 1, 3, 5. Token 2 points the same way
    as token 3 (cosine 1), token 4 is closest to token 1 (cosine 0.71)."""
    x = torch.tensor(
        [[[5.0, 5.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 1.0], [0.0, -1.0], [3.0, 3.0]]]
    )
    protected = torch.tensor([[True, False, False, False, False, False, True]])
    sizes = torch.tensor([[1, 1, 1, 3, 2, 1, 1]])
    return x, state_of(sizes, protected)


def test_merge_averages_by_size_and_keeps_order() -> None:
    x, state = hand_made()
    merged, after = bipartite_merge(x, state, torch.tensor([1]))
    # token 2 (size 1) into token 3 (size 3): (1 * [1, 0] + 3 * [2, 0]) / 4
    expected = torch.tensor([[[5.0, 5.0], [0.0, 1.0], [1.75, 0.0], [-1.0, 1.0], [0.0, -1.0]]])
    torch.testing.assert_close(merged[:, :5], expected)
    torch.testing.assert_close(merged[:, 5], x[:, 6])
    assert after.sizes.tolist() == [[1, 1, 4, 2, 1, 1]]
    assert after.source.tolist() == [[0, 1, 2, 2, 3, 4, 5]]
    assert after.positions.tolist() == [[0, 1, 3, 4, 5, 6]]  # the receiver's position


def test_two_merges_pick_the_most_similar_pairs() -> None:
    x, state = hand_made()
    merged, after = bipartite_merge(x, state, torch.tensor([2]))
    # token 4 (size 2) joins token 1 (size 1): (2 * [-1, 1] + [0, 1]) / 3
    torch.testing.assert_close(merged[0, 1], torch.tensor([-2 / 3, 1.0]))
    assert after.sizes.tolist() == [[1, 3, 4, 1, 1]]
    assert after.source.tolist() == [[0, 1, 2, 2, 1, 3, 4]]
    assert after.sizes.sum() == state.sizes.sum()  # no token lost or counted twice


def test_unmerge_gives_every_token_its_group_state_in_order() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 11, 8)
    sizes = torch.ones(2, 11)
    merging = TokenMerging(r=3)
    state = state_of(sizes)
    merged, after = bipartite_merge(x, state, torch.tensor([3, 3]))
    out = merging.unmerge(merged, after)
    assert out.shape == x.shape
    for row in range(2):
        for group in after.source[row].unique():
            members = (after.source[row] == group).nonzero().flatten()
            expected = x[row, members].mean(0)  # sizes were all 1
            for t in members:
                torch.testing.assert_close(out[row, t], expected)
            if len(members) == 1:  # untouched tokens come back exactly, in place
                assert torch.equal(out[row, members[0]], x[row, members[0]])


# --- proportional attention -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_proportional_attention_equals_attention_over_the_repeated_tokens(backend: str) -> None:
    """A key of size s weighs as s copies of itself: attention over merged tokens with
    log-size logits equals attention over the sequence where each token is repeated."""
    torch.manual_seed(1)
    attention = SelfAttention(16, 4, backend=backend).eval()
    x = torch.randn(1, 5, 16)
    sizes = torch.tensor([[1, 3, 1, 2, 1]])
    state = state_of(sizes)
    state.merged = True
    with torch.no_grad():
        merged = attention(x, merged_mask(state, AttentionMask(None)))
        repeated = x.repeat_interleave(sizes[0], dim=1)
        reference = attention(repeated, AttentionMask(None))
    first_copy = torch.cumsum(sizes[0], 0) - sizes[0]
    torch.testing.assert_close(merged, reference[:, first_copy], atol=1e-5, rtol=1e-5)


def test_proportional_attention_against_a_direct_computation() -> None:
    torch.manual_seed(2)
    attention = SelfAttention(8, 2, backend="sdpa").eval()
    x = torch.randn(2, 6, 8)
    sizes = torch.tensor([[1, 4, 1, 2, 1, 1], [2, 1, 1, 1, 0, 0]])
    state = state_of(sizes)
    state.real = sizes > 0  # the second row ends with two padding columns
    with torch.no_grad():
        out = attention(x, merged_mask(state, AttentionMask(None)))
        q, k, v = attention.project(x)
        logits = q @ k.transpose(-1, -2) * attention.scale
        logits = logits + sizes.float().clamp(min=1).log()[:, None, None, :]
        logits = logits.masked_fill(~state.real[:, None, None, :], float("-inf"))
        direct = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 8)
        direct = attention.o_proj(direct)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)


# --- special tokens, minimum length, padding --------------------------------------------------


def test_special_tokens_are_the_ends_and_their_ids() -> None:
    ids = torch.tensor([[CLS, 7, 8, SEP, 9, SEP, 0, 0], [0, 0, 5, 6, 7, 8, 9, 4]])
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]).bool()
    found = special_tokens(ids, real)
    assert found.tolist() == [
        [True, False, False, True, False, True, False, False],
        [False, False, True, False, False, False, False, True],  # left padding
    ]


def test_special_tokens_and_padding_are_never_merged() -> None:
    """All states equal: every pair is a perfect match, yet the protected tokens stay alone."""
    ids = torch.tensor([[CLS, 5, 6, 7, SEP, 8, 9, 10, 11, SEP, 0, 0]])
    mask = torch.tensor([[1] * 10 + [0, 0]])
    merging = TokenMerging(r=50, min_length=1)
    attention_mask = AttentionMask(mask.bool())
    state = merging.start(ids, attention_mask, None)
    x = torch.ones(1, 12, 4)
    x[0, :, 0] = torch.arange(12.0) * 0  # identical directions
    for _ in range(4):
        x, state, attention_mask = merging.merge(x, state, attention_mask)
    groups = state.source[0]
    for t in (0, 4, 9, 10, 11):  # [CLS], both [SEP], padding
        assert int((groups == groups[t]).sum()) == 1, t
    assert int(state.real.sum()) < 10  # the others did merge
    assert not state.real[0, groups[10]] and not state.real[0, groups[11]]


def test_minimum_length() -> None:
    merging = TokenMerging(r=50, min_length=6)
    ids = torch.tensor([[CLS, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, SEP]] * 2)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 5:] = 0  # five real tokens: below the minimum, left whole
    attention_mask = AttentionMask(mask.bool())
    state = merging.start(ids, attention_mask, None)
    x = torch.ones(2, 16, 4)
    for _ in range(5):
        x, state, attention_mask = merging.merge(x, state, attention_mask)
    assert state.real.sum(1).tolist() == [6, 5]
    assert state.source[1, :5].tolist() == [0, 1, 2, 3, 4]  # the short row untouched


def test_fraction_merges_a_share_of_each_row() -> None:
    merging = TokenMerging(fraction=0.25, min_length=1)
    state = state_of(torch.ones(2, 16))
    state.real = torch.arange(16)[None, :] < torch.tensor([[16], [8]])
    assert merging.tokens_to_merge(state).tolist() == [4, 2]


# --- the encoder: padding, unmerged outputs, equality without merges ------------------------


@functools.cache
def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    hyper = {"hyper.vocab_size": VOCAB, "hyper.hidden_width": 32, "hyper.n_layers": 3}
    hyper |= {"hyper.n_heads": 4, "hyper.intermediate_width": 37, "hyper.max_positions": 64}
    model = rx.build(family_config_text("bert"), device="cpu", overrides=hyper).eval()
    with torch.no_grad():  # spread the embeddings out, as trained ones are
        model.embeddings.word_embeddings.weight.normal_(0, 1)
    return model


def encode(model: nn.Module, merging: TokenMerging | None, ids, mask) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model.layers.token_merging = merging
    try:
        with torch.no_grad():
            return model(ids, mask).last_hidden_state
    finally:
        model.layers.token_merging = None


def batch_of(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), n), generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = SEP
    return ids.masked_fill(mask == 0, 0), mask


def test_a_batch_that_would_merge_nothing_runs_as_without_merging() -> None:
    """A batch whose every text is under ``min_length`` never starts merging: it runs as
    an unmerged batch does, unpadded where asked (merging would keep it padded); a batch
    with one long text merges."""
    model = tiny_bert()
    merging = TokenMerging(fraction=0.3, min_length=20)
    short_ids, short_mask = batch_of([12, 7, 19], seed=5)
    assert not merging.merges_any(short_mask.bool(), short_ids.shape[1])
    started = []
    real_start = merging.start
    merging.start = lambda *a: started.append(1) or real_start(*a)  # type: ignore[method-assign]
    model.layers.token_merging = merging
    try:
        with torch.no_grad():
            packed = model(short_ids, short_mask, unpad=True).last_hidden_state
            long_ids, long_mask = batch_of([12, 30], seed=6)
            assert merging.merges_any(long_mask.bool(), long_ids.shape[1])
            model(long_ids, long_mask)
    finally:
        model.layers.token_merging = None
    assert started == [1]  # the long batch alone
    with torch.no_grad():
        plain = model(short_ids, short_mask, unpad=True).last_hidden_state
    torch.testing.assert_close(packed, plain, atol=0, rtol=0)
    assert not merging.merges_any(None, 20) and merging.merges_any(None, 24)  # room: n - 20


def test_a_padded_batch_merges_each_row_as_alone() -> None:
    model = tiny_bert()
    ids, mask = batch_of([30, 17, 24, 9], seed=3)
    merging = TokenMerging(r=4, min_length=8)
    together = encode(model, merging, ids, mask)
    for row in range(4):
        n = int(mask[row].sum())
        alone = encode(model, merging, ids[row : row + 1, :n], mask[row : row + 1, :n])
        torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_merged_outputs_differ_but_stay_close() -> None:
    model = tiny_bert()
    ids, mask = batch_of([40, 36], seed=4)
    plain = encode(model, None, ids, mask)
    merged = encode(model, TokenMerging(r=3, min_length=8), ids, mask)
    assert merged.shape == plain.shape
    real = mask.bool()
    assert not torch.allclose(merged[real], plain[real])
    pooled = [(o * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for o in (plain, merged)]
    assert float(nn.functional.cosine_similarity(*pooled).min()) > 0.9


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    r=st.integers(0, 12),
    fraction=st.sampled_from([None, 0.1, 0.5, 1.0]),
    min_length=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_any_merge_keeps_shape_and_finite_values(
    lengths: list[int], r: int, fraction: float | None, min_length: int, seed: int
) -> None:
    model = tiny_bert()
    ids, mask = batch_of(lengths, seed)
    plain = encode(model, None, ids, mask)
    merging = TokenMerging(r=0 if fraction else r, fraction=fraction, min_length=min_length)
    merged = encode(model, merging, ids, mask)
    assert merged.shape == plain.shape
    assert bool(torch.isfinite(merged).all())
    if not merging.enabled or min_length > max(lengths):  # nothing merged: the same numbers
        torch.testing.assert_close(merged, plain, atol=1e-6, rtol=0)


def test_hidden_states_are_unmerged_too() -> None:
    model = tiny_bert()
    ids, mask = batch_of([20, 20], seed=5)
    model.layers.token_merging = TokenMerging(r=4, layers=[0], min_length=4)
    try:
        with torch.no_grad():
            out = model(ids, mask, output_hidden_states=True)
    finally:
        model.layers.token_merging = None
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 20, 32)] * 4
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_t5_relative_bias_follows_the_merged_positions() -> None:
    """T5's shared position bias is looked up at each merged token's original position."""
    hyper = {"hyper.vocab_size": VOCAB, "hyper.hidden_width": 32, "hyper.n_layers": 2}
    hyper |= {"hyper.n_heads": 4, "hyper.head_width": 8, "hyper.intermediate_width": 37}
    merging = {"@layers": MERGING, "r": 3, "min_length": 4}
    model = rx.build(
        family_config_text("t5_encoder"),
        device="cpu",
        overrides={**hyper, "model.layers.token_merging": merging},
    ).eval()
    ids, mask = batch_of([18, 11], seed=6)
    with torch.no_grad():
        out = model(ids, mask).last_hidden_state
        model.layers.token_merging = None
        plain = model(ids, mask).last_hidden_state
    assert out.shape == plain.shape and bool(torch.isfinite(out).all())
    # the first layer runs unmerged, so the [CLS]-position states still agree roughly
    assert float(nn.functional.cosine_similarity(out[:, 0], plain[:, 0]).min()) > 0.5


# --- config: load overrides, decoders, bad settings -------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_hf_checkpoint(tmp_path_factory.mktemp("tome") / "bert", "bert")


def test_load_overrides_turn_merging_on(bert_dir) -> None:  # type: ignore[no-untyped-def]
    merging = {"@layers": MERGING, "r": 2, "layers": [0], "min_length": 4}
    model = rx.load(bert_dir, overrides={"model.layers.token_merging": merging})
    plain = rx.load(bert_dir)
    assert isinstance(model.layers.token_merging, TokenMerging)
    assert model.layers.token_merging.layers == (0,)
    ids, mask = batch_of([20, 14], seed=7)
    with torch.no_grad():
        merged_out = model(ids, mask).last_hidden_state
        plain_out = plain(ids, mask).last_hidden_state
    assert merged_out.shape == plain_out.shape
    assert not torch.allclose(merged_out, plain_out)
    # r = 0 (merging configured but off): the same numbers
    off = rx.load(bert_dir, overrides={"model.layers.token_merging": {"@layers": MERGING, "r": 0}})
    with torch.no_grad():
        torch.testing.assert_close(off(ids, mask).last_hidden_state, plain_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "path"),
    [("llama", "model.decoder.layers"), ("t5", "model.decoder.layers")],
)
def test_decoders_refuse_token_merging(family: str, path: str) -> None:
    overrides = {f"{path}.token_merging": {"@layers": MERGING, "r": 2}}
    with pytest.raises(ConfigError) as error:
        rx.build(family_config_text(family), overrides=overrides)
    assert f"[{path}.token_merging]" in str(error.value)
    assert "causal order" in str(error.value)


@pytest.mark.parametrize(
    ("settings_", "path"),
    [
        ({"r": 2, "fraction": 0.2}, "token_merging.fraction"),
        ({"r": -1}, "token_merging.r"),
        ({"r": 2, "layers": [0, 12]}, "token_merging.layers"),
        ({"r": 2, "min_length": 0}, "token_merging.min_length"),
    ],
)
def test_bad_settings_name_their_path(settings_: dict, path: str) -> None:
    overrides = {
        "hyper.n_layers": 2,
        "model.layers.token_merging": {"@layers": MERGING, **settings_},
    }
    with pytest.raises(ConfigError) as error:
        rx.build(family_config_text("bert"), overrides=overrides)
    assert f"model.layers.{path}" in str(error.value)


@requires_minilm
def test_minilm_default_merges_long_texts_and_leaves_short_ones() -> None:
    from conftest import minilm_dir

    texts = [
        "A man is playing a guitar on the stage.",  # 11 pieces: under min_length
        "The committee will publish its findings about the river's pollution next spring, "
        "after two more years of measurements at twelve places along its course, and the "
        "towns upstream have promised to share what their own stations recorded.",
    ]
    plain = rx.Embedder(rx.load(minilm_dir())).embed(texts)
    model = rx.load(minilm_dir(), overrides={"model.layers.token_merging": {"@layers": MERGING}})
    merged = rx.Embedder(model).embed(texts)
    cosine = (
        (plain * merged).sum(1) / np.linalg.norm(plain, axis=1) / np.linalg.norm(merged, axis=1)
    )
    np.testing.assert_allclose(merged[0], plain[0], atol=1e-6)
    assert not np.allclose(merged[1], plain[1])
    assert cosine[1] > 0.9


def test_token_classification_gets_a_label_per_original_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a head, the encoder sits at ``model.encoder``; its logits stay one per token,
    in order, and the tokens of one group share theirs."""
    from test_heads import write_task_checkpoint

    path = write_task_checkpoint(tmp_path / "tagger", "bert", "token_classification")
    merging = {"@layers": MERGING, "r": 3, "min_length": 4}
    model = rx.load(path, overrides={"model.encoder.layers.token_merging": merging})
    plain = rx.load(path)
    ids, mask = batch_of([22, 15], seed=8)
    stack = model.encoder.layers
    state_seen: list[MergeState] = []
    original_merge = stack.token_merging.merge

    def recording_merge(*args, **kwargs):  # type: ignore[no-untyped-def]
        x, state, attention_mask = original_merge(*args, **kwargs)
        state_seen.append(state)
        return x, state, attention_mask

    stack.token_merging.merge = recording_merge
    with torch.no_grad():
        logits = model(ids, mask).logits
        plain_logits = plain(ids, mask).logits
    assert logits.shape == plain_logits.shape == (2, 22, 3)
    source = state_seen[-1].source
    for row in range(2):
        for group in source[row].unique():
            members = (source[row] == group).nonzero().flatten()
            assert torch.equal(
                logits[row, members], logits[row, members[:1]].expand(len(members), -1)
            )


# --- DeBERTa-v2/v3: relative positions follow the merged tokens, the convolution ------------

DEBERTA_VARIANTS = ["v3", "v2", "v2-xlarge"]  # log buckets; clipped distances; convolution


@pytest.fixture(scope="module")
def deberta_dirs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from test_deberta import write_checkpoint

    root = tmp_path_factory.mktemp("tome-deberta")
    return {v: write_checkpoint(root / v, v, max_position_embeddings=96) for v in DEBERTA_VARIANTS}


def deberta_pair(path, **settings_):  # type: ignore[no-untyped-def]
    """The checkpoint with merging (``settings_``) and without."""
    merging = {"@layers": MERGING, **settings_}
    return rx.load(path, overrides={"model.layers.token_merging": merging}), rx.load(path)


def deberta_batch(variant: str, lengths: list[int], seed: int):  # type: ignore[no-untyped-def]
    ids, mask = batch_of(lengths, seed)
    types = None
    if variant == "v2":  # its checkpoint has token types
        types = (torch.arange(ids.shape[1])[None, :] >= 10).long().expand_as(ids) * mask
    return ids, mask, types


@pytest.mark.parametrize("variant", DEBERTA_VARIANTS)
def test_deberta_without_merges_equals_the_unmerged_model(deberta_dirs, variant: str) -> None:  # type: ignore[no-untyped-def]
    """r = 0, and merging on but every text under min_length: the same numbers."""
    ids, mask, types = deberta_batch(variant, [40, 23, 31], seed=9)
    _, plain = deberta_pair(deberta_dirs[variant], r=0)
    with torch.no_grad():
        expected = plain(ids, mask, token_type_ids=types).last_hidden_state
        for settings_ in ({"r": 0}, {"r": 4, "min_length": 41}):
            model, _ = deberta_pair(deberta_dirs[variant], **settings_)
            got = model(ids, mask, token_type_ids=types).last_hidden_state
            assert torch.equal(got, expected), settings_


@pytest.mark.parametrize("variant", DEBERTA_VARIANTS)
def test_deberta_merges_each_padded_row_as_alone(deberta_dirs, variant: str) -> None:  # type: ignore[no-untyped-def]
    """Each row's merged tokens read their relative rows at their own positions: a padded
    batch gives every text what it gets alone, and the outputs stay close to unmerged."""
    model, plain = deberta_pair(deberta_dirs[variant], r=5, layers=[0], min_length=8)
    ids, mask, types = deberta_batch(variant, [40, 23, 31], seed=10)
    with torch.no_grad():
        together = model(ids, mask, token_type_ids=types).last_hidden_state
        unmerged = plain(ids, mask, token_type_ids=types).last_hidden_state
        for row in range(3):
            n = int(mask[row].sum())
            ids_1, mask_1, types_1 = (
                t[row : row + 1, :n] if t is not None else None for t in (ids, mask, types)
            )
            alone = model(ids_1, mask_1, token_type_ids=types_1).last_hidden_state
            torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-5)
    assert together.shape == unmerged.shape
    real = mask.bool()
    assert not torch.allclose(together[real], unmerged[real])
    pooled = [
        (o * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for o in (unmerged, together)
    ]
    assert float(nn.functional.cosine_similarity(*pooled).min()) > 0.9


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_relative_rows_at_merged_positions_are_the_original_distances(
    deberta_dirs, variant
) -> None:  # type: ignore[no-untyped-def]
    """A merged token's row for each pair is the table's row for the two tokens' original
    distance (bucketed or clipped as in the unmerged sequence), row by row of the batch."""
    from registry_xf.layers.disentangled_attention import log_buckets

    table = rx.load(deberta_dirs[variant]).relative_positions.eval()
    n = 40
    positions = torch.tensor([[0, 1, 5, 6, 17, 30, 39], [0, 2, 3, 11, 12, 25, 33]])
    with torch.no_grad():
        rows = table(n, n).at(positions)
        normed = table.weight if table.norm is None else table.norm(table.weight)
    distance = positions[:, :, None] - positions[:, None, :]
    if table.n_buckets:
        distance = log_buckets(distance, table.n_buckets, table.max_distance)
    expected = normed[(distance + table.span).clamp(0, 2 * table.span - 1)]
    assert rows.index.shape == (2, 7, 7) and not rows.shifted
    torch.testing.assert_close(rows.rows[rows.index], expected)


def test_deberta_convolution_sees_every_token(deberta_dirs) -> None:  # type: ignore[no-untyped-def]
    """deberta-v2-xlarge's convolution joins the first layer, before any merge: after a
    merge following that layer, every token left alone has exactly its unmerged state."""
    model, plain = deberta_pair(deberta_dirs["v2-xlarge"], r=6, layers=[0], min_length=8)
    assert model.layers.convolution is not None
    ids, mask, _ = deberta_batch("v2-xlarge", [36, 28], seed=11)
    seen: list[MergeState] = []
    merge = model.layers.token_merging.merge

    def recording_merge(*args, **kwargs):  # type: ignore[no-untyped-def]
        x, state, attention_mask = merge(*args, **kwargs)
        seen.append(state)
        return x, state, attention_mask

    model.layers.token_merging.merge = recording_merge
    with torch.no_grad():
        merged = model(ids, mask, output_hidden_states=True).hidden_states[1]
        expected = plain(ids, mask, output_hidden_states=True).hidden_states[1]
    sizes = seen[0].sizes.gather(1, seen[0].source)  # each original token's group size
    alone = (sizes == 1) & mask.bool()
    assert int((sizes > 1).sum()) > 0 and int(alone.sum()) > 20
    torch.testing.assert_close(merged[alone], expected[alone], atol=1e-6, rtol=0)


def test_an_attention_that_cannot_follow_merges_is_refused_by_name() -> None:
    """An encoder whose attention is not registry_xf's SelfAttention (a plugin's) cannot
    take the log-size bias or the merged positions: a ConfigError at the stack's setting."""
    import catalogue

    class PlainAttention(nn.Module):
        def forward(self, x, mask, positions=None):  # type: ignore[no-untyped-def]
            return x

    def plain_attention(width: int, n_heads: int) -> nn.Module:
        return PlainAttention()

    name = "test_token_merging.PlainAttention.v1"
    rx.registry.layers.register(name, func=plain_attention)
    try:
        config = family_config_text("bert").replace('"registry_xf.SelfAttention.v1"', f'"{name}"')
        config = "\n".join(
            line
            for line in config.splitlines()
            if not line.startswith(("qkv =", "backend =", "dropout = ${hyper.attention"))
        )
        with pytest.raises(ConfigError) as error:
            rx.build(
                config,
                overrides={
                    "hyper.n_layers": 2,
                    "model.layers.token_merging": {"@layers": MERGING, "r": 2},
                },
            )
    finally:
        del catalogue.REGISTRY[("registry_xf", "layers", name)]
    message = str(error.value)
    assert "[model.layers.token_merging]" in message and "LayerStack" in message
    assert "PlainAttention" in message
