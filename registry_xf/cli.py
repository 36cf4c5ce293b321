"""The ``registry-xf`` command: embed texts, generate text, list and show components,
print configs."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import RegistryXFError

PROGRESS_FROM = 256  # texts; fewer finish before a bar would help
# under torchrun, these load the model sharded over every process (see docs/scaling.md)
SHARDED_COMMANDS = ("generate", "embed")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--hyper.n_layers 4`` / ``--model.x=y`` out of ``argv`` as config overrides.

    Options with a dot in their name are overrides (the CLI's own have none); values are
    read as JSON where they parse (4, true, null, [1, 2]) and as strings otherwise.
    """
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    items = list(argv)
    while items:
        item = items.pop(0)
        name = item[2:].split("=", 1)[0]
        if not (item.startswith("--") and "." in name):
            rest.append(item)
            continue
        if "=" in item:
            value = item.split("=", 1)[1]
        elif items:
            value = items.pop(0)
        else:
            raise RegistryXFError(f"override --{name} has no value")
        try:
            overrides[name] = json.loads(value)
        except ValueError:
            overrides[name] = value
    return rest, overrides


def _load_model(args: argparse.Namespace, overrides: dict[str, Any], **options: Any) -> Any:
    """The model of ``--model`` with the options every loading command shares."""
    from .loading.load import load

    return load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        overrides=overrides,
        revision=args.revision,
        device_mesh=getattr(args, "device_mesh", None),
        **options,
    )


def _rank(args: argparse.Namespace) -> int:
    """This process's rank in the command's mesh (0 when not under torchrun)."""
    mesh = getattr(args, "device_mesh", None)
    return 0 if mesh is None else int(mesh.get_rank())


def _given_texts(given: Sequence[str], file: str | None, nothing: str) -> list[str]:
    """The texts on the command line, then the non-blank lines of ``--file``; ``nothing``
    is the error when there are none."""
    texts = list(given)
    if file:
        texts += [line for line in _read_text_file(file).splitlines() if line.strip()]
    if not texts:
        raise RegistryXFError(nothing)
    return texts


def _cmd_embed(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import numpy as np

    from .pipelines.embedder import Embedder
    from .pipelines.quantization import check_precision, hamming_similarity

    texts = _given_texts(args.texts, args.file, "nothing to embed: give texts or --file")
    out = _writable_out(args.out) if args.out else None  # checked before the slow part
    check_precision(args.precision)
    calibration = _read_calibration(args.calibration) if args.calibration else None
    # a task checkpoint's encoder: its head is not needed for embeddings
    model = _load_model(args, overrides, head=False)
    embedder = Embedder(model, batch_tokens=args.batch_tokens)
    vectors = embedder.embed(
        texts,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        truncate_dim=args.truncate_dim,
        precision=args.precision,
        calibration_embeddings=calibration,
        progress=len(texts) >= PROGRESS_FROM and sys.stderr.isatty(),
    )
    if out is not None:
        if _rank(args) == 0:  # one writer under torchrun
            _save_atomically(out, vectors)
        print(f"wrote {len(texts)} embeddings of width {vectors.shape[1]} to {out}")
        return 0
    print(f"{len(texts)} embeddings of width {vectors.shape[1]} ({args.model})\n")
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        head = " ".join(f"{x:+.3f}" for x in vector[:4])
        print(f"[{i}] {_short(text, 50):50}  [{head} ...]  norm {np.linalg.norm(vector):.3f}")
    if 1 < len(texts) <= 12 and args.precision in ("float32", "binary", "ubinary"):
        if args.precision == "float32":
            unit = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
            sims, kind = unit @ unit.T, "cosine"
        else:
            width = args.truncate_dim or embedder.truncate_dim or embedder.model.width
            sims, kind = hamming_similarity(vectors, vectors, width=width), "hamming"
        print(f"\n{kind} similarity")
        print("      " + "".join(f"[{j}]".rjust(7) for j in range(len(texts))))
        for i, row in enumerate(sims):
            print(f"[{i}]".ljust(6) + "".join(f"{x:7.3f}" for x in row))
        if len(texts) > 2:
            masked = sims - 2 * np.eye(len(texts))
            i, j = np.unravel_index(np.argmax(masked), masked.shape)
            print(f"\nclosest pair: [{i}] and [{j}] ({sims[i, j]:.3f})")
    return 0


def _cmd_embed_corpus(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .pipelines import ray_corpus, ray_data
    from .pipelines.quantization import check_precision, quantization_ranges

    out = _writable_out(args.out)  # checked before the slow part
    check_precision(args.precision)
    if args.precision in ("int8", "uint8") and not args.calibration:
        raise RegistryXFError(
            f"--precision {args.precision} needs --calibration (a .npy of float embeddings of "
            "a sample): every batch must be quantised over the same ranges"
        )
    ranges = quantization_ranges(_read_calibration(args.calibration)) if args.calibration else None
    fmt = ray_corpus.corpus_format(args.input, args.format)
    # the file's errors before Ray starts
    texts, ids = ray_corpus.read_corpus_with_ids(args.input, fmt, args.column, args.id_column)
    if not texts:
        raise RegistryXFError(f"{args.input}: nothing to embed, the corpus has no texts")
    ray = ray_data.import_ray()
    started = not ray.is_initialized()
    if started and args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    elif started:
        ray_data.start_local_ray(args.num_cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    try:
        written = ray_corpus.embed_corpus(
            texts,
            out,
            args.model,
            ids=ids,
            revision=args.revision,
            device=args.device,
            dtype=args.dtype,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            num_gpus=args.gpus_per_actor,
            num_cpus=args.cpus_per_actor,
            batch_tokens=args.batch_tokens,
            prompt=args.prompt,
            prompt_name=args.prompt_name,
            truncate_dim=args.truncate_dim,
            precision=args.precision,
            ranges=ranges,
        )
    finally:
        if started:
            ray.shutdown()
    print(f"wrote {written} embeddings to {out}")
    return 0


def _read_calibration(name: str) -> Any:
    """Float embeddings (n, width) from a .npy file, read without unpickling."""
    import numpy as np

    try:
        data = np.load(name, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RegistryXFError(f"--calibration {name}: not a readable .npy file ({e})") from None
    if data.ndim != 2 or data.dtype.kind != "f":
        raise RegistryXFError(
            f"--calibration {name}: expected float embeddings (n, width), found {data.dtype} "
            f"of shape {data.shape}"
        )
    return data


def _read_text_file(name: str) -> str:
    """The UTF-8 text of ``--file``; a missing, unreadable or binary file is a user error."""
    from .pipelines.text_files import read_text

    return read_text(name, f"--file {name}")


def _writable_out(name: str) -> Path:
    """``--out`` as a path whose directory exists and can be written, and that is not a
    directory or a read-only file (checked before any work, so that none is lost)."""
    import os

    out = Path(name)
    parent = out.parent
    if out.is_dir():
        raise RegistryXFError(
            f"--out {name}: is a directory; give a file name, such as {out / 'embeddings.npy'}"
        )
    if not parent.exists():
        raise RegistryXFError(f"--out {name}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise RegistryXFError(f"--out {name}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RegistryXFError(f"--out {name}: the directory {parent} cannot be written")
    if out.exists() and not os.access(out, os.W_OK):
        raise RegistryXFError(f"--out {name}: the file is read-only")
    return out


def _save_atomically(out: Path, vectors: Any) -> None:
    """Write ``vectors`` to ``out`` as .npy: a temporary file beside it, then a rename, so
    that ``out`` holds the old file or the whole new one at every instant."""
    import contextlib
    import os
    import tempfile

    import numpy as np

    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, vectors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise RegistryXFError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _cmd_classify(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .pipelines.classifier import Classifier

    texts = _given_texts(args.texts, args.file, "nothing to classify: give texts or --file")
    if args.top_k < 1:
        raise RegistryXFError(f"--top-k must be at least 1; got {args.top_k}")
    model = _load_model(args, overrides)
    classifier = Classifier(model)
    if classifier.task == "token_classification":
        for i, (text, pieces) in enumerate(zip(texts, classifier.tag(texts), strict=True)):
            print(f"[{i}] {text}")
            for p in pieces:
                print(f"    {text[p.start : p.end]:20} {p.piece:20} {p.label:12} {p.score:.3f}")
        return 0
    results = classifier.classify(texts, top_k=args.top_k)
    for i, (text, labels) in enumerate(zip(texts, results, strict=True)):
        scored = "  ".join(f"{r.label} {r.score:.3f}" for r in labels)
        print(f"[{i}] {_short(text, 50):50}  {scored}")
    return 0


def _cmd_rerank(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .pipelines.cross_encoder import CrossEncoder

    documents = _given_texts(
        args.documents, args.file, "no documents to rerank: give documents after QUERY or --file"
    )
    if args.top_k is not None and args.top_k < 1:
        raise RegistryXFError(f"--top-k must be at least 1; got {args.top_k}")
    model = _load_model(args, overrides)
    for ranked in CrossEncoder(model).rank(args.query, documents, top_k=args.top_k):
        print(f"[{ranked.index}] {ranked.score:.4f} {ranked.document}")
    return 0


GENERATION_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "stop",
    "seed",
)


def _cmd_generate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .generation import GenerationSettings, Generator

    settings = {
        name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None
    }
    GenerationSettings(**settings)  # bad settings fail before the model is loaded
    model = _load_model(args, overrides)
    generator = Generator(model, compile=args.compile, cuda_graphs=args.cuda_graphs)
    for piece in generator.stream(args.prompt, **settings):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd_list(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .registry import REGISTRY_NAMES, registry

    names = [args.registry] if args.registry else list(REGISTRY_NAMES)
    for name in names:
        reg = registry.get_registry(name)
        print(f"{name}:")
        for entry in reg.names():
            doc = (inspect.getdoc(reg.get(entry)) or "").split("\n")[0]
            print(f"  {entry:40} {doc}")
    return 0


def _cmd_show(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .errors import did_you_mean
    from .registry import REGISTRY_NAMES, registry

    every = []
    for reg_name in REGISTRY_NAMES:
        reg = registry.get_registry(reg_name)
        every += reg.names()
        if args.name in reg.names():
            func = inspect.unwrap(reg.get(args.name))
            print(f'@{reg_name} = "{args.name}"')
            print(f"{func.__module__}.{func.__qualname__}{inspect.signature(func)}\n")
            print(inspect.getdoc(func) or "(no documentation)")
            return 0
    raise RegistryXFError(f"'{args.name}' is not registered." + did_you_mean(args.name, every))


def _cmd_config(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .config.resolve import fill, interpolate
    from .loading.sources import config_from_source

    found = config_from_source(args.source, overrides=overrides, revision=args.revision)
    config = fill(found.config, source=found.where)
    # Config.to_str(interpolate=True) writes ${...} variables unchanged: substitute them here.
    print((config if args.keep_variables else interpolate(config)).to_str(interpolate=False))
    return 0


def _cmd_fetch(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .loading import hub

    for source in args.ids:
        if not args.dry_run:
            print(f"{source}: {hub.fetch(source, args.revision)}")
            continue
        plan = hub.plan(source, revision=args.revision)
        print(
            f"{plan.repo_id}@{plan.revision} (commit {plan.commit}): {len(plan.files)} files, "
            f"{hub.human_size(plan.total_bytes)}; "
            f"{hub.human_size(plan.missing_bytes)} to download"
        )
        for file in plan.files:
            cached = "  (cached)" if file.cached else ""
            print(f"  {file.name:48} {hub.human_size(file.size):>10}{cached}")
    return 0


def _cmd_export_onnx(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .loading.onnx_export import export_onnx

    model = _load_model(args, overrides, head=False)
    path = export_onnx(model, args.out, pooled=args.pooled, overwrite=args.overwrite)
    print(path)
    return 0


def make_parser() -> argparse.ArgumentParser:
    from .loading.sources import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="registry-xf",
        description="Transformer models from registered components and config files.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading does")
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser(
        "embed",
        help="sentence embeddings of texts",
        description="Embed texts; config overrides may follow as --section.key VALUE.",
    )
    embed.add_argument("texts", nargs="*", help="texts to embed")
    embed.add_argument("--file", help="a text file, one text per line")
    embed.add_argument("--out", help="write the embeddings to this .npy file")
    embed.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a Hub id (org/name[@revision]), a model directory, a package or a .cfg",
    )
    embed.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    embed.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    embed.add_argument("--dtype", default=None, help="auto (default), float32, float16, bfloat16")
    embed.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch")
    embed.add_argument("--prompt-name", help="a prompt of the model's, such as query")
    embed.add_argument("--prompt", help="a text put before every text (not with --prompt-name)")
    embed.add_argument("--truncate-dim", type=int, help="keep the first N dimensions")
    embed.add_argument(
        "--precision",
        default="float32",
        help="float32 (default), int8, uint8, binary or ubinary (packed bits)",
    )
    embed.add_argument(
        "--calibration", help="a .npy of float embeddings that sets the int8/uint8 ranges"
    )
    embed.set_defaults(func=_cmd_embed)

    corpus = sub.add_parser(
        "embed-corpus",
        help="embed a corpus file on Ray Data into Parquet (pip install registry-xf[ray])",
        description="Embed every text of INPUT (a text file, one text a line, or a column of "
        "a Parquet or JSONL file) with a pool of Ray actors, one model each, and write OUT, a "
        "Parquet file of id, text and embedding, in the input's order. OUT is replaced only "
        "once whole. Without --ray-address a local Ray is started, on 127.0.0.1 only.",
    )
    corpus.add_argument("input", help="the corpus: a .txt (one text a line), .parquet or .jsonl")
    corpus.add_argument("--out", required=True, help="the Parquet file to write")
    corpus.add_argument("--format", choices=("lines", "parquet", "jsonl"), help="(default: suffix)")
    corpus.add_argument("--column", default="text", help="the text column of a Parquet/JSONL file")
    corpus.add_argument(
        "--id-column", help="a Parquet/JSONL column of unique ids (default: the row positions)"
    )
    corpus.add_argument("--model", default=DEFAULT_MODEL, help="as for embed; on every node")
    corpus.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    corpus.add_argument("--device", default=None, help="cpu, cuda (default: cuda if Ray has GPUs)")
    corpus.add_argument("--dtype", default=None, help="auto (default), float32, float16, bfloat16")
    corpus.add_argument("--ray-address", help="a running Ray cluster (default: start a local one)")
    corpus.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    corpus.add_argument(
        "--concurrency", type=int, help="actors (default: GPUs, else CPUs over --cpus-per-actor)"
    )
    corpus.add_argument("--cpus-per-actor", type=float, help="CPUs (and torch threads) per actor")
    corpus.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 on GPUs)")
    corpus.add_argument("--batch-size", type=int, default=256, help="rows sent to an actor at once")
    corpus.add_argument("--batch-tokens", type=int, default=2048, help="tokens per model batch")
    corpus.add_argument("--prompt-name", help="a prompt of the model's, such as document")
    corpus.add_argument("--prompt", help="a text put before every text (not with --prompt-name)")
    corpus.add_argument("--truncate-dim", type=int, help="keep the first N dimensions")
    corpus.add_argument(
        "--precision", default="float32", help="float32 (default), int8, uint8, binary, ubinary"
    )
    corpus.add_argument(
        "--calibration", help="a .npy of float embeddings that sets the int8/uint8 ranges"
    )
    corpus.set_defaults(func=_cmd_embed_corpus)

    generate = sub.add_parser(
        "generate",
        help="continue a prompt with a causal language model, streaming the new text",
        description="Generate text; config overrides may follow as --section.key VALUE.",
    )
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument(
        "--model",
        required=True,
        help="a Hub id (org/name[@revision]), a model directory, a package or a .cfg (a causal LM)",
    )
    generate.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    generate.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    generate.add_argument(
        "--dtype", default=None, help="auto (default), float32, float16, bfloat16"
    )
    generate.add_argument("--max-new-tokens", type=int, help="new tokens at most (default 32)")
    generate.add_argument(
        "--temperature", type=float, help="sample at this temperature (0 or unset: greedy)"
    )
    generate.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    generate.add_argument(
        "--top-p", type=float, help="sample from the tokens making up probability P"
    )
    generate.add_argument(
        "--min-p", type=float, help="drop tokens less likely than M times the most likely"
    )
    generate.add_argument(
        "--repetition-penalty", type=float, help="penalise tokens already present (> 1)"
    )
    generate.add_argument(
        "--no-repeat-ngram-size", type=int, help="never repeat an n-gram of N tokens (0: off)"
    )
    generate.add_argument(
        "--min-new-tokens", type=int, help="no end-of-sequence token before N new tokens"
    )
    generate.add_argument("--stop", action="append", help="stop before this text (may be repeated)")
    generate.add_argument("--seed", type=int, help="seed for reproducible sampling")
    generate.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile (slow first step, faster after)",
    )
    generate.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="record the decoding step in a CUDA graph and replay it (with --device cuda)",
    )
    generate.set_defaults(func=_cmd_generate)

    classify = sub.add_parser(
        "classify",
        help="labels and scores of texts (or of their tokens) from a classification model",
        description="Classify texts with a sequence classifier, or label each token with a "
        "token classifier; config overrides may follow as --section.key VALUE.",
    )
    classify.add_argument("texts", nargs="*", help="texts to classify")
    classify.add_argument("--file", help="a text file, one text per line")
    classify.add_argument(
        "--model",
        required=True,
        help="a Hub id (org/name[@revision]), a model directory, a package or a .cfg "
        "(with a sequence or token classification head)",
    )
    classify.add_argument("--top-k", type=int, default=1, help="labels shown per text")
    classify.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    classify.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    classify.add_argument(
        "--dtype", default=None, help="auto (default), float32, float16, bfloat16"
    )
    classify.set_defaults(func=_cmd_classify)

    default_reranker = "cross-encoder/ms-marco-MiniLM-L6-v2"  # a common BERT reranker
    rerank = sub.add_parser(
        "rerank",
        help="documents ordered by a cross-encoder's relevance score for a query",
        description="Score each document against QUERY with a cross-encoder (a one-label "
        "sequence classifier) and print them best first as [INDEX] SCORE DOCUMENT; config "
        "overrides may follow as --section.key VALUE.",
    )
    rerank.add_argument("query", help="the query")
    rerank.add_argument("documents", nargs="*", help="documents to rank")
    rerank.add_argument("--file", help="a text file of documents, one a line (after DOCUMENTs)")
    rerank.add_argument("--top-k", type=int, default=None, help="show only the K best")
    rerank.add_argument(
        "--model",
        default=default_reranker,
        help=f"a Hub id, a model directory, a package or a .cfg (default: {default_reranker})",
    )
    rerank.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    rerank.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    rerank.add_argument("--dtype", default=None, help="auto (default), float32, float16, bfloat16")
    rerank.set_defaults(func=_cmd_rerank)

    listing = sub.add_parser("list", help="registries and their registered names")
    listing.add_argument("registry", nargs="?", help="only this registry")
    listing.set_defaults(func=_cmd_list)

    fetch = sub.add_parser(
        "fetch",
        help="download Hub models into the HF cache without loading them",
        description="Download what loading reads (config, safetensors, tokenizer) of each "
        "Hub id ORG/NAME[@REVISION] into the HF cache, then print where it is.",
    )
    fetch.add_argument("ids", nargs="+", metavar="ID", help="a Hub id, ORG/NAME[@REVISION]")
    fetch.add_argument("--revision", help="a branch, tag or commit (default: main)")
    fetch.add_argument(
        "--dry-run", action="store_true", help="list the files and total size; download nothing"
    )
    fetch.set_defaults(func=_cmd_fetch)

    show = sub.add_parser("show", help="signature and documentation of a registered name")
    show.add_argument("name")
    show.set_defaults(func=_cmd_show)

    config = sub.add_parser(
        "config",
        help="the filled config of any source: a Hub id, a model directory, a package, a .cfg",
        description="Print a filled config; overrides may follow as --section.key VALUE.",
    )
    config.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_MODEL,
        help="a Hub id, a model directory, a package or a .cfg (default: the default model)",
    )
    config.add_argument("--revision", help="the Hub revision (branch, tag or commit)")
    config.add_argument(
        "--keep-variables", action="store_true", help="keep ${hyper.*} variables in the output"
    )
    config.set_defaults(func=_cmd_config)

    export = sub.add_parser(
        "export-onnx",
        help="write an encoder as ONNX (dynamic batch and sequence axes)",
        description="Export an encoder to ONNX; config overrides may follow as --section.key V.",
    )
    export.add_argument("out", help="the .onnx file to write")
    export.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a Hub id (org/name[@revision]), a model directory, a package or a .cfg",
    )
    export.add_argument("--revision", help="the Hub revision (branch, tag or commit) to load")
    export.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    export.add_argument("--dtype", default=None, help="auto (default), float32, float16, bfloat16")
    export.add_argument(
        "--pooled", action="store_true", help="add the output sentence_embedding (pooled)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(func=_cmd_export_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    try:
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except RegistryXFError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    where = ""
    try:
        if overrides and args.command not in (
            "embed",
            "config",
            "generate",
            "classify",
            "rerank",
            "export-onnx",
        ):
            raise RegistryXFError(f"'{args.command}' takes no config overrides")
        if args.command not in SHARDED_COMMANDS:
            return int(args.func(args, overrides))
        from .parallel.ranks import mesh_from_environment

        with mesh_from_environment(args.device) as mesh:
            args.device_mesh = mesh
            if mesh is not None:
                where = f" (rank {_rank(args)})"
            # under torchrun every rank computes the same output: rank 0 writes it
            quiet = contextlib.redirect_stdout(io.StringIO()) if _rank(args) else None
            with quiet or contextlib.nullcontext():
                return int(args.func(args, overrides))
    except RegistryXFError as e:
        print(f"registry-xf {args.command}: error{where}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
