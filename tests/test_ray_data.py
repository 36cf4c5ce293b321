"""Corpus embedding on Ray Data against Embedder in one process, and its command line.

One local Ray for the module: 2 CPUs, its servers on 127.0.0.1 only, no dashboard, no usage
statistics; shut down at the end. Every wait on a Ray job is bounded (``within``), so a job
that hangs fails its test instead of the suite.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import minilm_dir, requires_minilm, write_hf_checkpoint
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.errors import InputError, MissingExtraError, RegistryXFError
from registry_xf.pipelines.ray_data import actor_placement

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from registry_xf.cli import main  # noqa: E402
from registry_xf.pipelines import ray_corpus  # noqa: E402
from registry_xf.pipelines.ray_data import embed_dataset, start_local_ray  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 240  # far above what a job takes on 2 busy cores; a hang fails instead
WORDS = "the cat sat on a mat while dogs ran and birds sang over green hills at dawn".split()


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, or a failure if it has not returned after ``seconds`` (a hung Ray job)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the Ray job did not finish within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 1 to 40 words (a few empty ones too): batches of mixed lengths."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(n)]
    texts[7] = ""
    return texts


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    start_local_ray(2, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default model where installed, else a tiny BERT with a tokenizer."""
    found = minilm_dir()
    if found is not None:
        return str(found)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "bert", "bert")
    write_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def embedder(source: str) -> rx.Embedder:
    return rx.Embedder(source)


def assert_same_embeddings(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    real = norms > 0  # an empty text: zeros on both sides
    np.testing.assert_array_equal(got[~real], expected[~real])
    cosine = (got[real] * expected[real]).sum(1) / norms[real]
    assert cosine.min() >= 0.99999, cosine.min()


@pytest.mark.usefixtures("local_ray")
def test_ray_data_equals_embedder_in_order(source: str, embedder: rx.Embedder) -> None:
    texts = corpus(500)
    ds = ray.data.from_items([{"i": i, "text": text} for i, text in enumerate(texts)])
    embedded = embed_dataset(ds, source, concurrency=2, batch_size=32, batch_tokens=256)
    rows = within(JOB_TIMEOUT_S, embedded.take_all)
    assert [row["i"] for row in rows] == list(range(len(texts)))
    assert [row["text"] for row in rows] == texts
    got = np.stack([row["embedding"] for row in rows])
    assert got.dtype == np.float32
    assert_same_embeddings(got, embedder.embed(texts))
    assert not ds.context.execution_options.preserve_order  # the input's context is its own


@pytest.mark.usefixtures("local_ray")
def test_a_value_that_is_not_a_text_fails_the_job_with_an_input_error(source: str) -> None:
    rows: list[dict[str, Any]] = [{"i": i, "text": text} for i, text in enumerate(corpus(60))]
    rows[41]["text"] = None  # a null in a text column, as Parquet files have
    embedded = embed_dataset(
        ray.data.from_items(rows), source, concurrency=1, batch_size=16, id_column="i"
    )
    with pytest.raises(InputError) as caught:
        within(JOB_TIMEOUT_S, embedded.materialize)
    assert "column 'text', row i=41: expected a text (str), found NoneType None" in str(
        caught.value
    )


@pytest.mark.usefixtures("local_ray")
def test_settings_that_would_fail_every_actor_are_refused_before_any_starts(source: str) -> None:
    ds = ray.data.from_items([{"text": "a"}])
    with pytest.raises(InputError, match="precision='int8' over a dataset needs ranges="):
        embed_dataset(ds, source, precision="int8")
    with pytest.raises(InputError, match="output_column='text' is the text column"):
        embed_dataset(ds, source, output_column="text")
    with pytest.raises(InputError, match="unknown settings prompt_nme"):
        embed_dataset(ds, source, prompt_nme="query")
    with pytest.raises(InputError, match=r"concurrency=0: expected a number of actors >= 1"):
        embed_dataset(ds, source, concurrency=0)
    with pytest.raises(InputError, match="num_gpus=1 with device='cpu'"):
        embed_dataset(ds, source, device="cpu", num_gpus=1)


def test_actors_go_where_the_cluster_has_room() -> None:
    cpu = actor_placement({"CPU": 8.0})
    assert (cpu.device, cpu.num_gpus, cpu.num_cpus, cpu.concurrency, cpu.threads) == (
        None,
        0.0,
        1.0,
        8,
        1,
    )
    wide = actor_placement({"CPU": 8.0}, num_cpus=4)
    assert (wide.concurrency, wide.threads) == (2, 4)
    gpu = actor_placement({"CPU": 16.0, "GPU": 4.0})
    assert (gpu.device, gpu.num_gpus, gpu.concurrency) == ("cuda", 1.0, 4)
    shared = actor_placement({"CPU": 16.0, "GPU": 2.0}, num_gpus=0.5)
    assert (shared.device, shared.concurrency) == ("cuda", 4)
    forced_cpu = actor_placement({"CPU": 16.0, "GPU": 2.0}, device="cpu", concurrency=(1, 3))
    assert (forced_cpu.device, forced_cpu.num_gpus, forced_cpu.concurrency) == ("cpu", 0.0, (1, 3))
    with pytest.raises(InputError, match="num_gpus=0 with device='cuda'"):
        actor_placement({"GPU": 1.0}, device="cuda", num_gpus=0)
    with pytest.raises(InputError, match="num_cpus=0: expected a number > 0"):
        actor_placement({"CPU": 2.0}, num_cpus=0)


def test_without_ray_the_library_works_and_names_the_extra() -> None:
    """In a fresh interpreter where ``import ray`` fails: registry_xf, its CLI and this
    module import; the Ray functions raise MissingExtraError naming registry-xf[ray]."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import registry_xf, registry_xf.cli\n"
        "from registry_xf.pipelines import ray_corpus, ray_data\n"
        "from registry_xf.errors import MissingExtraError\n"
        "try:\n"
        "    ray_data.embed_dataset(None)\n"
        "except MissingExtraError as e:\n"
        "    print('error:', e)\n"
        "print('ray' in sys.modules and sys.modules['ray'] is not None)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    error, imported = done.stdout.strip().splitlines()
    assert "pip install 'registry-xf[ray]'" in error
    assert imported == "False"
    assert issubclass(MissingExtraError, RegistryXFError) and issubclass(
        MissingExtraError, ImportError
    )


@pytest.mark.usefixtures("local_ray")
def test_the_local_ray_listens_on_loopback_only() -> None:
    psutil = pytest.importorskip("psutil")
    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.pid in ours and c.status == psutil.CONN_LISTEN
    ]
    assert listening, "found no listening socket of the Ray processes"
    elsewhere = [c.laddr for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not elsewhere, f"Ray listens beyond the loopback interface: {elsewhere}"


def read_parquet(path: Path) -> tuple[list[int], list[str], np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column_names == ["id", "text", "embedding"]
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    return table.column("id").to_pylist(), table.column("text").to_pylist(), vectors


@pytest.mark.usefixtures("local_ray")
def test_cli_writes_a_parquet_file_that_reads_back_equal(
    source: str, embedder: rx.Embedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [text for text in corpus(80, seed=1) if text]
    lines = tmp_path / "corpus.txt"
    lines.write_text("\n\n".join(texts[:10]) + "\n" + "\n".join(texts[10:]) + "\n", "utf8")
    out = tmp_path / "embeddings.parquet"
    argv = ["embed-corpus", str(lines), "--out", str(out), "--model", source]
    code = within(JOB_TIMEOUT_S, lambda: main([*argv, "--concurrency", "1", "--batch-size", "8"]))
    assert code == 0, capsys.readouterr().err
    assert f"wrote {len(texts)} embeddings to {out}" in capsys.readouterr().out
    ids, written, vectors = read_parquet(out)
    assert ids == list(range(len(texts)))
    assert written == texts  # blank lines skipped
    assert_same_embeddings(vectors, embedder.embed(texts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "embeddings.parquet"]


@pytest.mark.usefixtures("local_ray")
def test_a_failed_run_leaves_the_existing_destination_as_it_was(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "embeddings.parquet"
    out.write_bytes(b"the previous file")
    # a Parquet corpus whose texts are fine, and a prompt name the model does not have:
    # every actor fails as it starts
    corpus_file = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": corpus(20)}), corpus_file)
    argv = ["embed-corpus", str(corpus_file), "--out", str(out), "--model", source]
    argv += ["--column", "body", "--prompt-name", "no-such-prompt", "--concurrency", "1"]
    assert within(JOB_TIMEOUT_S, lambda: main(argv)) == 2
    assert "prompt_name='no-such-prompt': no such prompt" in capsys.readouterr().err
    assert out.read_bytes() == b"the previous file"

    # a job that fails after some batches were written: the rows after 150 include a null
    rows: list[dict[str, Any]] = [{"text": text} for text in corpus(200, seed=2)]
    rows[170]["text"] = None
    embedded = embed_dataset(ray.data.from_items(rows), source, concurrency=1, batch_size=16)
    with pytest.raises(RegistryXFError, match="expected a text"):
        within(JOB_TIMEOUT_S, lambda: ray_corpus.write_parquet(embedded, out))
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.parquet", "embeddings.parquet"]


@pytest.mark.usefixtures("local_ray")
def test_ids_of_an_id_column_travel_with_their_texts(
    source: str, embedder: rx.Embedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [text for text in corpus(40, seed=3) if text]
    keys = [f"doc-{len(texts) - i}" for i in range(len(texts))]  # not sorted as the texts
    jsonl = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"key": k, "body": t}) for k, t in zip(keys, texts, strict=True)]
    jsonl.write_text("\n".join(rows) + "\n", "utf8")
    out = tmp_path / "embeddings.parquet"
    argv = ["embed-corpus", str(jsonl), "--out", str(out), "--model", source]
    argv += ["--column", "body", "--id-column", "key", "--concurrency", "1", "--batch-size", "8"]
    assert within(JOB_TIMEOUT_S, lambda: main(argv)) == 0, capsys.readouterr().err
    ids, written, vectors = read_parquet(out)
    assert ids == keys and written == texts
    assert_same_embeddings(vectors, embedder.embed(texts))


def test_id_columns_are_read_and_checked(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    read = ray_corpus.read_corpus_with_ids
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "n": pa.array([7, 3], pa.int32())}), parquet)
    assert read(parquet, "parquet", id_column="n") == (["a", "b"], [7, 3])
    assert read(parquet, "parquet") == (["a", "b"], None)
    with pytest.raises(RegistryXFError, match=r"no column 'key' \(--id-column\); it has text, n"):
        read(parquet, "parquet", id_column="key")
    with pytest.raises(RegistryXFError, match=r"'text' is also the text column"):
        read(parquet, "parquet", id_column="text")
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": [1.0, 2.0, 3.0]}), parquet)
    with pytest.raises(RegistryXFError, match=r"id column 'n' holds double, expected integers"):
        read(parquet, "parquet", id_column="n")
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": ["x", None, "y"]}), parquet)
    with pytest.raises(RegistryXFError, match=r"column 'n', row 1: a null, expected an id"):
        read(parquet, "parquet", id_column="n")
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": ["x", "y", "x"]}), parquet)
    with pytest.raises(RegistryXFError, match=r"'x' at rows 0 and 2; expected every id once"):
        read(parquet, "parquet", id_column="n")

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a", "id": 1}\n\n{"text": "b", "id": 2}\n', "utf8")
    assert read(jsonl, "jsonl", id_column="id") == (["a", "b"], [1, 2])
    jsonl.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": "2"}\n', "utf8")
    with pytest.raises(RegistryXFError, match=r"line 2: id 'id' is str, expected an integer \(as"):
        read(jsonl, "jsonl", id_column="id")
    jsonl.write_text('{"text": "a", "id": true}\n', "utf8")
    with pytest.raises(RegistryXFError, match=r"line 1: id 'id' is bool, expected an integer or"):
        read(jsonl, "jsonl", id_column="id")
    jsonl.write_text('{"text": "a", "id": 1}\n{"text": "b"}\n', "utf8")
    with pytest.raises(RegistryXFError, match=r"line 2: no id 'id' \(--id-column\)"):
        read(jsonl, "jsonl", id_column="id")
    lines = tmp_path / "corpus.txt"
    lines.write_text("a\nb\n", "utf8")
    with pytest.raises(RegistryXFError, match=r"needs a Parquet or JSONL corpus"):
        read(lines, "lines", id_column="id")


def test_corpus_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "n": 1}\n', "utf8")
    assert ray_corpus.read_corpus(jsonl, "jsonl") == ["a", "b"]
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n{"body": "c"}\n', "utf8")
    with pytest.raises(RegistryXFError, match=r"corpus.jsonl, line 4: expected an object with"):
        ray_corpus.read_corpus(jsonl, "jsonl")
    jsonl.write_text('{"text": "a"}\n{"text": 3}\n', "utf8")
    with pytest.raises(RegistryXFError, match=r"line 2: 'text' is int, expected a text"):
        ray_corpus.read_corpus(jsonl, "jsonl")
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["a", None], "n": [1, 2]}), parquet)
    with pytest.raises(RegistryXFError, match=r"column 'text', row 1: a null"):
        ray_corpus.read_corpus(parquet, "parquet")
    with pytest.raises(RegistryXFError, match=r"column 'n' holds int64, expected strings"):
        ray_corpus.read_corpus(parquet, "parquet", "n")
    with pytest.raises(RegistryXFError, match=r"no column 'body' \(--column\); it has text, n"):
        ray_corpus.read_corpus(parquet, "parquet", "body")
    assert ray_corpus.corpus_format(parquet) == "parquet"
    assert ray_corpus.corpus_format(tmp_path / "x.txt") == "lines"


@requires_minilm
@pytest.mark.usefixtures("local_ray")
def test_the_ray_snippets_of_the_scaling_page_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks marked ``python no-run ray`` in docs/scaling.md, in this module's Ray (the
    docs test skips them: it would start a Ray of its own)."""
    from test_docs import blocks

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_scaling"}
    ran = []
    for block in blocks(ROOT / "docs" / "scaling.md"):
        if block.language == "python" and "ray" in block.words[1:]:
            code = compile(block.code, f"docs/scaling.md:{block.line}", "exec")
            within(JOB_TIMEOUT_S, lambda code=code: exec(code, namespace))
            ran.append(block.line)
    assert len(ran) == 2, ran
    assert str(namespace["packed"].take(1)[0]["embedding"].dtype) == "int8"
