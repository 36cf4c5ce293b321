"""A corpus file embedded on Ray Data into one Parquet file: ``registry-xf embed-corpus``.

The corpus is a text file (one text a line), or a column of a Parquet or JSONL file. The
driver reads it (so a remote cluster needs no access to the file) and cuts it into blocks
that the actors share; the embeddings come back in order and are written by the driver
into a hidden folder beside the destination, whose file replaces the destination only once
whole: a failed or killed run leaves the old file as it was.

The Parquet file has three columns: ``id`` (the text's position in the corpus, from 0;
blank lines of a text file are skipped and not counted), ``text`` and ``embedding`` (a
fixed-size list: float32, or int8/uint8 for quantised and packed-binary precisions).
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


def read_corpus(path: str | Path, fmt: str, column: str = "text") -> list[str]:
    """The texts of a corpus file; a missing file, a missing column or a value that is not
    a text is a RegistryXFError naming the file, the column and the row."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise RegistryXFError(f"{path}: {what}; expected a corpus file ({', '.join(FORMATS)})")
    if fmt == "lines":
        return _read_lines(path)
    if fmt == "parquet":
        return _read_parquet(path, column)
    return _read_jsonl(path, column)


def _read_lines(path: Path) -> list[str]:
    return [line for line in read_text(path, str(path)).splitlines() if line.strip()]


def _read_parquet(path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RegistryXFError(f"{path}: not a readable Parquet file ({e})") from None
    if column not in schema.names:
        raise RegistryXFError(
            f"{path}: no column {column!r} (--column); it has {', '.join(schema.names)}"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise RegistryXFError(f"{path}: column {column!r} holds {kind}, expected strings")
    try:
        values = pq.read_table(path, columns=[column]).column(column)
    except (OSError, pa.ArrowException) as e:
        raise RegistryXFError(f"{path}: column {column!r} cannot be read ({e})") from None
    if values.null_count:
        row = values.is_null().to_numpy(zero_copy_only=False).argmax()
        raise RegistryXFError(f"{path}: column {column!r}, row {row}: a null, expected a text")
    return values.to_pylist()


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts: list[str] = []
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
    except UnicodeDecodeError as e:
        raise RegistryXFError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RegistryXFError(f"{path}: cannot be read ({e.strerror or e})") from None
    return texts


def corpus_dataset(texts: list[str]) -> ray.data.Dataset:
    """A Dataset of ``texts`` (a column "text") in blocks that several actors can share."""
    import pyarrow as pa

    ray = import_ray()
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, math.ceil(len(texts) / 32)))
    table = pa.table({"text": pa.array(texts, pa.string())})
    blocks = [table.slice(start, rows) for start in range(0, len(texts), rows)]
    return ray.data.from_arrow(blocks)


def write_parquet(ds: ray.data.Dataset, out: str | Path, *, column: str = "embedding") -> int:
    """Write ``ds`` (texts and their embeddings, in order) to the Parquet file ``out``,
    numbering the rows from 0; atomically (the old file or the whole new one). Returns
    the number of rows."""
    import pyarrow.parquet as pq

    ray = import_ray()
    written = 0
    with atomic_file(out, overwrite=True) as folder:
        tmp = folder / Path(out).name
        writer: pq.ParquetWriter | None = None
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                table = _arrow_table(batch, written, column)
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


def _arrow_table(batch: dict[str, np.ndarray], first_id: int, column: str) -> pa.Table:
    import pyarrow as pa

    vectors = np.ascontiguousarray(batch[column])
    values = pa.array(vectors.reshape(-1))
    embeddings = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    ids = pa.array(np.arange(first_id, first_id + len(vectors), dtype=np.int64))
    texts = pa.array([str(text) for text in batch["text"]], pa.string())
    return pa.table({"id": ids, "text": texts, "embedding": embeddings})


def _first_part(error: BaseException) -> str:
    """An error's own message, without what Ray appends (its advice on retries, the
    remote traceback)."""
    text = str(error.args[0]) if error.args else str(error)
    return text.split("\nFailed to apply UDF transform")[0].strip()


def embed_corpus(texts: list[str], out: str | Path, source: str | Path, **options: Any) -> int:
    """Embed ``texts`` (from ``read_corpus``) into the Parquet file ``out`` on the Ray that
    is running (``ray.init`` first); ``options`` go to ``embed_dataset``. Returns the
    number of texts written."""
    if not texts:
        raise RegistryXFError("nothing to embed: the corpus has no texts")
    logger.info("embedding %d texts into %s", len(texts), out)
    ds = embed_dataset(corpus_dataset(texts), source, column="text", **options)
    return write_parquet(ds, out)
