"""Encoder-decoder models (T5 1.0, T5 1.1 / Flan-T5) against HF transformers.

Tiny random ``T5ForConditionalGeneration`` checkpoints are written with ``save_pretrained``
(norms randomised, so parity cannot hide behind ones); an untied checkpoint is written as
older transformers wrote Flan-T5 (a head of its own, ``tie_word_embeddings`` false). Both
sides are padded: the source with holes at the end, the target too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from conftest import assert_close_on_real_tokens as assert_close_where
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.assemblies import Seq2SeqLM
from registry_xf.errors import ConfigError, InputError
from registry_xf.layers.relative_bias import RelativePositionBias

VARIANTS = ("t5", "flan", "untied")
BACKENDS = ("sdpa", "eager")


def tiny_t5(**kw: Any) -> Any:
    import transformers as tf

    return tf.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=2,
        num_heads=4,
        d_kv=8,
        d_ff=37,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **kw,
    )


def write_t5(path: Path, variant: str, seed: int = 0) -> Path:
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    gated = {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    model = tf.T5ForConditionalGeneration(tiny_t5(**({} if variant == "t5" else gated)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.3)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(path)
    if variant == "untied":  # as transformers 4 wrote Flan-T5: a head of its own
        tensors = load_file(path / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"]) * 0.5
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["tie_word_embeddings"] = False
        del config["scale_decoder_outputs"]
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    return {v: write_t5(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}


def hf_model(path: Path) -> Any:
    import transformers as tf

    return tf.T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def padded(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, right-padded (T5's tokenizers pad on the right) to different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 2 * row :] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_hf(checkpoints: dict[str, Path], variant: str, backend: str) -> None:
    hf = hf_model(checkpoints[variant])
    ours = rx.load(checkpoints[variant], overrides={"hyper.attention_backend": backend})
    assert isinstance(ours, Seq2SeqLM)
    assert ours.lm_head.weight is ours.encoder.embeddings.word_embeddings.weight or (
        variant == "untied"
    )
    ids, mask = padded(3, 11, seed=1)
    target, target_mask = padded(3, 8, seed=2)
    with torch.no_grad():
        expected = hf(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=target,
            decoder_attention_mask=target_mask,
            output_hidden_states=True,
        )
        got = ours(ids, mask, target, target_mask)
    assert_close_where(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask)
    assert_close_where(got.last_hidden_state, expected.decoder_hidden_states[-1], target_mask)
    assert_close_where(got.logits, expected.logits, target_mask)


@pytest.mark.parametrize("variant", ("t5", "flan"))
def test_cached_decoding_equals_full(checkpoints: dict[str, Path], variant: str) -> None:
    ours = rx.load(checkpoints[variant])
    ids, mask = padded(3, 9, seed=3)
    target, target_mask = padded(3, 6, seed=4)
    target_mask = torch.ones_like(target_mask)
    with torch.no_grad():
        full = ours(ids, mask, target, target_mask).logits
        memory, _ = ours.encode(ids, mask)
        cache = ours.new_cache(3, 6)
        steps = [ours(decoder_input_ids=target[:, :2], memory=memory, cache=cache).logits]
        for t in range(2, 6):
            step = ours(
                decoder_input_ids=target[:, t : t + 1],
                decoder_attention_mask=target_mask[:, : t + 1],
                memory=memory,
                cache=cache,
            )
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_round_trip(checkpoints: dict[str, Path], variant: str, tmp_path: Path) -> None:
    import transformers as tf

    ours = rx.load(checkpoints[variant])
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = tf.T5ForConditionalGeneration.from_pretrained(
        exported, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = hf_model(checkpoints[variant])
    back_state = back.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, back_state[name]), name
    assert back.config.scale_decoder_outputs == original.config.scale_decoder_outputs
    twice = rx.load(exported)
    twice_state = twice.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, twice_state[name]), name
    ids, mask = padded(2, 7, seed=5)
    target, target_mask = padded(2, 5, seed=6)
    with torch.no_grad():
        expected = back.eval()(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=target,
            decoder_attention_mask=target_mask,
        ).logits
        assert_close_where(twice(ids, mask, target, target_mask).logits, expected, target_mask)


def test_save_load_bit_exact(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ours = rx.load(checkpoints["flan"])
    again = rx.load(rx.save(ours, tmp_path / "saved"))
    again_state = again.state_dict()
    assert again_state.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again_state[name]), name
    ids, mask = padded(2, 7, seed=7)
    target, target_mask = padded(2, 5, seed=8)
    with torch.no_grad():
        a = ours(ids, mask, target, target_mask).logits
        b = again(ids, mask, target, target_mask).logits
    assert torch.equal(a, b)
    rx.export_hf(again, tmp_path / "exported")  # the reloaded model knows its converter


@settings(max_examples=50, deadline=None)
@given(
    bidirectional=st.booleans(),
    n_buckets=st.integers(4, 40).map(lambda n: n - n % 4),
    max_distance=st.integers(20, 200),
    n_queries=st.integers(1, 30),
    n_keys=st.integers(1, 60),
)
def test_relative_buckets_match_hf(
    bidirectional: bool, n_buckets: int, max_distance: int, n_queries: int, n_keys: int
) -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    n_queries = min(n_queries, n_keys)
    bias = RelativePositionBias(3, n_buckets, max_distance, bidirectional)
    query = torch.arange(n_keys - n_queries, n_keys)[:, None]
    relative = torch.arange(n_keys)[None, :] - query
    expected = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=n_buckets, max_distance=max_distance
    )
    assert torch.equal(bias.buckets(relative), expected)


def test_decoder_layers_need_the_encoder_memory(checkpoints: dict[str, Path]) -> None:
    ours = rx.load(checkpoints["t5"])
    with pytest.raises(InputError, match="encoder's memory"):
        ours.decoder(torch.tensor([[0, 5]]))
    with pytest.raises(InputError, match="decoder_input_ids"):
        ours(torch.tensor([[5, 6]]))
    with pytest.raises(InputError, match="attention_mask"):
        ours.encode(torch.tensor([[5, 6]]), torch.ones(1, 3))


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


def test_t5_encoder_model_loads_as_an_encoder(tmp_path: Path) -> None:
    import transformers as tf
    from tiny_tokenizer import write_tokenizer

    from registry_xf.assemblies import Encoder
    from registry_xf.pipelines.embedder import Embedder

    torch.manual_seed(3)
    hf = tf.T5EncoderModel(tiny_t5(feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.3)
    hf.save_pretrained(tmp_path / "enc")
    write_tokenizer(tmp_path / "enc")
    ours = rx.load(tmp_path / "enc")
    assert type(ours) is Encoder
    ids, mask = padded(3, 10, seed=11)
    with torch.no_grad():
        expected = hf.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close_where(ours(ids, mask).last_hidden_state, expected, mask)
    vectors = Embedder(ours).embed(["the cat sat", "hello world and the dog ran"])
    assert vectors.shape == (2, 32)
    # export writes a T5EncoderModel that HF reads back unchanged
    back = tf.T5EncoderModel.from_pretrained(rx.export_hf(ours, tmp_path / "exported"))
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_encoder_of_a_whole_checkpoint(checkpoints: dict[str, Path]) -> None:
    import transformers as tf

    from registry_xf.assemblies import Encoder

    path = checkpoints["flan"]
    ours = rx.load(
        path, overrides={"weights.converter": {"@converters": "registry_xf.HFT5Encoder.v1"}}
    )
    assert type(ours) is Encoder
    assert any("decoder." in key for key in ours.load_report.skipped)
    hf = tf.T5EncoderModel.from_pretrained(path).eval()
    ids, mask = padded(3, 10, seed=12)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close_where(ours(ids, mask).last_hidden_state, expected, mask)


def source_batch() -> list[list[int]]:
    """Three prompts of different lengths, each ending in T5's end-of-sequence id."""
    g = torch.Generator().manual_seed(13)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() + [1] for n in (9, 4, 6)]


def hf_greedy(hf: Any, prompts: list[list[int]], n_new: int, eos: int | None) -> list[list[int]]:
    """HF ``generate``'s new tokens per prompt (right-padded batch), cut after an eos."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p)], mask[row, : len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=0,
        )
    found = []
    for row in out[:, 1:].tolist():  # after the decoder start token
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        found.append(row)
    return found


@pytest.mark.parametrize("variant", ("t5", "flan"))
def test_greedy_generation_equals_hf(checkpoints: dict[str, Path], variant: str) -> None:
    from registry_xf.generation import Generator

    hf = hf_model(checkpoints[variant])
    generator = Generator(rx.load(checkpoints[variant]))
    prompts = source_batch()
    # without an end-of-sequence id: all 32 tokens of every prompt
    got = generator.generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])
    assert [len(x) for x in got] == [32, 32, 32]
    assert got == hf_greedy(hf, prompts, 32, eos=None)
    assert generator.default_eos_token_ids() == [1]  # config.json's eos_token_id
    if variant == "t5":
        # a token the second row generates early as end-of-sequence: that row stops there,
        # is fed padding while the others go on, and the others are unchanged
        eos = got[1][4]
        expected = hf_greedy(hf, prompts, 32, eos=eos)
        assert len(expected[1]) <= 5
        assert generator.generate_ids(prompts, max_new_tokens=32, eos_token_ids=[eos]) == expected


def test_sampling_with_an_encoder_decoder(checkpoints: dict[str, Path]) -> None:
    from registry_xf.generation import Generator

    generator = Generator(rx.load(checkpoints["flan"]))
    prompts = source_batch()
    sampled = generator.generate_ids(
        prompts, max_new_tokens=12, temperature=1.5, top_p=0.9, repetition_penalty=1.3, seed=7
    )
    again = generator.generate_ids(
        prompts, max_new_tokens=12, temperature=1.5, top_p=0.9, repetition_penalty=1.3, seed=7
    )
    assert sampled == again
    assert all(0 <= t < VOCAB for row in sampled for t in row)
    # sampling from the single most likely token is greedy decoding
    top1 = generator.generate_ids(prompts, max_new_tokens=12, temperature=1.0, top_k=1, seed=1)
    assert top1 == generator.generate_ids(prompts, max_new_tokens=12)
    # a different seed samples something else (a random model spreads its probability)
    other = generator.generate_ids(
        prompts, max_new_tokens=12, temperature=1.5, top_p=0.9, repetition_penalty=1.3, seed=8
    )
    assert other != sampled


def test_built_with_random_weights_keeps_its_ties() -> None:
    from registry_xf.config.families import family_config_text

    sizes = {"vocab_size": 99, "hidden_width": 32, "n_layers": 1, "n_decoder_layers": 1}
    model = rx.build(
        family_config_text("t5"),
        overrides={f"hyper.{k}": v for k, v in sizes.items()},
        device="cpu",
    )
    table = model.encoder.embeddings.word_embeddings.weight
    assert table.device.type == "cpu"
    assert model.decoder.embeddings.word_embeddings.weight is table
    assert model.lm_head.weight is table


# --- BART and Marian ----------------------------------------------------------------------

BART_VARIANTS = ("bart", "bart_scaled", "marian")
# (model class, decoder start id, padding id, end-of-sequence id) of each family
BART_LIKE = {
    "bart": ("BartForConditionalGeneration", 2, 1, 2),
    "marian": ("MarianMTModel", VOCAB - 1, VOCAB - 1, 0),
}


def family_of(variant: str) -> str:
    return "marian" if variant == "marian" else "bart"


def write_bart_like(path: Path, variant: str, seed: int = 0) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    sizes: dict[str, Any] = {
        "vocab_size": VOCAB,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 37,
        "decoder_ffn_dim": 37,
        "max_position_embeddings": 64,
        "dropout": 0.0,
        "forced_eos_token_id": None,
    }
    if variant == "marian":
        _, start, pad, eos = BART_LIKE["marian"]
        config = tf.MarianConfig(
            **sizes,
            scale_embedding=True,
            activation_function="swish",
            decoder_start_token_id=start,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        model = tf.MarianMTModel(config)
    else:
        config = tf.BartConfig(**sizes, scale_embedding=variant == "bart_scaled")
        model = tf.BartForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0, 0.3)
        model.final_logits_bias.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bart_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bart")
    return {v: write_bart_like(root / v, v, seed=i) for i, v in enumerate(BART_VARIANTS)}


def hf_bart_like(path: Path, variant: str) -> Any:
    import transformers as tf

    model_class = getattr(tf, BART_LIKE[family_of(variant)][0])
    return model_class.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", BART_VARIANTS)
def test_bart_like_parity_with_hf(
    bart_checkpoints: dict[str, Path], variant: str, backend: str
) -> None:
    hf = hf_bart_like(bart_checkpoints[variant], variant)
    ours = rx.load(bart_checkpoints[variant], overrides={"hyper.attention_backend": backend})
    assert (ours.encoder.embeddings.scale is not None) == (variant != "bart")
    ids, mask = padded(3, 11, seed=14)
    target, target_mask = padded(3, 8, seed=15)
    with torch.no_grad():
        expected = hf(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=target,
            decoder_attention_mask=target_mask,
            output_hidden_states=True,
        )
        got = ours(ids, mask, target, target_mask)
    assert_close_where(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, mask)
    assert_close_where(got.last_hidden_state, expected.decoder_hidden_states[-1], target_mask)
    assert_close_where(got.logits, expected.logits, target_mask)


@pytest.mark.parametrize("variant", ("bart_scaled", "marian"))
def test_bart_like_round_trip_and_greedy_generation(
    bart_checkpoints: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    import transformers as tf

    from registry_xf.generation import Generator

    path = bart_checkpoints[variant]
    model_class, start, pad, eos = BART_LIKE[family_of(variant)]
    ours = rx.load(path)
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = getattr(tf, model_class).from_pretrained(
        exported, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    back_state = back.state_dict()
    for name, tensor in hf_bart_like(path, variant).state_dict().items():
        assert torch.equal(tensor, back_state[name]), name
    twice = rx.load(exported)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, twice.state_dict()[name]), name
    # greedy generation: decoder start and padding from the checkpoint
    prompts = [p[:-1] + [eos] for p in source_batch()]
    generator = Generator(ours)
    assert generator.default_eos_token_ids() == [eos]
    got = generator.generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p)], mask[row, : len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf_bart_like(path, variant).generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=32,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
        )
    assert out[:, 0].tolist() == [start] * 3
    assert got == out[:, 1:].tolist()


def test_sinusoidal_halves_layout() -> None:
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from registry_xf.layers.positions import SinusoidalPositions

    for width in (8, 9, 32):
        theirs = MarianSinusoidalPositionalEmbedding(40, width)
        expected = theirs.create_weight()
        ours = SinusoidalPositions(40, width, layout="halves")
        torch.testing.assert_close(ours.table, expected, atol=1e-6, rtol=0)


# --- forced tokens, n-gram repeats, minimum lengths (BART's generation configs) ----------

BART_GENERATION = {  # as bart-large-cnn's generation_config.json, beam search aside
    "bos_token_id": 0,
    "decoder_start_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "min_length": 12,
}


@pytest.fixture(scope="module")
def bart_forced(
    bart_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The BART checkpoint with BART's generation settings in generation_config.json."""
    import shutil

    path = tmp_path_factory.mktemp("bart_forced") / "bart"
    shutil.copytree(bart_checkpoints["bart"], path)
    (path / "generation_config.json").write_text(json.dumps(BART_GENERATION))
    return path


def batch_of(prompts: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        where = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[row, where], mask[row, where] = torch.tensor(p), 1
    return ids, mask


def hf_new_tokens(hf: Any, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> list[list[int]]:
    """HF ``generate``'s new tokens per row (its generation config, changed by ``kw``),
    each cut after its first end-of-sequence token."""
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    eos = kw.get("eos_token_id", hf.generation_config.eos_token_id)
    found = []
    for row in out[:, 1:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        found.append(row)
    return found


def test_bart_forced_tokens_and_ngrams_equal_hf(bart_forced: Path) -> None:
    """BART's generation_config.json (forced first and last tokens, min_length) with and
    without an n-gram ban and end-of-sequence: ours equal HF's ``generate`` tokens for a
    right-padded batch of 3 (BART's tokenizers pad on the right; its absolute positions
    make a left-padded source another input, in HF too)."""
    from registry_xf.generation import Generator

    hf = hf_bart_like(bart_forced, "bart")
    assert hf.generation_config.forced_bos_token_id == 0  # HF read generation_config.json
    ours = rx.load(bart_forced)
    generation = ours.config["generation"]
    assert generation["forced_bos_token_id"] == 0 and generation["forced_eos_token_ids"] == [2]
    assert generation["min_length"] == 12
    generator = Generator(ours)
    prompts = [p[:-1] + [2] for p in source_batch()]
    ids, mask = batch_of(prompts, pad=1, side="right")
    for kw in (
        {"eos_token_ids": []},
        {"eos_token_ids": [], "no_repeat_ngram_size": 3},
        {"no_repeat_ngram_size": 3},
        {},
    ):
        got = generator.generate_ids(prompts, max_new_tokens=32, **kw)
        hf_kw: dict[str, Any] = {"max_new_tokens": 32}
        if "no_repeat_ngram_size" in kw:
            hf_kw["no_repeat_ngram_size"] = kw["no_repeat_ngram_size"]
        if kw.get("eos_token_ids") == []:
            hf_kw["eos_token_id"] = None
        assert got == hf_new_tokens(hf, ids, mask, **hf_kw), kw
        assert all(row[0] == 0 for row in got)  # the forced first token
        if kw.get("eos_token_ids") == []:
            assert all(len(row) == 32 and row[-1] == 2 for row in got)  # the forced last one
        else:
            assert all(len(row) >= 11 for row in got)  # min_length 12 counts the start token


def test_no_repeat_ngram_changes_t5_greedy_as_hf(checkpoints: dict[str, Path]) -> None:
    """T5 (relative positions): the source left- or right-padded gives HF the same tokens,
    and ours equal them; without the setting some 3-gram repeats."""
    from registry_xf.generation import Generator

    hf = hf_model(checkpoints["t5"])
    generator = Generator(rx.load(checkpoints["t5"]))
    prompts = source_batch()
    got = generator.generate_ids(
        prompts, max_new_tokens=32, eos_token_ids=[], no_repeat_ngram_size=3
    )
    for side in ("left", "right"):
        ids, mask = batch_of(prompts, pad=0, side=side)
        expected = hf_new_tokens(
            hf, ids, mask, max_new_tokens=32, eos_token_id=None, no_repeat_ngram_size=3
        )
        assert got == expected, side
    for row in got:
        grams = [tuple(([0] + row)[i : i + 3]) for i in range(len(row) - 1)]
        assert len(grams) == len(set(grams))
    plain = generator.generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])
    assert plain != got


def test_tied_config_with_a_different_stored_head_loads_it_untied_as_hf(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """config.json says tied, the file holds an lm_head.weight of other values: HF
    transformers 5 warns and loads that head untied; so do we, naming the tensor."""
    import logging

    from safetensors.torch import load_file, save_file

    path = write_t5(tmp_path / "t5", "t5", seed=4)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    hf = hf_model(path)
    assert hf.lm_head.weight is not hf.shared.weight
    with caplog.at_level(logging.WARNING, logger="registry_xf"):
        ours = rx.load(path)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "lm_head.weight" in warned and "shared.weight" in warned and "untied" in warned
    assert ours.lm_head.weight is not ours.encoder.embeddings.word_embeddings.weight
    assert torch.equal(ours.lm_head.weight, tensors["lm_head.weight"])
    assert "lm_head.weight" not in ours.load_report.skipped
    ids, mask = padded(2, 7, seed=16)
    target, target_mask = padded(2, 5, seed=17)
    with torch.no_grad():
        expected = hf(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=target,
            decoder_attention_mask=target_mask,
        ).logits
        assert_close_where(ours(ids, mask, target, target_mask).logits, expected, target_mask)
    # a stored head equal to the table stays tied, without a word
    tensors["lm_head.weight"] = tensors["shared.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="registry_xf"):
        again = rx.load(path)
    assert again.lm_head.weight is again.encoder.embeddings.word_embeddings.weight
    assert not [r for r in caplog.records if "untied" in r.getMessage()]


def test_an_untied_head_on_scaled_states_is_exported_with_the_scale_folded_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """T5 1.0 whose file holds a head of its own loads untied and scaled. HF transformers
    derives the scale from tie_word_embeddings (false: unscaled), so the export folds the
    scale into lm_head.weight and says untied and unscaled, logging it: HF's logits from
    the export are ours; registry_xf reads the export back alike; saving stays exact."""
    import logging

    import transformers as tf
    from safetensors.torch import load_file, save_file

    path = write_t5(tmp_path / "t5", "t5", seed=9)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = rx.load(path)
    hyper = ours.config["hyper"]
    assert hyper["tie_embeddings"] is False and hyper["scale_output"] is True
    with caplog.at_level(logging.INFO, logger="registry_xf"):
        exported = rx.export_hf(ours, tmp_path / "exported")
    assert any("folded into lm_head.weight" in r.getMessage() for r in caplog.records)
    written = json.loads((exported / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["scale_decoder_outputs"] is False
    head = load_file(exported / "model.safetensors")["lm_head.weight"]
    torch.testing.assert_close(head, ours.lm_head.weight * 32**-0.5, atol=1e-7, rtol=1e-6)

    hf, info = tf.T5ForConditionalGeneration.from_pretrained(
        exported, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.scale_decoder_outputs is False and hf.lm_head.weight is not hf.shared.weight
    back = rx.load(exported)
    assert back.config["hyper"]["scale_output"] is False
    ids, mask = padded(3, 9, seed=18)
    target, target_mask = padded(3, 6, seed=19)
    with torch.no_grad():
        expected = ours(ids, mask, target, target_mask).logits
        from_hf = hf.eval()(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=target,
            decoder_attention_mask=target_mask,
        ).logits
        again = back(ids, mask, target, target_mask).logits
    assert_close_where(from_hf, expected, target_mask)
    assert_close_where(again, expected, target_mask)

    # save keeps our layout and values (HF's files would change the head): bit for bit,
    # even with a pooler on record, which would otherwise make it a sentence-transformers
    # folder
    ours.config["pooling"] = {"@poolers": "registry_xf.MeanPooler.v1", "normalize": False}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="registry_xf"):
        saved = rx.save(ours, tmp_path / "saved")
    assert not (saved / "config.json").exists()
    assert any("bit for bit" in r.getMessage() for r in caplog.records)
    state = rx.load(saved).state_dict()
    assert all(torch.equal(t, state[name]) for name, t in ours.state_dict().items())


def _can_compile() -> bool:
    from test_generation import _can_compile_cpu_kernels

    return _can_compile_cpu_kernels()


@pytest.mark.skipif(not _can_compile(), reason="no C++ compiler or Python headers")
def test_compiled_seq2seq_generation_gives_the_eager_tokens(checkpoints: dict[str, Path]) -> None:
    """``compile=True`` with T5: two graphs (the prompt: encoder, cross-attention keys and
    values, start token; one decoding step with the static cache), the eager tokens, and
    other source lengths and batch sizes reuse both graphs."""
    import torch._dynamo

    from registry_xf.generation import Generator

    model = rx.load(checkpoints["t5"])
    prompts = source_batch()
    eager = Generator(model).generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])
    other = [p[2:] for p in prompts[:2]]
    eager_other = Generator(model).generate_ids(other, max_new_tokens=20, eos_token_ids=[])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = Generator(model, compile=True)
    try:
        assert generator.generate_ids(prompts, max_new_tokens=32, eos_token_ids=[]) == eager
        assert generator.generate_ids(other, max_new_tokens=20, eos_token_ids=[]) == eager_other
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # prompt, step
    finally:
        torch._dynamo.reset()


def test_generation_settings_are_read_as_hf_reads_them(
    bart_forced: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """generation_config.json when there is one (config.json's generation keys then count
    for nothing), else config.json; bad values of the keys applied are CheckpointErrors
    naming the file and key; settings HF applies and the generator does not are logged."""
    import logging
    import shutil

    from registry_xf.errors import CheckpointError
    from registry_xf.generation import Generator, SettingsError

    path = tmp_path / "bart"
    shutil.copytree(bart_forced, path)
    config = json.loads((path / "config.json").read_text())
    config.update(no_repeat_ngram_size=3, forced_bos_token_id=5)
    (path / "config.json").write_text(json.dumps(config))
    generation = rx.config_from_hf(path)["generation"]
    assert "no_repeat_ngram_size" not in generation and generation["forced_bos_token_id"] == 0
    (path / "generation_config.json").unlink()
    generation = rx.config_from_hf(path)["generation"]
    assert generation["no_repeat_ngram_size"] == 3 and generation["forced_bos_token_id"] == 5
    assert generation["decoder_start_token_id"] == 2 and generation["pad_token_id"] == 1

    beams = {**BART_GENERATION, "num_beams": 4, "length_penalty": 2.0, "bad_words_ids": [[1]]}
    (path / "generation_config.json").write_text(json.dumps(beams))
    with caplog.at_level(logging.WARNING, logger="registry_xf"):
        generation = rx.config_from_hf(path)["generation"]
    assert generation["suppress_token_ids"] == [1]  # one-token bad words: never generated
    assert "num_beams=4" in caplog.text and "generation_config.json" in caplog.text

    bad = {**BART_GENERATION, "forced_bos_token_id": "0"}
    (path / "generation_config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"generation_config\.json: forced_bos_token_id"):
        rx.config_from_hf(path)

    outside = {**BART_GENERATION, "forced_bos_token_id": VOCAB + 5}
    (path / "generation_config.json").write_text(json.dumps(outside))
    generator = Generator(rx.load(path))
    with pytest.raises(SettingsError, match="forced_bos_token_id"):
        generator.generate_ids([[5, 6, 2]], max_new_tokens=3)


def test_export_keeps_the_generation_settings(bart_forced: Path, tmp_path: Path) -> None:
    """export_hf writes generation_config.json: the exported BART keeps its forced tokens,
    end ids and minimum length, for HF and for registry_xf alike."""
    ours = rx.load(bart_forced)
    out = rx.export_hf(ours, tmp_path / "exported")
    assert rx.load(out).config["generation"] == ours.config["generation"]
    hf = hf_bart_like(out, "bart")
    assert hf.generation_config.forced_bos_token_id == 0
    assert hf.generation_config.forced_eos_token_id == 2
    assert hf.generation_config.min_length == 12
