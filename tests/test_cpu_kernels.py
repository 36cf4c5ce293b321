"""The gate the CPU kernels' wrappers share: which reason wins, what is asked, what is
logged (once per reason)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from registry_xf.layers import cpu_int8, cpu_kernels, cpu_linear

SWITCH = "REGISTRY_XF_TEST_GATE"


def test_reasons_come_in_order_and_each_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[str] = []
    skip = cpu_kernels.OnceLog(logging.getLogger("gate-test"), "a kernel", "torch")

    def problem() -> str | None:
        asked.append("problem")
        return "a bad shape"

    def library() -> str:
        asked.append("library")
        return "no compiler"

    caplog.set_level(logging.DEBUG, logger="gate-test")
    monkeypatch.setenv(SWITCH, "off")
    for _ in range(3):
        assert (
            cpu_kernels.usable_library(SWITCH, library, skip, problem) == f"{SWITCH} turns it off"
        )
    assert asked == []  # the switch wins: neither the call nor the library is asked
    monkeypatch.setenv(SWITCH, "1")
    assert cpu_kernels.usable_library(SWITCH, library, skip, problem) == "a bad shape"
    assert asked == ["problem"]
    assert cpu_kernels.usable_library(SWITCH, library, skip) == "no compiler"
    assert cpu_kernels.usable_library(SWITCH, library, skip, lambda: None) == "no compiler"
    messages = [r.getMessage() for r in caplog.records if r.name == "gate-test"]
    assert messages == [
        f"a kernel not used: {SWITCH} turns it off; using torch",
        "a kernel not used: a bad shape; using torch",
        "a kernel not used: no compiler; using torch",
    ]
    levels = [r.levelno for r in caplog.records if r.name == "gate-test"]
    assert levels == [logging.INFO, logging.DEBUG, logging.INFO]


def test_the_library_comes_back_where_nothing_stands_in_the_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cpu_int8.SWITCH, raising=False)
    found = cpu_int8.library()
    skip = cpu_kernels.OnceLog(logging.getLogger("gate-test"), "int8", "torch")
    gated = cpu_kernels.usable_library(cpu_int8.SWITCH, cpu_int8.library, skip)
    if isinstance(found, str):
        assert gated == found  # this machine cannot build it: the same reason
    else:
        assert gated is found


def test_a_header_a_kernel_includes_is_part_of_its_cache_key(tmp_path: Path) -> None:
    """Editing a header that a kernel includes from its own folder (and the headers that
    one includes) gives the kernel a new library path, so a stale build is never loaded;
    the shipped kernels' shared header is found."""
    source = tmp_path / "kernel.cpp"
    source.write_text('#include <stdint.h>\n#include "outer.h"\nint f() { return OUTER; }\n')
    (tmp_path / "outer.h").write_text('#include "inner.h"\n#define OUTER INNER\n')
    (tmp_path / "inner.h").write_text("#define INNER 1\n")
    assert cpu_kernels.local_headers(source) == [tmp_path / "outer.h", tmp_path / "inner.h"]
    first = cpu_kernels.library_path(source, "c++")
    (tmp_path / "inner.h").write_text("#define INNER 2\n")
    second = cpu_kernels.library_path(source, "c++")
    assert second != first and second.parent == first.parent
    shipped = [cpu_int8.SOURCE, cpu_linear.SOURCE]
    for kernel_source in shipped:
        assert [h.name for h in cpu_kernels.local_headers(kernel_source)] == ["cpu_activations.h"]


def test_a_missing_header_is_a_reason_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cpu_kernels.unavailable_here() or shutil.which("c++") is None:
        pytest.skip("no kernel is built on this machine")
    source = tmp_path / "kernel_without_header.cpp"
    source.write_text('#include "gone.h"\nint f() { return 0; }\n')
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reason = cpu_kernels.load(source, "c++")
    assert isinstance(reason, str)
    assert "gone.h" in reason
