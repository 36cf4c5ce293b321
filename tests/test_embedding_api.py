"""The dense embedding API against sentence-transformers: prompts (included in or excluded from
pooling), Matryoshka truncation, quantised precisions, Hamming similarity, the CLI, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_hf_checkpoint
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.errors import InputError, RegistryXFError, UnsupportedModelError
from registry_xf.pipelines import hamming_distance, hamming_similarity
from registry_xf.pipelines import quantize_embeddings as rx_quantize
from registry_xf.pipelines.embedder import Embedder

TEXTS = ["the cat sat on the mat", "hello world", "a dog ran", "", "is the dog and the cat"]
PROMPTS = {"query": "the cat: ", "passage": "dog is ", "search": "hello, "}
CASES = {  # name: (pooling mode, include_prompt, Normalize module)
    "mean-excluded": ("mean", False, True),
    "cls-excluded": ("cls", False, False),
    "mean-included": ("mean", True, False),
    "max-excluded": ("max", False, True),
}


def write_sentence_transformer(directory: Path, mode: str, include_prompt: bool, norm: bool):
    from sentence_transformers import SentenceTransformer, models

    source = directory.parent / f"{directory.name}-hf"
    write_hf_checkpoint(source, "bert", seed=7)
    write_tokenizer(source)
    modules = [models.Transformer(str(source)), models.Pooling(32, mode, include_prompt)]
    modules += [models.Normalize()] if norm else []
    model = SentenceTransformer(
        modules=modules, device="cpu", prompts=PROMPTS, default_prompt_name="search"
    )
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-prompts")
    return {name: write_sentence_transformer(root / name, *case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def pairs(checkpoints: dict[str, Path]) -> dict[str, tuple[Embedder, object]]:
    """Per case: our embedder and sentence-transformers' model of the same directory."""
    from sentence_transformers import SentenceTransformer

    return {
        name: (Embedder(str(path), batch_tokens=40), SentenceTransformer(str(path), device="cpu"))
        for name, path in checkpoints.items()
    }


PROMPT_SETTINGS = [
    {},  # the default prompt ("search")
    {"prompt_name": "query"},
    {"prompt_name": "passage"},
    {"prompt": "the mat and "},
    {"prompt": ""},  # explicitly none: no default
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompts_match_sentence_transformers(pairs: dict, case: str) -> None:
    ours, theirs = pairs[case]
    for settings in PROMPT_SETTINGS:
        expected = theirs.encode(TEXTS, **settings)
        np.testing.assert_allclose(ours.embed(TEXTS, **settings), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.embed_query(TEXTS), theirs.encode_query(TEXTS), atol=1e-5)
    np.testing.assert_allclose(ours.embed_document(TEXTS), theirs.encode_document(TEXTS), atol=1e-5)
    query = ours.embed_query(TEXTS, prompt_name="passage")
    np.testing.assert_allclose(query, theirs.encode_query(TEXTS, prompt_name="passage"), atol=1e-5)


def test_excluding_the_prompt_changes_the_pool(pairs: dict) -> None:
    ours = pairs["mean-excluded"][0]
    assert ours.pooler.include_prompt is False
    assert pairs["mean-included"][0].pooler.include_prompt is True
    with_prompt = ours.embed(TEXTS[:3], prompt_name="query")
    assert not np.allclose(with_prompt, ours.embed(TEXTS[:3], prompt=""), atol=1e-3)


@pytest.mark.parametrize("case", ["mean-excluded", "cls-excluded"])
@pytest.mark.parametrize("dim", [1, 8, 13, 32])
def test_truncate_dim_matches_sentence_transformers(pairs: dict, case: str, dim: int) -> None:
    ours, theirs = pairs[case]
    normalise = ours.pooler.normalize  # renormalised where the model normalises
    expected = theirs.encode(TEXTS, truncate_dim=dim, normalize_embeddings=normalise)
    got = ours.embed(TEXTS, truncate_dim=dim)
    assert got.shape == (len(TEXTS), dim)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if normalise:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_truncate_dim_as_a_model_setting(checkpoints: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    path = str(checkpoints["mean-included"])
    theirs = SentenceTransformer(path, device="cpu", truncate_dim=16)
    ours = Embedder(path, truncate_dim=16)
    np.testing.assert_allclose(ours.embed(TEXTS), theirs.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(  # per call wins over the setting
        ours.embed(TEXTS, truncate_dim=4), theirs.encode(TEXTS, truncate_dim=4), atol=1e-5
    )


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_precision_matches_quantize_embeddings(pairs: dict, precision: str) -> None:
    from sentence_transformers import quantize_embeddings

    ours, theirs = pairs["mean-excluded"]
    calibration = theirs.encode(TEXTS[::-1], prompt="and ")
    ranges = np.vstack([calibration.min(0) - 0.1, calibration.max(0) + 0.05])
    reference = theirs.encode(TEXTS, prompt_name="query")
    for settings in ({}, {"calibration_embeddings": calibration}, {"ranges": ranges}):
        got = ours.embed(TEXTS, prompt_name="query", precision=precision, **settings)
        expected = quantize_embeddings(reference, precision=precision, **settings)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if precision == "float32":
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        else:  # the same buckets, except where a value sits within rounding of a boundary
            np.testing.assert_array_equal(
                got,
                quantize_embeddings(ours.embed(TEXTS, prompt_name="query"), precision, **settings),
            )
            assert np.mean(got == expected) >= 0.99


def test_st_encode_precision_is_ours(pairs: dict) -> None:
    ours, theirs = pairs["cls-excluded"]
    for precision in ("int8", "ubinary"):
        expected = theirs.encode(TEXTS, precision=precision, truncate_dim=20)
        got = ours.embed(TEXTS, precision=precision, truncate_dim=20)
        assert got.dtype == expected.dtype and np.mean(got == expected) >= 0.99


def test_quantize_equals_sentence_transformers_on_random_data() -> None:
    from sentence_transformers import quantize_embeddings

    rng = np.random.default_rng(0)
    for width in (1, 7, 8, 33):
        data = rng.normal(size=(50, width)).astype(np.float32)
        calibration = rng.normal(size=(20, width)).astype(np.float32)
        for precision in ("float32", "int8", "uint8", "binary", "ubinary"):
            for settings in ({}, {"calibration_embeddings": calibration}):
                expected = quantize_embeddings(data, precision, **settings)
                got = rx_quantize(data, precision, **settings)
                assert got.dtype == expected.dtype
                np.testing.assert_array_equal(got, expected)


def test_hamming_on_packed_embeddings() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(9, 21)).astype(np.float32)
    bits = data > 0
    expected = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    for precision in ("binary", "ubinary"):
        packed = rx_quantize(data, precision)
        np.testing.assert_array_equal(hamming_distance(packed, packed), expected)
        np.testing.assert_allclose(
            hamming_similarity(packed, packed, width=21), 1 - expected / 21, atol=1e-6
        )
    mixed = hamming_distance(rx_quantize(data, "binary"), rx_quantize(data[:3], "ubinary"))
    np.testing.assert_array_equal(mixed, expected[:, :3])
    with pytest.raises(InputError, match="packed binary"):
        hamming_distance(data, data)
    with pytest.raises(InputError, match="widths differ"):
        hamming_distance(rx_quantize(data, "binary"), rx_quantize(data[:, :5], "binary"))


def test_save_and_load_keep_prompts(pairs: dict, tmp_path: Path) -> None:
    ours, _ = pairs["cls-excluded"]
    rx.save(ours.model, tmp_path / "saved")
    again = Embedder(str(tmp_path / "saved"))
    assert again.prompts == ours.prompts and again.default_prompt_name == "search"
    assert again.pooler.include_prompt is False and again.pooler.mode == "cls"
    for settings in ({}, {"prompt_name": "query"}):
        got = again.embed(TEXTS, **settings)
        np.testing.assert_allclose(got, ours.embed(TEXTS, **settings), atol=1e-6)
    text = (tmp_path / "saved" / "config.cfg").read_text()
    assert "[embedding.prompts]" in text and "include_prompt = false" in text


def test_constructor_prompts_override_the_checkpoint(pairs: dict) -> None:
    ours, theirs = pairs["mean-included"]
    mine = Embedder(ours.model, prompts={"query": "on the "}, default_prompt_name="query")
    np.testing.assert_allclose(mine.embed(TEXTS), theirs.encode(TEXTS, prompt="on the "), atol=1e-5)
    assert mine.prompts["passage"] == PROMPTS["passage"]


def test_bad_inputs(pairs: dict) -> None:
    ours = pairs["mean-included"][0]
    with pytest.raises(InputError, match=r"prompt_name='qeury'.*'query', 'document'.*Did you mean"):
        ours.embed(TEXTS, prompt_name="qeury")
    with pytest.raises(InputError, match="give one or the other"):
        ours.embed(TEXTS, prompt="x ", prompt_name="query")
    for dim in (0, -3, 33):
        with pytest.raises(InputError, match=rf"truncate_dim={dim}: expected 1 to 32"):
            ours.embed(TEXTS, truncate_dim=dim)
    with pytest.raises(InputError, match="truncate_dim=64"):
        Embedder(ours.model, truncate_dim=64)
    with pytest.raises(InputError, match="default_prompt_name='nope'"):
        Embedder(ours.model, default_prompt_name="nope")
    with pytest.raises(InputError, match="precision='unit8'.*Did you mean 'uint8'"):
        ours.embed(TEXTS, precision="unit8")
    with pytest.raises(InputError, match="calibration_embeddings"):
        ours.embed(TEXTS[:1], precision="int8")  # no range from one embedding
    with pytest.raises(InputError, match=r"ranges: expected shape \(2, 32\)"):
        ours.embed(TEXTS, precision="int8", ranges=np.zeros((2, 8)))
    assert issubclass(InputError, RegistryXFError)


def test_unsupported_pooling_mode_is_named(tmp_path: Path) -> None:
    path = write_sentence_transformer(tmp_path / "lt", "lasttoken", True, False)
    with pytest.raises(UnsupportedModelError, match="1_Pooling.*'lasttoken'"):
        rx.load(str(path))


def test_cli_embed_settings(pairs: dict, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from registry_xf.cli import main

    ours, _ = pairs["mean-excluded"]
    model = str(checkpoints["mean-excluded"])
    texts = [t for t in TEXTS if t]
    np.save(tmp_path / "calibration.npy", ours.embed(TEXTS[::-1], prompt="and "))
    runs = [
        (["--prompt-name", "query", "--truncate-dim", "12", "--precision", "binary"], {}),
        (["--prompt", "dog is ", "--precision", "ubinary"], {}),
        (["--truncate-dim", "20"], {}),
        (
            ["--precision", "int8", "--calibration", str(tmp_path / "calibration.npy")],
            {"calibration_embeddings": np.load(tmp_path / "calibration.npy")},
        ),
    ]
    for i, (flags, extra) in enumerate(runs):
        out = tmp_path / f"run{i}.npy"
        assert main(["embed", *texts, "--model", model, "--out", str(out), *flags]) == 0
        settings = {
            f[2:].replace("-", "_"): v for f, v in zip(flags[::2], flags[1::2], strict=True)
        }
        settings.pop("calibration", None)
        if "truncate_dim" in settings:
            settings["truncate_dim"] = int(settings["truncate_dim"])
        expected = ours.embed(texts, **settings, **extra)
        got = np.load(out, allow_pickle=False)
        assert got.dtype == expected.dtype  # packed bits stay packed
        if got.dtype == np.float32:
            np.testing.assert_allclose(got, expected, atol=1e-6)
        else:
            assert np.mean(got == expected) >= 0.99


def test_cli_bad_settings(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from registry_xf.cli import main

    model = str(checkpoints["mean-included"])
    bad = {
        ("--precision", "binery"): "Did you mean 'binary'",
        ("--prompt-name", "passsage"): "no such prompt; this model knows 'query', 'document'",
        ("--truncate-dim", "0"): "truncate_dim=0: expected 1 to 32",
    }
    for flags, message in bad.items():
        assert main(["embed", "hello", "--model", model, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["embed", "the cat", "hello", "--model", model, "--precision", "ubinary"]) == 0
    assert "hamming similarity" in capsys.readouterr().out


def _spacy_nlp(source: Path, **settings: object):  # type: ignore[no-untyped-def]
    import spacy

    nlp = spacy.blank("en")
    model = {"@architectures": "registry_xf.TransformerModel.v1", "source": str(source)}
    nlp.add_pipe("registry_xf_transformer", config={"model": {**model, **settings}})
    nlp.initialize()
    return nlp


def test_spacy_doc_vector_settings(pairs: dict, checkpoints: dict[str, Path]) -> None:
    ours, theirs = pairs["mean-excluded"]
    texts = [t for t in TEXTS if t]
    for settings in ({}, {"prompt_name": "query", "truncate_dim": 12}):
        nlp = _spacy_nlp(checkpoints["mean-excluded"], **settings)
        vectors = np.stack([doc.vector for doc in nlp.pipe(texts)])
        expected = theirs.encode(
            texts, **{"normalize_embeddings": True, **settings}
        )  # short docs: one window each, so the doc vector is the sentence embedding
        np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(vectors, ours.embed(texts, **settings), atol=1e-5, rtol=0)
        assert nlp("the cat")[0].vector.shape == (32,)  # token vectors keep the full width


def test_spacy_bad_settings(checkpoints: dict[str, Path]) -> None:
    from registry_xf.errors import ConfigError

    source = checkpoints["mean-included"]
    with pytest.raises(ConfigError, match=r"model.prompt_name.*'qurey'.*Did you mean 'query'"):
        _spacy_nlp(source, prompt_name="qurey")
    with pytest.raises(ConfigError, match=r"model.truncate_dim.*expected 1 to 32"):
        _spacy_nlp(source, truncate_dim=40)
    with pytest.raises(Exception, match=r"model.truncate_dim.*at least 1"):
        _spacy_nlp(source, truncate_dim=0)


def test_prompt_texts_survive_save_and_load(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    source = shutil.copytree(checkpoints["mean-included"], tmp_path / "odd")
    settings_file = source / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text())
    odd = 'Instruct: find {x} "q" \\ [a] #b; c\n= '
    settings["prompts"].update({"odd": odd, "two words": "the "}, query=None)
    settings["truncate_dim"] = 24
    settings_file.write_text(json.dumps(settings))
    loaded = Embedder(str(source))
    assert loaded.prompts["odd"] == odd and loaded.prompts["query"] == ""
    rx.save(loaded.model, tmp_path / "saved")
    again = Embedder(str(tmp_path / "saved"))
    assert again.prompts == loaded.prompts and again.truncate_dim == 24
    assert again.embed(TEXTS, prompt_name="two words").shape == (len(TEXTS), 24)
    settings["prompts"].update(price="costs $5 or $$: ", dollars="$$$")
    settings_file.write_text(json.dumps(settings))
    loaded = Embedder(str(source))
    assert loaded.prompts["price"] == "costs $5 or $$: " and loaded.prompts["dollars"] == "$$$"
    for round_trip in range(2):  # dollars neither double nor vanish, save after save
        saved = rx.save(loaded.model, tmp_path / f"dollars{round_trip}")
        loaded = Embedder(str(saved))
        assert loaded.prompts["price"] == "costs $5 or $$: " and loaded.prompts["dollars"] == "$$$"
    settings["prompts"]["template"] = "fill ${x}: "
    settings_file.write_text(json.dumps(settings))
    with pytest.raises(UnsupportedModelError, match="prompt 'template' contains '\\$\\{'"):
        rx.load(str(source))
