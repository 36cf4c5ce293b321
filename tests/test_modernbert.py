"""ModernBERT against HF transformers: the bare encoder and its three task heads.

The tiny checkpoints have more layers than ``global_attn_every_n_layers`` and sequences
longer than the local window, so local and global layers, their two rotary bases and the
window itself all count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import write_tokenizer

import registry_xf as rx

ATOL = 1e-5
VOCAB = 99
SEQ = 24  # longer than the local window (local_attention 8: 4 keys on each side)
LABELS = {0: "NEG", 1: "NEU", 2: "POS"}
HEADS = {
    "sequence_classification": "ModernBertForSequenceClassification",
    "token_classification": "ModernBertForTokenClassification",
    "masked_lm": "ModernBertForMaskedLM",
}


def tiny_config(**overrides: object):  # type: ignore[no-untyped-def]
    import transformers as tf

    settings: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=7,
        num_attention_heads=4,
        global_attn_every_n_layers=3,
        local_attention=8,
        max_position_embeddings=64,
        global_rope_theta=1000.0,
        local_rope_theta=77.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    settings.update(overrides)
    return tf.ModernBertConfig(**settings)


def write_checkpoint(path: Path, kind: str = "ModernBertModel", **overrides: object) -> Path:
    """A random HF ModernBERT (norms and any biases random too) saved with save_pretrained."""
    import transformers as tf

    config = tiny_config(**overrides)
    if kind != "ModernBertModel" and kind != "ModernBertForMaskedLM":
        config.id2label = dict(LABELS)
        config.label2id = {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    model = getattr(tf, kind)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


VARIANTS = {
    "base": {},
    # every bias HF's config can turn on, and layer types given as a list
    "biased": dict(
        attention_bias=True,
        mlp_bias=True,
        norm_bias=True,
        layer_types=["full_attention", "sliding_attention"] * 3 + ["full_attention"],
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modernbert")
    return {name: write_checkpoint(root / name, **over) for name, over in VARIANTS.items()}


@pytest.fixture(scope="module")
def head_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modernbert-heads")
    cases = {
        "cls": ("ModernBertForSequenceClassification", {}),
        "mean": ("ModernBertForSequenceClassification", {"classifier_pooling": "mean"}),
        "token": ("ModernBertForTokenClassification", {}),
        "mlm": ("ModernBertForMaskedLM", {}),
    }
    return {
        name: write_checkpoint(root / name, kind, **over) for name, (kind, over) in cases.items()
    }


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sequences of random lengths (one full), with a few holes in the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 3, 11, 2])
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    holes = (torch.rand(4, SEQ, generator=g) < 0.15) & (torch.arange(SEQ)[None, :] > 0)
    mask = mask * (~holes).long()
    return ids.masked_fill(mask == 0, 0), mask


def hf_model(path: Path, kind: str, attn: str):  # type: ignore[no-untyped-def]
    import transformers as tf

    return getattr(tf, kind).from_pretrained(path, attn_implementation=attn).eval()


def assert_close_at_tokens(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Per-token outputs compared at real tokens only (a padding query's output is arbitrary)."""
    if got.dim() == 3:
        got, expected = got[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_layers_follow_the_pattern(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["base"])
    assert model.layers.kind_names == [
        "first",
        "local",
        "local",
        "global",
        "local",
        "local",
        "global",
    ]
    windows = [layer.attention.window for layer in model.layers]
    assert windows == [None, 5, 5, None, 5, 5, None]  # |q - k| <= 4
    bases = [layer.attention.rotary.base for layer in model.layers]
    assert bases == [1000.0, 77.0, 77.0, 1000.0, 77.0, 77.0, 1000.0]
    assert isinstance(model.layers[0].attention_norm, torch.nn.Identity)
    biased = rx.load(checkpoints["biased"])
    assert biased.record.config["hyper"]["layer_pattern"] == ["global", "local"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_parity_with_hf(checkpoints: dict[str, Path], variant: str, backend: str) -> None:
    path = checkpoints[variant]
    ours = rx.load(path, overrides={"hyper.attention_backend": backend})
    ref = hf_model(path, "ModernBertModel", backend)
    for seed in range(2):
        ids, mask = batch(seed)
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours(ids, mask).last_hidden_state
            unmasked = ours(ids).last_hidden_state
            expected_unmasked = ref(input_ids=ids).last_hidden_state
        assert_close_at_tokens(got, expected, mask)
        torch.testing.assert_close(unmasked, expected_unmasked, atol=ATOL, rtol=0)


@pytest.mark.parametrize("unpad", [True, False])
def test_unpadded_and_padded_layers_match_hf(checkpoints: dict[str, Path], unpad: bool) -> None:
    """``hyper.unpad`` (the default): the layers run on the real tokens alone, with the
    same results there and zeros at padding; false: padded throughout."""
    path = checkpoints["biased"]
    backend = "eager" if unpad else "sdpa"  # the parity test covers the other pairings
    ours = rx.load(path, overrides={"hyper.unpad": unpad, "hyper.attention_backend": backend})
    ref = hf_model(path, "ModernBertModel", backend)
    ids, mask = batch(4)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, mask, output_hidden_states=True)
        full = ours(ids[:1], mask[:1] * 0 + 1).last_hidden_state
    assert_close_at_tokens(got.last_hidden_state, expected.last_hidden_state, mask)
    assert (got.last_hidden_state[~mask.bool()].abs().max() == 0) == unpad
    assert len(got.hidden_states) == len(expected.hidden_states)
    for a, b in zip(got.hidden_states[:-1], expected.hidden_states[:-1], strict=True):
        assert_close_at_tokens(a, b, mask)
    with torch.no_grad():
        torch.testing.assert_close(
            full, ref(input_ids=ids[:1]).last_hidden_state, atol=ATOL, rtol=0
        )


def test_unpad_needs_self_attention() -> None:
    from registry_xf import registry

    encoder = registry.architectures.get("registry_xf.Encoder.v1")
    embeddings = registry.layers.get("registry_xf.TransformerEmbeddings.v1")(vocab_size=9, width=8)
    layers = torch.nn.ModuleList([torch.nn.Module()])
    layers[0].attention = torch.nn.Linear(8, 8)
    with pytest.raises(rx.ConfigError, match="unpad.*Linear"):
        encoder(embeddings=embeddings, layers=layers, unpad=True)


def test_local_window_matters(checkpoints: dict[str, Path]) -> None:
    """The parity tests would not notice a window left out if it changed nothing: at this
    length, widening the window to every key changes the outputs."""
    path = checkpoints["base"]
    windowed = rx.load(path)
    unwindowed = rx.load(path, overrides={"hyper.local_window": SEQ + 1})
    ids, mask = batch(5)
    with torch.no_grad():
        a = windowed(ids, mask).last_hidden_state
        b = unwindowed(ids, mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() > 1e-3


def test_hf_round_trip(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import transformers as tf

    path = checkpoints["biased"]
    ours = rx.load(path)
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = tf.AutoModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.layer_types == tiny_config(**VARIANTS["biased"]).layer_types
    ids, mask = batch(7)
    with torch.no_grad():
        expected = hf_model(path, "ModernBertModel", "sdpa")(input_ids=ids, attention_mask=mask)
        again = back.eval()(input_ids=ids, attention_mask=mask)
        assert torch.equal(again.last_hidden_state, expected.last_hidden_state)
    twice = rx.load(exported).state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, twice[name]), name


def test_export_writes_every_n_layers(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    written = json.loads(
        (rx.export_hf(rx.load(checkpoints["base"]), tmp_path / "e") / "config.json").read_text()
    )
    assert written["global_attn_every_n_layers"] == 3 and written["local_attention"] == 8
    assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == 77.0


def test_save_load_bit_exact(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ours = rx.load(checkpoints["base"])
    loaded = rx.load(rx.save(ours, tmp_path / "saved"))
    ids, mask = batch(3)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask).last_hidden_state, loaded(ids, mask).last_hidden_state)


@pytest.mark.parametrize("case", ["cls", "mean", "token", "mlm"])
def test_heads_match_hf_and_export_back(
    head_checkpoints: dict[str, Path], case: str, tmp_path: Path
) -> None:
    import transformers as tf

    path = head_checkpoints[case]
    kind = json.loads((path / "config.json").read_text())["architectures"][0]
    ids, mask = batch(11)
    with torch.no_grad():
        expected = hf_model(path, kind, "sdpa")(input_ids=ids, attention_mask=mask).logits
    for backend in ("sdpa", "eager"):
        ours = rx.load(path, overrides={"hyper.attention_backend": backend})
        assert isinstance(ours, rx.EncoderWithHead)
        assert not ours.load_report.initialised
        with torch.no_grad():
            assert_close_at_tokens(ours(ids, mask).logits, expected, mask)
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = getattr(tf, kind).from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        again = back.eval()(input_ids=ids, attention_mask=mask).logits
    assert_close_at_tokens(again, expected, mask)
    if case == "mlm":
        assert ours.head.decoder.weight is ours.encoder.embeddings.word_embeddings.weight
    else:
        assert back.config.id2label == LABELS
        assert back.config.classifier_pooling == ("mean" if case == "mean" else "cls")
    state, twice = ours.state_dict(), rx.load(exported).state_dict()
    assert state.keys() == twice.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, twice[name]), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"layer_types": ["sliding_attention", "full_attention"] * 3 + ["full_attention"]},
            "first layer",
        ),
        ({"layer_types": ["full_attention"] * 3}, "must list 7"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0e4},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1.0e4},
                }
            },
            "rope_type 'linear'",
        ),
    ],
)
def test_unsupported_configs_are_refused(
    checkpoints: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    target = tmp_path / "changed"
    target.mkdir()
    for item in checkpoints["base"].iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(change)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(rx.UnsupportedModelError, match=message) as found:
        rx.load(target)
    assert "config.json" in str(found.value)
