"""An exported HF directory is a sentence-transformers model too: the same embeddings
(dense and sparse), prompts and settings as the sentence-transformers model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_hf_checkpoint
from test_sparse import st_sparse_encoder
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.loading.sentence_transformers_files import sentence_transformers_files

TEXTS = ["the cat sat on the mat", "hello world", "", "a dog ran, and the cat ran on and on"]
PROMPTS = {"query": "query: ", "passage": "passage: "}


def write_dense(directory: Path, mode: str, include_prompt: bool, norm: bool) -> Path:
    from sentence_transformers import SentenceTransformer, models

    source = directory.parent / f"{directory.name}-hf"
    write_hf_checkpoint(source, "bert", seed=11)
    write_tokenizer(source)
    modules = [models.Transformer(str(source)), models.Pooling(32, mode, include_prompt)]
    modules += [models.Normalize()] if norm else []
    model = SentenceTransformer(
        modules=modules,
        device="cpu",
        prompts=PROMPTS,
        default_prompt_name="query",
        similarity_fn_name="dot",
        truncate_dim=24,
    )
    model.save_pretrained(str(directory))
    return directory


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.clip(norms, 1e-12, None)


@pytest.mark.parametrize(
    ("mode", "include_prompt", "norm"), [("cls", False, True), ("mean", True, False)]
)
def test_sentence_transformers_reads_the_export_alike(
    tmp_path: Path, mode: str, include_prompt: bool, norm: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    original = write_dense(tmp_path / "st", mode, include_prompt, norm)
    exported = rx.export_hf(rx.load(original), tmp_path / "exported")
    ref = SentenceTransformer(str(original), device="cpu")
    again = SentenceTransformer(str(exported), device="cpu")
    assert again.prompts == ref.prompts and again.default_prompt_name == "query"
    assert again.truncate_dim == 24 and again.similarity_fn_name == "dot"
    for settings in ({}, {"prompt_name": "passage"}, {"prompt": ""}):
        expected = ref.encode(TEXTS, **settings)
        got = again.encode(TEXTS, **settings)
        assert got.shape == expected.shape == (len(TEXTS), 24)
        assert cosines(got, expected).min() >= 0.99999, settings
        ours = rx.Embedder(exported).embed(TEXTS, **settings)  # renormalised after truncation
        assert cosines(ours, expected).min() >= 0.99999, settings


def test_a_sparse_export_stays_a_sparse_encoder(tmp_path: Path) -> None:
    from sentence_transformers import SparseEncoder
    from test_heads import write_task_checkpoint

    mlm = write_task_checkpoint(tmp_path / "mlm", "bert", "masked_lm", initializer_range=0.05)
    settings = {"prompts": PROMPTS, "default_prompt_name": "passage"}
    original = st_sparse_encoder(
        mlm, tmp_path / "splade", settings=settings, pooling_strategy="sum"
    )
    exported = rx.export_hf(rx.load(original), tmp_path / "exported")
    ref = SparseEncoder(str(original), device="cpu")
    again = SparseEncoder(str(exported), device="cpu")
    assert again.prompts == ref.prompts and again.default_prompt_name == "passage"
    for method in ("encode", "encode_query", "encode_document"):
        expected = getattr(ref, method)(TEXTS, convert_to_sparse_tensor=False)
        got = getattr(again, method)(TEXTS, convert_to_sparse_tensor=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=method)
        ours = getattr(rx.SparseEncoder(exported), method)(TEXTS).to_dense()
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=method)


def test_a_model_without_pooling_or_prompts_exports_plain_hf(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    exported = rx.export_hf(rx.load(checkpoints["bert"]), tmp_path / "plain")
    assert not (exported / "modules.json").exists()
    assert not (exported / "config_sentence_transformers.json").exists()


def test_files_for_settings() -> None:
    config = {
        "pooling": {"@poolers": "registry_xf.MaxPooler.v1", "normalize": False},
        "embedding": {"prompts": {"query": "q: "}, "truncate_dim": 8},
    }
    files = sentence_transformers_files(config, 16, None)
    assert [m["type"].rsplit(".", 1)[-1] for m in files["modules.json"]] == [
        "Transformer",
        "Pooling",
    ]
    assert files["1_Pooling/config.json"]["pooling_mode_max_tokens"] is True
    assert "max_seq_length" not in files["sentence_bert_config.json"]
    st_config = files["config_sentence_transformers.json"]
    assert st_config["prompts"] == {"query": "q: "} and st_config["truncate_dim"] == 8
    json.dumps(files)  # all of it is JSON
    with pytest.raises(rx.RegistryXFError, match=r"pooling.@poolers: 'my.Pooler.v1'"):
        sentence_transformers_files({"pooling": {"@poolers": "my.Pooler.v1"}}, 16, None)


def test_an_unexportable_pooler_leaves_nothing_behind(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model = rx.load(checkpoints["bert"])
    model.config["pooling"] = {"@poolers": "my.Pooler.v1"}
    with pytest.raises(rx.RegistryXFError, match="no sentence-transformers equivalent"):
        rx.export_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- save: the same files, beside registry_xf's own -----------------------------------------


def test_a_saved_sentence_transformers_model_is_one_too(tmp_path: Path) -> None:
    """``save`` of a model with pooling writes what ``export_hf`` writes (weights under HF's
    names, config.json, modules.json...) beside config.cfg and meta.json: sentence-
    transformers loads the folder and gives the original's embeddings, registry_xf loads
    it back bit for bit (its hashes checked), and a second save replaces it."""
    from sentence_transformers import SentenceTransformer

    original = write_dense(tmp_path / "st", "mean", True, True)
    model = rx.load(original)
    saved = rx.save(model, tmp_path / "saved")
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {"config.cfg", "meta.json", "config.json", "model.safetensors", "modules.json"} <= names
    assert {"1_Pooling/config.json", "2_Normalize/config.json"} <= names
    meta = json.loads((saved / "meta.json").read_text())
    assert set(meta["sha256"]) == names - {"meta.json"}
    assert not [p for p in tmp_path.iterdir() if ".registry_xf-" in p.name]

    ref = SentenceTransformer(str(original), device="cpu")
    again = SentenceTransformer(str(saved), device="cpu")
    assert again.prompts == ref.prompts and again.truncate_dim == 24
    for settings in ({}, {"prompt_name": "passage"}):
        np.testing.assert_allclose(
            again.encode(TEXTS, **settings), ref.encode(TEXTS, **settings), rtol=0, atol=1e-5
        )

    back = rx.load(saved, verify=True)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "not bit-exact"
    assert repr(back.pooler) == repr(model.pooler) == "Pooler(mode='mean', normalize=True)"
    assert back.config["embedding"] == model.config["embedding"]
    np.testing.assert_array_equal(rx.Embedder(back).embed(TEXTS), rx.Embedder(model).embed(TEXTS))
    rx.save(back, saved, overwrite=True)  # still a saved model, replaceable as one
    with pytest.raises(rx.SaveError, match="not an HF directory written by"):
        rx.export_hf(back, saved, overwrite=True)  # but not an export
    assert repr(rx.load(saved, verify=True).pooler) == repr(model.pooler)


def test_save_without_pooling_or_a_converter_keeps_our_layout(
    checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model without [pooling] or [embedding] is saved as before (our names, no
    config.json); one with pooling but no HF converter (built from a config) is too, and
    the log says why the folder is not a sentence-transformers model."""
    import logging
    from importlib import resources

    plain = rx.save(rx.load(checkpoints["bert"]), tmp_path / "plain")
    assert not (plain / "config.json").exists() and not (plain / "modules.json").exists()
    assert "weights.converter" not in (plain / "config.cfg").read_text()

    tiny = {"hyper.vocab_size": 50, "hyper.hidden_width": 16, "hyper.n_layers": 1}
    tiny |= {"hyper.n_heads": 2, "hyper.intermediate_width": 24}
    bert_cfg = str(resources.files("registry_xf.configs") / "bert.cfg")
    built = rx.build(bert_cfg, overrides=tiny, device="cpu")
    built.config["pooling"] = {"@poolers": "registry_xf.MeanPooler.v1", "normalize": True}
    with caplog.at_level(logging.INFO, logger="registry_xf"):
        own = rx.save(built, tmp_path / "built")
    assert not (own / "modules.json").exists() and not (own / "config.json").exists()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "sentence-transformers cannot load" in logged and "no HF converter" in logged
    back = rx.load(own)
    assert repr(back.pooler) == "Pooler(mode='mean', normalize=True)"
    pairs = zip(built.parameters(), back.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
