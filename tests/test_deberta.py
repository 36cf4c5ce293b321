"""DeBERTa-v2/v3 against HF transformers: hidden states, heads, HF round trip, save/load.

Tiny random checkpoints are written here with ``save_pretrained``: a v3-style one (log
buckets, shared key projections, normed relative embeddings), a v2-style one (one
relative embedding per distance, projections of their own, token types, absolute
positions too), one with the
content-to-position term alone and one laid out as deberta-v2-xlarge (v3's settings with
a convolution beside the first layer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.errors import ConfigError, InputError, RegistryXFError, UnsupportedModelError
from registry_xf.layers.disentangled_attention import RelativeEmbeddings

ATOL = 1e-5
SEQ = 24  # beyond v2's 10 relative distances and v3's 8 exact buckets
LABELS = {0: "NEG", 1: "NEU", 2: "POS"}
TASKS = {
    "sequence_classification": "DebertaV2ForSequenceClassification",
    "token_classification": "DebertaV2ForTokenClassification",
    "masked_lm": "DebertaV2ForMaskedLM",
}
VARIANTS: dict[str, dict[str, object]] = {
    "v3": dict(
        pos_att_type="p2c|c2p",
        share_att_key=True,
        position_buckets=16,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        type_vocab_size=0,
    ),
    "v2": dict(
        pos_att_type=["c2p", "p2c"],
        share_att_key=False,
        max_relative_positions=10,
        norm_rel_ebd="none",
        type_vocab_size=2,
        position_biased_input=True,  # absolute positions too (configs/deberta_v2_absolute.cfg)
    ),
    "c2p": dict(pos_att_type=["c2p"], share_att_key=False, position_buckets=8),
    # deberta-v2-xlarge's layout: v3's settings and a convolution beside the first layer
    "v2-xlarge": dict(
        pos_att_type="p2c|c2p",
        share_att_key=True,
        position_buckets=16,
        norm_rel_ebd="layer_norm",
        conv_kernel_size=3,
        conv_act="gelu",
        conv_groups=2,
    ),
}


def tiny_config(variant: str, **overrides: object):  # type: ignore[no-untyped-def]
    import transformers as tf

    settings_ = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
        relative_attention=True,
        position_biased_input=False,
    )
    settings_.update(VARIANTS[variant])
    settings_.update(overrides)
    return tf.DebertaV2Config(**settings_)


def randomise(model) -> None:  # type: ignore[no-untyped-def]
    """Random norms and biases too: parity must hold for any values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)


def write_checkpoint(path: Path, variant: str, task: str | None = None, **overrides: object):
    import transformers as tf

    config = tiny_config(variant, **overrides)
    if task not in (None, "masked_lm"):
        config.id2label = dict(LABELS)
        config.label2id = {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    model = getattr(tf, TASKS[task])(config) if task else tf.DebertaV2Model(config)
    randomise(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deberta")
    return {variant: write_checkpoint(root / variant, variant) for variant in VARIANTS}


def batch(
    seed: int, variant: str, seq: int = SEQ
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    ids, mask = random_batch(seed, seq=seq)
    types = None
    if VARIANTS[variant].get("type_vocab_size"):
        types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(seed))
    return ids, mask, types


def hf_model(path: Path, task: str | None = None, attn: str = "eager"):  # type: ignore[no-untyped-def]
    import transformers as tf

    cls = getattr(tf, TASKS[task]) if task else tf.AutoModel
    return cls.from_pretrained(path, attn_implementation=attn).eval()


def assert_close_on_real(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal at real tokens: HF's padding queries attend to nothing (their output is noise)."""
    if got.dim() == 3:
        got, expected = got[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("qkv", ["fused", "separate"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_hf(checkpoints: dict[str, Path], variant: str, backend: str, qkv: str) -> None:
    path = checkpoints[variant]
    ours = rx.load(path, overrides={"hyper.attention_backend": backend, "hyper.qkv": qkv})
    ref = hf_model(path)  # HF's DeBERTa has eager attention only
    # 24 tokens: some distances bucketed or clipped (the terms are gathered); 6: none
    # are (the terms are strided views)
    for seed, seq in ((0, SEQ), (1, SEQ), (2, 6)):
        ids, mask, types = batch(seed, variant, seq)
        with torch.no_grad():
            expected = ref(
                input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
            )
            got = ours(ids, mask, token_type_ids=types, output_hidden_states=True)
        assert len(got.hidden_states) == len(expected.hidden_states)
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            assert_close_on_real(a, b, mask)
        assert_close_on_real(got.last_hidden_state, expected.last_hidden_state, mask)


def test_settings_read_from_config_json(checkpoints: dict[str, Path]) -> None:
    hyper = rx.config_from_hf(checkpoints["v3"]).interpolate()["hyper"]
    assert hyper["position_buckets"] == 16 and hyper["max_relative_positions"] == 64
    assert hyper["relative_terms"] == ["p2c", "c2p"] and hyper["share_att_key"] is True
    assert hyper["norm_relative_embeddings"] is True
    hyper = rx.config_from_hf(checkpoints["v2"]).interpolate()["hyper"]
    assert hyper["position_buckets"] is None and hyper["max_relative_positions"] == 10
    assert hyper["share_att_key"] is False and hyper["norm_relative_embeddings"] is False
    assert hyper["absolute_positions"] is True


def test_short_sequences_project_a_band_of_the_table(checkpoints: dict[str, Path]) -> None:
    """Only the rows some (query, key) pair uses are projected; all of them are used."""
    table = rx.load(checkpoints["v3"]).relative_positions
    rows = table(5, 5)
    assert rows.rows.shape[0] == 9  # distances -4..4, exact buckets
    assert int(rows.index.min()) == 0 and int(rows.index.max()) == 8 and rows.shifted
    long = table(SEQ, SEQ)
    assert long.rows.shape[0] <= table.weight.shape[0] and not long.shifted


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_round_trip(checkpoints: dict[str, Path], variant: str, tmp_path: Path) -> None:
    import transformers as tf

    ours = rx.load(checkpoints[variant])
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = tf.AutoModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask, types = batch(7, variant)
    with torch.no_grad():
        expected = hf_model(checkpoints[variant])(ids, mask, token_type_ids=types)
        again = back.eval()(ids, mask, token_type_ids=types)
    assert torch.equal(again.last_hidden_state, expected.last_hidden_state)
    # HF → ours → HF → ours: the same weights, bit for bit
    state, twice = ours.state_dict(), rx.load(exported).state_dict()
    assert state.keys() == twice.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, twice[name]), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_load_bit_exact(checkpoints: dict[str, Path], variant: str, tmp_path: Path) -> None:
    ours = rx.load(checkpoints[variant])
    loaded = rx.load(rx.save(ours, tmp_path / "saved"))
    ids, mask, types = batch(3, variant)
    with torch.no_grad():
        a = ours(ids, mask, token_type_ids=types).last_hidden_state
        b = loaded(ids, mask, token_type_ids=types).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_heads_match_hf_and_export_back(task: str, tmp_path: Path) -> None:
    import transformers as tf

    extra = {"pooler_hidden_act": "tanh"} if task == "sequence_classification" else {}
    path = write_checkpoint(tmp_path / task, "v3", task, **extra)
    ids, mask, _ = batch(1, "v3")
    with torch.no_grad():
        expected = hf_model(path, task)(input_ids=ids, attention_mask=mask).logits
    for backend in ("sdpa", "eager"):
        ours = rx.load(path, overrides={"hyper.attention_backend": backend})
        assert isinstance(ours, rx.EncoderWithHead) and ours.task == task
        assert not ours.load_report.initialised
        with torch.no_grad():
            assert_close_on_real(ours(ids, mask).logits, expected, mask)
    exported = rx.export_hf(ours, tmp_path / "exported")
    written = json.loads((exported / "config.json").read_text())
    assert written["architectures"] == [TASKS[task]]
    if extra:
        assert written["pooler_hidden_act"] == "tanh"
    back, info = getattr(tf, TASKS[task]).from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert_close_on_real(back.eval()(input_ids=ids, attention_mask=mask).logits, expected, mask)
    saved = rx.load(rx.save(ours, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(saved(ids, mask).logits, ours(ids, mask).logits)


def head_keys(path: Path) -> list[str]:
    """The masked-LM head's tensor names in a checkpoint (outside the bare model)."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sorted(k for k in f.keys() if not k.startswith("deberta."))


@pytest.mark.parametrize("tie", [True, False])
def test_lm_predictions_head_matches_hf_and_exports_back(tie: bool, tmp_path: Path) -> None:
    """legacy = false: HF's ``lm_predictions.lm_head`` multiplies by the word embeddings
    (tie_word_embeddings or not); loaded, exported in the same layout, saved bit-exact."""
    import transformers as tf

    path = write_checkpoint(tmp_path / "mlm", "v3", "masked_lm", legacy=False)
    if not tie:  # HF ignores it for this head: the head still reads the embeddings
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    stored = head_keys(path)
    assert stored and all(k.startswith("lm_predictions.lm_head.") for k in stored), stored
    ids, mask, _ = batch(1, "v3")
    with torch.no_grad():
        expected = hf_model(path, "masked_lm")(input_ids=ids, attention_mask=mask).logits
    ours = rx.load(path)
    assert isinstance(ours, rx.EncoderWithHead) and ours.task == "masked_lm"
    assert not ours.load_report.initialised and not ours.load_report.skipped
    assert ours.head.tie_embeddings
    assert ours.config.interpolate()["hyper"]["legacy_mlm_head"] is False
    with torch.no_grad():
        assert_close_on_real(ours(ids, mask).logits, expected, mask)
    exported = rx.export_hf(ours, tmp_path / "exported")
    written = json.loads((exported / "config.json").read_text())
    assert written["legacy"] is False and written["architectures"] == [TASKS["masked_lm"]]
    assert head_keys(exported) == sorted(k for k in stored)
    back, info = tf.DebertaV2ForMaskedLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert_close_on_real(back.eval()(input_ids=ids, attention_mask=mask).logits, expected, mask)
    state, twice = ours.state_dict(), rx.load(exported).state_dict()
    assert state.keys() == twice.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, twice[name]), name
    saved = rx.load(rx.save(ours, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(saved(ids, mask).logits, ours(ids, mask).logits)


def test_legacy_head_exports_its_own_layout(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "mlm", "v3", "masked_lm")
    exported = rx.export_hf(rx.load(path), tmp_path / "exported")
    assert json.loads((exported / "config.json").read_text())["legacy"] is True
    assert head_keys(exported) == head_keys(path)
    assert all(k.startswith("cls.predictions.") for k in head_keys(exported))


@pytest.mark.parametrize(("written", "claimed"), [(False, True), (True, False)])
def test_head_in_the_other_layout_than_config_json_is_refused(
    written: bool, claimed: bool, tmp_path: Path
) -> None:
    """config.json's legacy against the head's names: a ConfigError naming the key, the
    file and a tensor, never a bare encoder with the head skipped."""
    path = write_checkpoint(tmp_path / "mlm", "v3", "masked_lm", legacy=written)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "legacy": claimed}))
    tensor = "cls.predictions.transform.dense" if written else "lm_predictions.lm_head.dense"
    with pytest.raises(ConfigError, match=rf"\[legacy\].*model\.safetensors.*{tensor}") as e:
        rx.load(path)
    assert str(path / "config.json") in str(e.value)
    encoder = rx.load(path, head=False)  # the encoder alone does not read the head
    assert not isinstance(encoder, rx.EncoderWithHead)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"conv_kernel_size": 4}, "conv_kernel_size"),
        ({"conv_kernel_size": 3, "conv_groups": 5}, "conv_groups"),
        ({"relative_attention": False}, "relative_attention"),
        ({"pos_att_type": "c2p|p2p"}, "pos_att_type"),
        ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd"),
        ({"embedding_size": 16}, "embedding_size"),
        ({"position_buckets": 2}, "position_buckets"),
        ({"legacy": "false"}, "legacy"),
        ({"legacy": None}, "legacy"),
    ],
)
def test_unsupported_settings_are_refused_by_name(
    tmp_path: Path, changes: dict[str, object], named: str
) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    config = {**tiny_config("v3").to_dict(), **changes}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=named):
        rx.config_from_hf(path)


def test_attention_without_the_table_is_a_clear_error(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["v3"])
    model.relative_positions = None
    ids, mask, _ = batch(0, "v3")
    with pytest.raises(InputError, match="relative_positions"):
        model(ids, mask)


def test_bad_terms_are_a_config_error() -> None:
    from registry_xf import registry

    make = registry.layers.get("registry_xf.DisentangledSelfAttention.v1")
    with pytest.raises(ConfigError, match="terms"):
        make(width=32, n_heads=4, terms=["c2p", "c2c"])
    table = registry.layers.get("registry_xf.RelativeEmbeddings.v1")
    with pytest.raises(ConfigError, match="max_distance"):
        table(width=32, max_distance=5, n_buckets=16)


@settings(max_examples=60, deadline=None)
@given(
    n_buckets=st.integers(4, 64),
    extra=st.integers(2, 200),
    n=st.integers(1, 90),
)
def test_buckets_match_hf(n_buckets: int, extra: int, n: int) -> None:
    """The table row of every (query, key) pair is HF's, for any bucket settings."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    max_distance = n_buckets // 2 + extra
    table = RelativeEmbeddings(8, max_distance, n_buckets)
    x = torch.zeros(1, n, 1)
    relative = build_relative_position(x, x, bucket_size=n_buckets, max_position=max_distance)
    span = n_buckets
    expected = torch.clamp(relative[0] + span, 0, 2 * span - 1)
    assert torch.equal(table.table_index(n, n, torch.device("cpu")), expected)


FUZZ_CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "200"))
FUZZ_KEYS = (
    "pos_att_type",
    "position_buckets",
    "max_relative_positions",
    "max_position_embeddings",
    "share_att_key",
    "norm_rel_ebd",
    "relative_attention",
    "position_biased_input",
    "conv_kernel_size",
    "conv_groups",
    "conv_act",
    "attention_head_size",
    "embedding_size",
    "pooler_hidden_act",
    "legacy",
)
FUZZ_VALUES = (
    None, True, False, 0, 1, 2, 3, 4, 5, 7, 8, 16, -1, -7, 10**9, 2.5, float("nan"), "",
    "c2p", "p2c|c2p", "c2p|p2p", ["p2c"], ["c2p", 3], "layer_norm", "none", "gelu", "tanh",
    "swishy", [], {}, 32, 64,
)  # fmt: skip


def test_fuzzed_config_json_loads_or_is_refused_clearly(tmp_path: Path) -> None:
    """Random values for the keys this family reads: a model, or a registry_xf error
    (never a crash inside the converter or a component). Seeded; REGISTRY_XF_FUZZ_CASES."""
    import random

    rng = random.Random(1130)
    base = tiny_config("v2-xlarge").to_dict()
    outcomes = {"built": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        changes = {key: rng.choice(FUZZ_VALUES) for key in rng.sample(FUZZ_KEYS, rng.randint(1, 3))}
        path = tmp_path / f"case{case}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**base, **changes}))
        try:
            rx.build(rx.config_from_hf(path))  # on the meta device
        except RegistryXFError:
            outcomes["refused"] += 1
        else:
            outcomes["built"] += 1
    assert outcomes["built"] and outcomes["refused"], outcomes
