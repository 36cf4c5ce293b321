"""The gate the CPU kernels' wrappers share: which reason wins, what is asked, what is
logged (once per reason)."""

from __future__ import annotations

import logging

import pytest

from registry_xf.layers import cpu_int8, cpu_kernels

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
