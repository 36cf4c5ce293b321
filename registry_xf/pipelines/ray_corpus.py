"""A corpus file embedded on Ray Data into one Parquet file: ``registry-xf embed-corpus``.

The corpus is a text file (one text a line), or a column of a Parquet or JSONL file. The
driver reads it (so a remote cluster needs no access to the file) and cuts it into blocks
that the actors share; the embeddings come back in order and are written by the driver
into a hidden folder beside the destination, whose file replaces the destination only once
whole: a failed or killed run leaves the old file as it was.

The Parquet file has three columns: ``id`` (the text's position in the corpus, from 0;
blank lines of a text file are skipped and not counted; or, with an id column of a Parquet
or JSONL corpus, that column's values), ``text`` and ``embedding`` (a fixed-size list:
float32, or int8/uint8 for quantised and packed-binary precisions).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RegistryXFError
from ..loading.atomic import atomic_file
from .ray_data import embed_dataset, import_ray, registry_error
from .text_files import read_text

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

FORMATS = ("lines", "parquet", "jsonl")
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Rows per block handed to Ray: enough blocks for every actor to stay busy, few enough that
# Ray's bookkeeping stays small on a large corpus.
MIN_BLOCK_ROWS = 64
MAX_BLOCK_ROWS = 4096

logger = logging.getLogger(__name__)


def corpus_format(path: str | Path, given: str | None = None) -> str:
    """``given``, else the format that the file's suffix says (a text file otherwise)."""
    if given is not None:
        if given not in FORMATS:
            raise RegistryXFError(f"--format {given}: expected one of {', '.join(FORMATS)}")
        return given
    return SUFFIXES.get(Path(path).suffix.lower(), "lines")


Ids = list[int] | list[str]
_ID_KINDS = {int: "an integer", str: "a text"}


def read_corpus(path: str | Path, fmt: str, column: str = "text") -> list[str]:
    """The texts of a corpus file; a missing file, a missing column or a value that is not
    a text is a RegistryXFError naming the file, the column and the row."""
    return read_corpus_with_ids(path, fmt, column)[0]


def read_corpus_with_ids(
    path: str | Path, fmt: str, column: str = "text", id_column: str | None = None
) -> tuple[list[str], Ids | None]:
    """The texts of a corpus file and, with ``id_column``, the id of each: integers or
    texts (one kind for the whole column), every one present and none repeated. Only
    Parquet and JSONL files have an id column."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise RegistryXFError(f"{path}: {what}; expected a corpus file ({', '.join(FORMATS)})")
    if id_column is not None and fmt == "lines":
        raise RegistryXFError(
            f"{path}: --id-column {id_column!r} needs a Parquet or JSONL corpus; a text file "
            "has no columns (its ids are the line positions)"
        )
    if id_column is not None and id_column == column:
        raise RegistryXFError(f"--id-column {id_column!r} is also the text column (--column)")
    if fmt == "lines":
        return _read_lines(path), None
    if fmt == "parquet":
        texts, ids = _read_parquet(path, column, id_column)
    else:
        texts, ids = _read_jsonl(path, column, id_column)
    if ids is not None:
        _check_unique(ids, path, id_column)
    return texts, ids


def _check_unique(ids: Ids, path: Path, id_column: str | None) -> None:
    first_row: dict[int | str, int] = {}
    for row, value in enumerate(ids):
        seen = first_row.setdefault(value, row)
        if seen != row:
            raise RegistryXFError(
                f"{path}: id column {id_column!r}: {value!r} at rows {seen} and {row}; "
                "expected every id once"
            )


def _read_lines(path: Path) -> list[str]:
    return [line for line in read_text(path, str(path)).splitlines() if line.strip()]


def _read_parquet(path: Path, column: str, id_column: str | None) -> tuple[list[str], Ids | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RegistryXFError(f"{path}: not a readable Parquet file ({e})") from None
    wanted = {column: "--column", **({id_column: "--id-column"} if id_column else {})}
    for name, option in wanted.items():
        if name not in schema.names:
            raise RegistryXFError(
                f"{path}: no column {name!r} ({option}); it has {', '.join(schema.names)}"
            )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise RegistryXFError(f"{path}: column {column!r} holds {kind}, expected strings")
    if id_column is not None:
        kind = schema.field(id_column).type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind)):
            raise RegistryXFError(
                f"{path}: id column {id_column!r} holds {kind}, expected integers or strings"
            )
    try:
        table = pq.read_table(path, columns=list(wanted))
    except (OSError, pa.ArrowException) as e:
        raise RegistryXFError(f"{path}: columns {list(wanted)} cannot be read ({e})") from None
    for name in wanted:
        values = table.column(name)
        if values.null_count:
            row = values.is_null().to_numpy(zero_copy_only=False).argmax()
            expected = "a text" if name == column else "an id"
            raise RegistryXFError(
                f"{path}: column {name!r}, row {row}: a null, expected {expected}"
            )
    ids = table.column(id_column).to_pylist() if id_column is not None else None
    return table.column(column).to_pylist(), ids


def _read_jsonl(path: Path, column: str, id_column: str | None) -> tuple[list[str], Ids | None]:
    texts: list[str] = []
    ids: list = []
    id_kind: type | None = None
    try:
        with path.open(encoding="utf8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise RegistryXFError(f"{where}: not JSON ({e})") from None
                if not isinstance(record, dict) or column not in record:
                    found = (
                        f"keys {', '.join(map(repr, record))}"
                        if isinstance(record, dict)
                        else type(record).__name__
                    )
                    raise RegistryXFError(
                        f"{where}: expected an object with the key {column!r} (--column), "
                        f"found {found}"
                    )
                text = record[column]
                if not isinstance(text, str):
                    raise RegistryXFError(
                        f"{where}: {column!r} is {type(text).__name__}, expected a text"
                    )
                texts.append(text)
                if id_column is None:
                    continue
                if id_column not in record:
                    raise RegistryXFError(f"{where}: no id {id_column!r} (--id-column)")
                value = record[id_column]
                kind = type(value)
                if kind not in (int, str) or kind is not (id_kind or kind):
                    expected = (
                        f"{_ID_KINDS[id_kind]} (as on the first line)"
                        if id_kind
                        else "an integer or a text"
                    )
                    raise RegistryXFError(
                        f"{where}: id {id_column!r} is {kind.__name__}, expected {expected}"
                    )
                id_kind = kind
                ids.append(value)
    except UnicodeDecodeError as e:
        raise RegistryXFError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RegistryXFError(f"{path}: cannot be read ({e.strerror or e})") from None
    return texts, (ids if id_column is not None else None)


def corpus_dataset(texts: list[str]) -> ray.data.Dataset:
    """A Dataset of ``texts`` (a column "text") in blocks that several actors can share."""
    import pyarrow as pa

    ray = import_ray()
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, math.ceil(len(texts) / 32)))
    table = pa.table({"text": pa.array(texts, pa.string())})
    blocks = [table.slice(start, rows) for start in range(0, len(texts), rows)]
    return ray.data.from_arrow(blocks)


def write_parquet(
    ds: ray.data.Dataset, out: str | Path, *, column: str = "embedding", ids: Ids | None = None
) -> int:
    """Write ``ds`` (texts and their embeddings, in order) to the Parquet file ``out``,
    with the rows' ``ids`` (default: numbered from 0); atomically (the old file or the
    whole new one). Returns the number of rows."""
    import pyarrow.parquet as pq

    ray = import_ray()
    written = 0
    with atomic_file(out, overwrite=True) as folder:
        tmp = folder / Path(out).name
        writer: pq.ParquetWriter | None = None
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                table = _arrow_table(batch, written, column, ids)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                written += table.num_rows
        except ray.exceptions.RayError as e:
            cause = registry_error(e)
            if cause is not None:
                raise RegistryXFError(_first_part(cause)) from None
            raise RegistryXFError(f"the Ray job failed: {_first_part(e)}") from None
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise RegistryXFError("nothing to embed: the corpus has no texts")
    return written


def _arrow_table(
    batch: dict[str, np.ndarray], first: int, column: str, ids: Ids | None
) -> pa.Table:
    import pyarrow as pa

    vectors = np.ascontiguousarray(batch[column])
    values = pa.array(vectors.reshape(-1))
    embeddings = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    if ids is None:
        row_ids = pa.array(np.arange(first, first + len(vectors), dtype=np.int64))
    else:
        chosen = ids[first : first + len(vectors)]
        row_ids = pa.array(chosen, pa.string() if isinstance(ids[0], str) else pa.int64())
    texts = pa.array([str(text) for text in batch["text"]], pa.string())
    return pa.table({"id": row_ids, "text": texts, "embedding": embeddings})


def _first_part(error: BaseException) -> str:
    """An error's own message, without what Ray appends (its advice on retries, the
    remote traceback)."""
    text = str(error.args[0]) if error.args else str(error)
    return text.split("\nFailed to apply UDF transform")[0].strip()


def embed_corpus(
    texts: list[str], out: str | Path, source: str | Path, *, ids: Ids | None = None, **options: Any
) -> int:
    """Embed ``texts`` (from ``read_corpus``) into the Parquet file ``out`` on the Ray that
    is running (``ray.init`` first), with their ``ids`` (default: positions from 0);
    ``options`` go to ``embed_dataset``. Returns the number of texts written."""
    if not texts:
        raise RegistryXFError("nothing to embed: the corpus has no texts")
    if ids is not None and len(ids) != len(texts):
        raise RegistryXFError(f"{len(ids)} ids for {len(texts)} texts: expected one id a text")
    logger.info("embedding %d texts into %s", len(texts), out)
    ds = embed_dataset(corpus_dataset(texts), source, column="text", **options)
    return write_parquet(ds, out, ids=ids)
