"""The encoder-decoder assembly: an Encoder and a cross-attending Decoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import VOCAB

from registry_xf.assemblies import Seq2SeqLM
from registry_xf.errors import ConfigError


def padded(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, right-padded (T5's tokenizers pad on the right) to different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 2 * row :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def built_from_parts(residual: str) -> Seq2SeqLM:
    """A small encoder-decoder made from registered parts, with absolute positions and
    biases (the parts T5 does not use), for the assembly's own contract."""
    from registry_xf.registry import registry

    get = registry.layers.get
    width, heads = 16, 2

    def stack(cross: bool) -> dict[str, Any]:
        layer = get("registry_xf.TransformerLayer.v1")(
            attention=get("registry_xf.SelfAttention.v1")(width, heads),
            feed_forward=get("registry_xf.FeedForward.v1")(width, 24),
            attention_norm=get("registry_xf.LayerNorm.v1")(width),
            feed_forward_norm=get("registry_xf.LayerNorm.v1")(width),
            residual=residual,
            cross_attention=get("registry_xf.CrossAttention.v1")(width, heads) if cross else None,
            cross_attention_norm=get("registry_xf.LayerNorm.v1")(width) if cross else None,
        )
        positions = get("registry_xf.LearnedPositions.v1")(32, width)
        return {
            "embeddings": get("registry_xf.TransformerEmbeddings.v1")(
                VOCAB, width, positions=positions
            ),
            "layers": get("registry_xf.LayerStack.v1")(layer, 2),
        }

    architectures = registry.architectures.get
    encoder = architectures("registry_xf.Encoder.v1")(**stack(cross=False))
    decoder = architectures("registry_xf.Decoder.v1")(**stack(cross=True))
    torch.manual_seed(0)
    model = architectures("registry_xf.Seq2SeqLM.v1")(encoder, decoder, share_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("residual", ("pre", "post"))
def test_assembly_from_parts(residual: str) -> None:
    model = built_from_parts(residual)
    assert model.decoder.embeddings.word_embeddings.weight is (
        model.encoder.embeddings.word_embeddings.weight
    )
    ids, mask = padded(3, 9, seed=9)
    target = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        out = model(ids, mask, target)
        assert out.logits.shape == (3, 5, VOCAB)
        assert out.encoder_last_hidden_state.shape == (3, 9, 16)
        # a source alone equals the same source padded in a batch
        alone = model(ids[2:, :5], mask[2:, :5], target[2:]).logits
        torch.testing.assert_close(alone, out.logits[2:], atol=1e-5, rtol=0)
        # one token at a time with the cache equals the whole target at once
        memory, _ = model.encode(ids, mask)
        cache = model.new_cache(3, 5)
        steps = [
            model(decoder_input_ids=target[:, t : t + 1], memory=memory, cache=cache).logits
            for t in range(5)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), out.logits, atol=1e-5, rtol=0)


def test_encoder_decoder_needs_cross_attention() -> None:
    from registry_xf.registry import registry

    model = built_from_parts("pre")
    plain = registry.architectures.get("registry_xf.Decoder.v1")(
        model.encoder.embeddings, model.encoder.layers
    )
    with pytest.raises(ConfigError, match=r"decoder\.layers\.layer\.cross_attention"):
        registry.architectures.get("registry_xf.EncoderDecoder.v1")(model.encoder, plain)
