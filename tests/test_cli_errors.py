"""User errors at the command line: one ``error:`` line on stderr and exit status 2, never
a traceback; nothing written where it should not be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, write_hf_checkpoint
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.cli import main
from registry_xf.generation import Generator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("cli-errors") / "bert", "bert")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM, saved by transformers, with a WordPiece tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        max_position_embeddings=64,
        initializer_range=0.2,
        eos_token_id=3,
    )
    directory = tmp_path_factory.mktemp("cli-errors") / "llama"
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def one_error(err: str, command: str) -> str:
    """The single error line of ``err`` (asserting that it is the only line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"registry-xf {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_out_that_cannot_be_written(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a directory")
    cases = {
        tmp_path / "missing" / "x.npy": "the directory",
        tmp_path: "is a directory; give a file name",
        a_file / "x.npy": "is not a directory",
        Path("/proc/x.npy"): "cannot be written",  # refused even to root
    }
    for out, expected in cases.items():
        argv = ["embed", "the cat", "--model", str(bert_dir), "--out", str(out)]
        assert main(argv) == 2, out
        captured = capsys.readouterr()
        line = one_error(captured.err, "embed")
        assert f"--out {out}" in line and expected in line
        assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt"]  # nothing left behind
    assert a_file.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_directory(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = ["embed", "x", "--model", str(bert_dir), "--out", str(locked / "x.npy")]
        assert main(argv) == 2
        assert "cannot be written" in one_error(capsys.readouterr().err, "embed")
    finally:
        locked.chmod(0o700)


def test_file_that_cannot_be_read(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"the cat\n\xff\xfe\x00\x80 sat\n")
    cases = {
        tmp_path / "missing.txt": "no such file",
        tmp_path: "is a directory, not a text file",
        binary: "not UTF-8 text (byte 0xff at offset 8)",
    }
    for file, expected in cases.items():
        assert main(["embed", "--model", str(bert_dir), "--file", str(file)]) == 2, file
        captured = capsys.readouterr()
        line = one_error(captured.err, "embed")
        assert f"--file {file}" in line and expected in line
        assert captured.out == ""


def test_written_out_replaces_the_old_file_whole(
    bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    out = tmp_path / "x.npy"
    out.write_bytes(b"old")
    assert main(["embed", "the cat", "a dog", "--model", str(bert_dir), "--out", str(out)]) == 0
    assert np.load(out).shape == (2, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    capsys.readouterr()


def test_generation_settings_at_the_edges(
    llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "5"]
    greedy = Generator(rx.load(llama_dir)).generate("the cat", max_new_tokens=5)[0]
    # a tiny temperature samples the most likely token: the greedy text
    assert main([*base, "--temperature", "1e-45", "--seed", str(2**64 - 1)]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy + "\n" and captured.err == ""
    for extra, expected in [
        (["--seed", str(2**64)], "seed: Input should be less than or equal to"),
        (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["--temperature", "nan"], "temperature: Input should be a finite number"),
        (["--temperature", "inf"], "temperature: Input should be a finite number"),
        (["--max-new-tokens", str(2**40)], "max_new_tokens: Input should be less than"),
        (["--temperature", "1", "--repetition-penalty", "1e-300"], "repetition_penalty"),
    ]:
        assert main([*base, *extra]) == 2, extra
        captured = capsys.readouterr()
        assert expected in one_error(captured.err, "generate") and captured.out == ""


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "registry_xf.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_real_process_ends_with_one_line_and_status_2(bert_dir: Path, tmp_path: Path) -> None:
    done = run_cli("embed", "--model", str(bert_dir), "--file", str(tmp_path / "nope.txt"))
    assert done.returncode == 2 and done.stdout == ""
    assert "no such file" in one_error(done.stderr, "embed")
    done = run_cli("generate", "x", "--model", str(bert_dir), "--seed", str(2**70))
    assert done.returncode == 2 and done.stdout == ""
    assert "seed" in one_error(done.stderr, "generate")
