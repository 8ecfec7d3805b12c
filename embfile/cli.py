"""The ``embfile`` command: convert, info, get, keys, verify, shard, search; the versions of a dataset folder
(append, remove, compact, versions, changes, tag, vacuum); merge, subset; index (0.1's layout).

``main(argv) -> int`` runs one command; user errors are one line on stderr and
exit status 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import embfile
from embfile import _format as F
from embfile import errors, formats, remote, search
from embfile._keys import EncodedKeys
from embfile._stream import POOLINGS, Source, pooled
from embfile.formats.keys import keys_file

_EXAMPLES = {
    "convert": """examples:
  embfile convert prott5.h5 prott5.emb --dtype float16        # ProtTrans per-protein HDF5
  embfile convert residues.h5 residues.emb                    # per-residue (L, D) -> ragged records
  embfile convert residues.h5 proteins.emb --pool mean        # per-residue (L, D) -> mean vectors
  embfile convert reduced.h5 db.emb --key-attr original_id    # bio_embeddings: ids in an attribute
  embfile convert esm_out/ esm2.emb --layer 33                # fair-esm extract.py folder of .pt files
  embfile convert esm_out/ residues.emb --per-residue --layer 33   # their per-residue representations
  embfile convert table.parquet db.emb --vector-column embedding
  embfile convert db.emb db.parquet --row-group-size 50000
  embfile convert db.emb db.h5 --compression gzip
  embfile convert openai.parquet small.emb --dims 256 --normalize   # a Matryoshka prefix, unit length
  embfile convert db.emb bits.emb --binary                    # signs as packed bits, for --metric hamming
  embfile convert embeddings.pkl db.emb --trust-pickle        # only pickles you trust: loading runs code""",
    "info": "example:\n  embfile info db.emb --json",
    "get": "examples:\n  embfile get db.emb 'sp|P69905|HBA_HUMAN'\n"
    "  embfile get db.emb P69905 P68871 --format npy > two.npy\n"
    "  embfile get db.emb --keys query.fasta --format npy > queries.npy    # in the FASTA file's order",
    "keys": "examples:\n  embfile keys db.emb | head\n  embfile keys db.emb -0 | xargs -0 ...",
    "verify": "example:\n  embfile verify db.emb other.emb && echo intact",
    "shard": "examples:\n  embfile shard uniref50.emb uniref50/ --shard-size 2GB    # then embfile.open('uniref50/')\n"
    "  embfile shard uniref50-2027.emb uniref50/ --overwrite     # its next version; the earlier ones stay",
    "versions": "example:\n  embfile versions uniref50/ --json",
    "changes": "examples:\n  embfile changes esm2/ --since 3          # 'added KEY' lines, then replaced, removed\n"
    "  embfile changes esm2/ --since 3 --json | jq -r '.added[]' > to_annotate.txt",
    "tag": "examples:\n  embfile tag esm2/ uniprot-2026_04              # the latest version, kept by every vacuum\n"
    "  embfile tag esm2/ paper-v1 --version 7\n  embfile tag esm2/ paper-v1 --delete",
    "append": "examples:\n  embfile append esm2/ week49.emb week50.h5\n"
    "  embfile append esm2/ fixed.parquet --replace                # new vectors replace the old ones",
    "remove": "examples:\n  embfile remove esm2/ --keys retracted.txt --missing ignore\n"
    "  embfile remove esm2/ P69905 P68871",
    "compact": "example:\n  embfile compact esm2/ --shard-size 2GB",
    "vacuum": "examples:\n  embfile vacuum esm2/ --keep 5\n"
    "  embfile vacuum esm2/ --keep 1 --grace 0      # no reader can be using an older version",
    "merge": "examples:\n  embfile merge part1.emb part2.emb all.emb\n  embfile merge human/ mouse/ both/",
    "subset": "example:\n  embfile subset uniref50/ test.emb --keys test_ids.txt",
    "search": "examples:\n  embfile search prott5.emb --key P69905 P68871 -k 5\n"
    "  embfile search esm2/ --queries new.npy -k 1 --metric l2 --format tsv > hits.tsv\n"
    "  embfile search lookup.emb --queries new_proteins.h5 -k 1     # each query named by its key\n"
    "  embfile search residues.emb --key P69905 --pool mean",
    "cache": "examples:\n  embfile cache fetch s3://bucket/esm2/      # before training on a machine of its own\n"
    "  embfile cache fetch https://example.org/prott5.emb --cache-dir /scratch/embfile\n  embfile cache clear",
    "index": "example:\n  cp more/*.emb uniref50/ && embfile index uniref50/",
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, ``kill`` and SLURM send), raised where Ctrl-C would be: every writer cleans up."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace) -> int:
    try:
        status: int | None = args.run(args)
        return status or 0
    except errors.KeyNotFoundError as e:
        return _fail(e.message or f"key {e.args[0]!r} is not in {getattr(args, 'file', 'the file')}")
    except BrokenPipeError:
        raise  # the reader went away (| head): run() ends quietly
    except (errors.EmbFileError, OSError, ImportError, ValueError, TypeError) as e:
        return _fail(str(e))
    except _Terminated:
        return _fail("terminated (SIGTERM); no output file was left behind", 143)
    except KeyboardInterrupt:
        return _fail("interrupted; no output file was left behind", 130)


def _fail(message: str, status: int = 1) -> int:
    print(f"embfile: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embfile", description="Store and serve embedding vectors by key.")
    p.add_argument("--version", action="version", version=f"embfile {embfile.__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int | None], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.set_defaults(run=run)
        return c

    c = command(
        "convert", _convert, "convert between .emb and HDF5, Parquet, Arrow, CSV, JSON Lines, word vectors, torch, ..."
    )
    c.add_argument("src", help="input file or folder")
    c.add_argument("dst", help="output file (.emb, .h5, .parquet, .arrow, .safetensors, .vec, .bin or .csv)")
    c.add_argument(
        "--to", dest="dst_format", choices=["emb", *sorted(formats.WRITERS)], help="output format (from the name)"
    )
    c.add_argument(
        "--dtype",
        choices=sorted(set(F.DTYPES.values())),
        metavar="DTYPE",
        help=f"stored element type, one of {', '.join(F.DTYPES.values())} (default: the input's)",
    )
    c.add_argument(
        "--dims",
        type=int,
        metavar="N",
        help="keep the first N values of each vector (a Matryoshka embedding's prefix; default: all)",
    )
    c.add_argument(
        "--normalize",
        action="store_true",
        help="scale each float vector (after --dims) to unit length, so a dot product is a cosine",
    )
    c.add_argument(
        "--binary",
        action="store_true",
        help="write each vector's signs as packed bits (binary quantization, uint8: a 32nd of float32), "
        "for search --metric hamming",
    )
    c.add_argument(
        "--metadata",
        type=_metadata,
        action="append",
        metavar="KEY=VALUE",
        help="add to the metadata: KEY=VALUE (VALUE read as JSON if it is, else as text), or a JSON object; repeatable",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    _version_option(c)
    c.add_argument(
        "--on-error",
        choices=["error", "skip"],
        help="skip a bad record (a null key or vector, a vector of another length or type than the first) "
        "and list it in --report (default: error)",
    )
    c.add_argument("--report", help="with --on-error skip: where to list what was skipped (default DST.skipped.jsonl)")
    _reading_arguments(c)
    g = c.add_argument_group("outputs")
    g.add_argument("--compression", help="HDF5: gzip or lzf; Parquet: codec of the keys")
    g.add_argument("--row-group-size", type=int, help="Parquet: rows per row group (default: about 64 MiB)")

    c = command("info", _info, "count, dim, dtype, size, key lengths and metadata of an .emb file")
    c.add_argument("file")
    _version_option(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")

    c = command("get", _get, "print the vectors of some keys")
    c.add_argument("file")
    _keys_arguments(c)
    _version_option(c)
    c.add_argument(
        "--format",
        choices=["text", "json", "npy"],
        default="text",
        help="text: 'key<TAB>values' lines; json: {key: [values]}; npy: one (k, dim) array",
    )

    c = command("keys", _keys, "print every key, in row order")
    c.add_argument("file")
    _version_option(c)
    c.add_argument("-0", "--null", action="store_true", help="end keys with NUL instead of newline")

    c = command("verify", _verify, "check every checksum and the index; exit status 0 only if all hold")
    c.add_argument("files", nargs="+", metavar="FILE")

    c = command("shard", _shard, "split an .emb file into a folder of shards with an index")
    c.add_argument("src", help="input .emb file")
    c.add_argument("dst", help="output folder (must not exist, or be empty)")
    c.add_argument(
        "--shard-size", type=_size, default="1GiB", help="bytes of records per shard, e.g. 2GB or 512MiB (default 1GiB)"
    )

    c.add_argument("--overwrite", action="store_true", help="DST is a dataset: write its next version")

    c = command("versions", _versions, "the versions of a dataset folder: number, time, operation, records, tags")
    c.add_argument("folder", help="a dataset folder, or its URL")
    c.add_argument("--json", action="store_true", help="print one JSON list")

    c = command("changes", _changes, "the keys added, replaced and removed between two versions of a dataset folder")
    c.add_argument("folder", help="a dataset folder, or its URL")
    c.add_argument("--since", type=_version, required=True, metavar="N", help="the earlier version (or tag)")
    c.add_argument("--version", type=_version, metavar="M", help="the later version or tag (default: the latest)")
    c.add_argument("--json", action="store_true", help="print one JSON object of key lists")
    c.add_argument("--cache-dir", help="for a URL: default $EMBFILE_CACHE, else ~/.cache/embfile")

    c = command("tag", _tag, "name a version of a dataset folder: no vacuum removes it while the tag is there")
    c.add_argument("folder", help="a dataset folder, or its URL")
    c.add_argument("name", help="letters, digits, '.', '_' and '-'; not all digits")
    c.add_argument("--version", type=_version, help="the version (or the tag of one) to name (default: the latest)")
    c.add_argument("--replace", action="store_true", help="move the tag if it names another version")
    c.add_argument("--delete", action="store_true", help="remove the tag (its version stays until a vacuum)")

    c = command("append", _append, "add the records of files or datasets to a dataset folder, as its next version")
    c.add_argument("folder")
    c.add_argument("sources", nargs="+", metavar="SRC", help="anything convert reads, or an embfile dataset")
    c.add_argument("--replace", action="store_true", help="a key already there gets the new vector (default: error)")
    c.add_argument(
        "--shard-size",
        type=_size,
        default="1GiB",
        help="bytes of records per new shard, e.g. 2GB or 512MiB (default 1GiB)",
    )
    _reading_arguments(c)

    c = command("remove", _remove, "remove keys from a dataset folder, as its next version")
    c.add_argument("folder")
    _keys_arguments(c)
    c.add_argument("--missing", choices=["error", "ignore"], default="error", help="a key not there (default: error)")

    c = command("compact", _compact, "join small shards and merge the key index, as the next version")
    c.add_argument("folder")
    c.add_argument(
        "--shard-size", type=_size, default="1GiB", help="bytes of records per shard, e.g. 2GB or 512MiB (default 1GiB)"
    )

    c = command("vacuum", _vacuum, "remove old versions of a dataset folder and the files only they use")
    c.add_argument("folder")
    c.add_argument("--keep", type=int, required=True, metavar="N", help="keep the N newest versions")
    c.add_argument(
        "--grace", type=float, default=86400.0, metavar="SECONDS", help="and those superseded since (default 1 day)"
    )

    c = command("merge", _merge, "write the records of several files or datasets to a new file or dataset")
    c.add_argument("sources", nargs="+", metavar="SRC")
    c.add_argument("dst", help="a new .emb file, or a new dataset folder (a path or a URL)")
    c.add_argument("--shard-size", type=_size, default="1GiB", help="for a folder: bytes of records per shard")
    _reading_arguments(c)

    c = command("subset", _subset, "write the records of some keys to a new file or dataset")
    c.add_argument("src", help="an .emb file or a dataset folder (a path or a URL)")
    c.add_argument("dst", help="a new .emb file, or a new dataset folder (a path or a URL)")
    _keys_arguments(c)
    c.add_argument("--missing", choices=["error", "ignore"], default="error", help="a key not there (default: error)")
    c.add_argument("--shard-size", type=_size, default="1GiB", help="for a folder: bytes of records per shard")

    c = command("cache", _cache, "download a remote dataset into the local cache ahead of use, or empty the cache")
    c.add_argument("action", choices=["fetch", "clear"])
    c.add_argument("url", nargs="?", help="fetch: the dataset's URL (s3://, gs://, https://, hdfs://)")
    c.add_argument(
        "--version", type=_version, help="fetch: of a dataset folder, this version or tag (default: the latest)"
    )
    c.add_argument("--cache-dir", help="default $EMBFILE_CACHE, else ~/.cache/embfile")

    c = command("search", _search, "the stored vectors nearest some keys' vectors or some query vectors, exactly")
    c.add_argument("file", help="an .emb file or a dataset folder")
    _version_option(c)
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--key", nargs="+", metavar="KEY", help="query with these keys' vectors (each leaves itself out)"
    )
    which.add_argument(
        "--queries",
        metavar="FILE",
        help="query with the rows of this (Q, dim) or (dim,) .npy array (named by number), or the records of any file "
        "convert reads (an .emb file or dataset, HDF5, Parquet...; named by key; per-residue ones pooled by --pool)",
    )
    c.add_argument(
        "--exclude-self",
        action="store_true",
        help="with --queries from a file: leave each query's own key out of its hits (the same proteins on both sides)",
    )
    c.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    c.add_argument(
        "--among",
        metavar="FILE",
        help="search only the records of the keys in this file (one a line, a FASTA file's ids, ...; '-': stdin)",
    )
    c.add_argument(
        "--metric", choices=search.METRICS, default="cosine", help="default cosine; hamming: of packed bits (uint8)"
    )
    c.add_argument(
        "--dims",
        type=int,
        metavar="N",
        help="compare the first N values of each vector alone (Matryoshka embeddings' prefix); queries cut to them",
    )
    c.add_argument(
        "--pool",
        choices=POOLINGS,
        help="of a per-residue (ragged) file, required: compare each record's rows pooled so",
    )
    c.add_argument(
        "--format",
        choices=["text", "tsv", "json"],
        default="text",
        help="text: 'query key score' lines; tsv: the same with a header; json: {query: [{key, score}]}",
    )

    c = command("index", _index, "(re)write the index of a folder of .emb shards in 0.1's layout")
    c.add_argument("folder")
    return p


def _reading_arguments(c: argparse.ArgumentParser) -> None:
    """The options of reading an input, for ``convert``, ``append`` and ``merge``."""
    c.add_argument("--from", dest="src_format", choices=sorted(formats.READERS), help="input format (detected)")
    c.add_argument(
        "--pool",
        choices=POOLINGS,
        help="pool per-residue (L, D) input into one vector per key (default: keep every row, a ragged file)",
    )
    c.add_argument(
        "--key-regex",
        metavar="PATTERN",
        help="derive each key from the source's: the first group (else the whole match) of PATTERN, "
        r"e.g. '\|([^|]+)\|' takes P69905 of sp|P69905|HBA_HUMAN",
    )
    g = c.add_argument_group("HDF5 and Zarr")
    g.add_argument("--group", help="read under this group (default /)")
    g.add_argument(
        "--layout",
        choices=["bulk", "per-key", "skbio"],
        help="input: detected (skbio: scikit-bio's embed format); output: bulk, per-key for per-residue records",
    )
    g.add_argument("--key-attr", help="take each key from this dataset attribute (e.g. original_id)")
    g.add_argument(
        "--ids", help="the ids' dataset or array (HDF5 bulk, npz, torch, safetensors, Zarr; default: detected)"
    )
    g.add_argument("--vectors", help="the matrix's dataset or array (default: detected; HDF5 output: vectors)")
    g = c.add_argument_group("Parquet, Arrow and Lance")
    g.add_argument("--key-column", help="default: one named id, _id or key, or the only string column (output: key)")
    g.add_argument("--vector-column", help="default: the only list column (output: vector)")
    g.add_argument("--wide-prefix", help="one numeric column per dimension: the columns starting with this")
    g.add_argument("--wide-columns", type=lambda s: s.split(","), help="... or these, comma-separated")
    g = c.add_argument_group("others")
    g.add_argument("--layer", type=int, help="ESM: the layer of the representations to take")
    g.add_argument(
        "--per-residue", action="store_true", help="ESM: the per-residue representations, not mean_representations"
    )
    g.add_argument(
        "--keys",
        help="a matrix without ids (npy, torch, npz, safetensors, Zarr, pickle): its keys, one a line, the FASTA "
        "file its rows were embedded from, a JSON list, an .npy array or a Parquet table (default for npy and a bare "
        "tensor: NAME.txt)",
    )
    g.add_argument(
        "--trust-pickle", action="store_true", help="pickle, or an .npy of Python objects: load it (this runs its code)"
    )


def _version_option(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--version", type=_version, metavar="N", help="of a dataset folder: version N, or a tag (default: the latest)"
    )


def _version(text: str) -> int | str:
    """A version's number, or a tag's name."""
    return int(text) if text.isdigit() else text


def _size(text: str) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes."""
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}
    number = text.upper().rstrip("B").rstrip()
    unit = number.lstrip("0123456789.E+")
    try:
        return int(float(number[: len(number) - len(unit)]) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MiB)") from None


_READ_OPTIONS = (  # the keywords of _reading_arguments' options, as the readers take them
    "group",
    "layout",
    "key_attr",
    "pool",
    "ids",
    "vectors",
    "key_column",
    "vector_column",
    "wide_prefix",
    "wide_columns",
    "layer",
    "keys",
)


def _skipped(args: argparse.Namespace) -> str:
    if args.on_error != "skip":
        return ""
    report = args.report or f"{args.dst}.skipped.jsonl"
    with open(report, encoding="utf-8") as f:
        return f"; skipped {sum(1 for _ in f)} records, listed in {report}"


def _metadata(text: str) -> dict[str, object]:
    """One ``--metadata``: a JSON object, or ``KEY=VALUE`` (VALUE as JSON if it parses, else as text)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("not a JSON object")
        return value
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE or a JSON object")
    try:
        return {key: json.loads(raw)}
    except ValueError:
        return {key: raw}


def _reading(args: argparse.Namespace, names: tuple[str, ...] = _READ_OPTIONS) -> dict[str, Any]:
    """The options given of ``names`` (and the reading flags), as keywords."""
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return {**options, **{flag: True for flag in ("trust_pickle", "per_residue") if getattr(args, flag)}}


def _reading_all(args: argparse.Namespace) -> dict[str, Any]:
    """The reading options as ``append`` and ``merge`` take them (each source read with them)."""
    given = {"src_format": args.src_format, "key": args.key_regex}
    return {**_reading(args), **{k: v for k, v in given.items() if v is not None}}


def _convert(args: argparse.Namespace) -> None:
    options = _reading(args, (*_READ_OPTIONS, "version", "on_error", "compression", "row_group_size"))
    metadata = {k: v for item in args.metadata or [] for k, v in item.items()} or None
    t = time.perf_counter()
    embfile.convert(
        args.src,
        args.dst,
        src_format=args.src_format,
        dst_format=args.dst_format,
        dtype=args.dtype,
        dims=args.dims,
        normalize=args.normalize,
        binary=args.binary,
        metadata=metadata,
        key=args.key_regex,
        report=args.report,
        progress=not args.quiet and sys.stderr.isatty(),
        **options,
    )
    if not args.quiet:
        seconds = time.perf_counter() - t
        if remote.is_url(args.dst):  # uploaded: its size is the store's
            print(f"wrote {args.dst} in {seconds:.2f} s" + _skipped(args), file=sys.stderr)  # report: a local path
            return
        size = os.path.getsize(args.dst)
        print(
            f"wrote {args.dst}: {size / 1e6:,.1f} MB in {seconds:.2f} s ({size / 1e6 / seconds:,.0f} MB/s)"
            + _skipped(args),
            file=sys.stderr,
        )


def _info(args: argparse.Namespace) -> None:
    with embfile.open(args.file, args.version) as db:
        files = db.files
        lengths = np.concatenate([np.diff(f.key_offsets()) for f in files])
        info = {
            "path": args.file,
            "format_version": files[0].header.version,
            "count": len(db),
            "dim": db.dim,
            "dtype": db.dtype.name,
            **({"ragged": True, "rows": int(db.lengths().sum())} if db.ragged else {}),
            "size": sum(f.header.file_size for f in files),
            "key_bytes": [int(lengths.min()), int(lengths.max())] if len(db) else None,
        }
        meta = db.metadata
        record = meta.pop("embfile", {})  # the writer's own record (of a folder, the first shard's)
        if isinstance(db, embfile.ShardedEmbFile):
            info["shards"] = len(files)
            if db.version is not None:
                info["version"] = db.version
        else:
            info["created"] = record.get("created")
            info["written_by"] = f"embfile {record.get('embfile_version')}"
        info["metadata"] = meta  # the user's
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return
    width = max(map(len, info))
    for name, value in info.items():
        if name == "size":
            value = f"{value:,} bytes ({value / 1e6:,.1f} MB)"
        elif name == "key_bytes" and value:
            value = f"{value[0]} to {value[1]} (UTF-8)"
        elif name == "metadata":
            value = json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n" + " " * (width + 2))
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{name:<{width}}  {value}")


def _keys_arguments(c: argparse.ArgumentParser) -> None:
    """Keys as arguments, and (or) a file of them: what get, remove and subset take."""
    c.add_argument("keys", nargs="*", metavar="KEY")
    c.add_argument(
        "--keys",
        dest="keys_file",
        metavar="FILE",
        help="and those of a file: one a line, a FASTA file's ids, a JSON list, .npy or Parquet ('-': standard input)",
    )


def _given_keys(args: argparse.Namespace) -> list[str]:
    """The keys given as arguments, then those of ``--keys FILE``."""
    hint = " (keys themselves go after the paths, as arguments)"
    keys = list(args.keys) + (_listed_keys(args.keys_file, "--keys", hint) if args.keys_file else [])
    if not keys:
        raise ValueError("no keys: give them as arguments, or --keys FILE")
    return keys


def _listed_keys(path: str, option: str, hint: str = "") -> list[str]:
    """The keys of the file ``option`` names ('-': standard input); one naming no file is one line."""
    if not (path == "-" or os.path.exists(path)):
        raise ValueError(f"{option} {path}: no such file{hint}")
    return keys_file(path)


def _get(args: argparse.Namespace) -> None:
    args.keys = _given_keys(args)
    with embfile.open(args.file, args.version) as db:
        if db.ragged:
            _get_ragged(args, [np.array(db[k]) for k in args.keys])
            return
        batch = db.get_batch(args.keys)
    if args.format == "npy":
        _save_npy(batch)
    elif args.format == "json":
        print(json.dumps({k: _json_numbers(v) for k, v in zip(args.keys, batch)}, ensure_ascii=False))
    else:
        for k, v in zip(args.keys, batch):
            print(k, " ".join(map(str, v)), sep="\t")


def _json_numbers(a: np.ndarray) -> Any:
    """``a`` as (nested) lists of numbers, each float as short as its own type prints it: a float32's 0.1, not
    the 0.10000000149011612 it is as a float64 (twice the text, and digits the file does not hold)."""
    if a.dtype.kind in "iub" or a.dtype == np.float64:
        return a.tolist()
    return np.array([float(str(x)) for x in a.ravel()]).reshape(a.shape).tolist()  # (str of its own scalars)


def _save_npy(array: np.ndarray) -> None:
    if sys.stdout.isatty():
        raise ValueError("--format npy writes binary: redirect it to a file")
    np.save(sys.stdout.buffer, array)


def _get_ragged(args: argparse.Namespace, records: list[np.ndarray]) -> None:
    """Per-residue records: JSON of each key's rows, or a TSV line per row (key, row number, values), or
    one key's ``(length, dim)`` matrix as ``.npy``."""
    if args.format == "npy":
        if len(records) > 1:
            raise ValueError("per-residue records differ in length: --format npy writes one key's; json or text all")
        _save_npy(records[0])
        return
    if args.format == "json":
        print(json.dumps({k: _json_numbers(m) for k, m in zip(args.keys, records)}, ensure_ascii=False))
        return
    for k, m in zip(args.keys, records):
        for i, row in enumerate(m):
            print(k, i, " ".join(map(str, row)), sep="\t")


def _keys(args: argparse.Namespace) -> None:
    end = "\0" if args.null else "\n"
    out = sys.stdout
    with embfile.open(args.file, args.version) as db:
        step = 65536
        for lo in range(0, len(db), step):
            out.write("".join(k + end for k in db.keys_between(lo, min(lo + step, len(db)))))


def _shard(args: argparse.Namespace) -> None:
    with embfile.open(args.src) as src:
        embfile.write_shards(
            args.dst, src, shard_bytes=args.shard_size, mode="overwrite" if args.overwrite else "error"
        )
    with embfile.open(args.dst) as db:
        print(f"wrote {args.dst} version {db.version}: {len(db):,} records in {len(db.files)} shards", file=sys.stderr)


def _versions(args: argparse.Namespace) -> None:
    history = embfile.history(args.folder)
    named: dict[int, list[str]] = {}
    try:
        tagged = embfile.tags(args.folder)
    except errors.RemoteError as e:  # a server that lists no folders: the versions, and why no tags
        print(f"embfile: tags not shown: {e}", file=sys.stderr)
        tagged = {}
    for name, number in tagged.items():
        named.setdefault(number, []).append(name)
    rows = [
        {
            "version": m.version,
            "created": m.created,
            "operation": m.operation["name"],
            "changed": m.operation.get("records"),
            "replaced": m.operation.get("replaced"),
            "records": m.count,
            "shards": len(m.shards),
            "segments": len(m.segments),
            "tags": named.get(m.version, []),
        }
        for m in history
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = f"{'version':>7}  {'created':<25}  {'operation':<11}  {'changed':>11}  {'records':>11}  shards  segments"
    print(head + "  tags")
    for r in rows:
        changed = "" if r["changed"] is None else f"{r['changed']:,}"
        print(
            f"{r['version']:>7}  {r['created']:<25}  {r['operation']:<11}  {changed:>11}  {r['records']:>11,}  "
            f"{r['shards']:>6}  {r['segments']:>8}  {' '.join(r['tags'])}".rstrip()
        )


def _changes(args: argparse.Namespace) -> None:
    c = embfile.changes(args.folder, args.since, args.version, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(dataclasses.asdict(c), ensure_ascii=False))
    else:
        kinds = ("added", "replaced", "removed")
        sys.stdout.writelines(f"{kind}\t{key}\n" for kind in kinds for key in getattr(c, kind))
    print(
        f"{args.folder}: version {c.since} -> {c.version}: {len(c.added):,} added, {len(c.replaced):,} replaced, "
        f"{len(c.removed):,} removed",
        file=sys.stderr,
    )


def _tag(args: argparse.Namespace) -> None:
    if args.delete:
        if args.version is not None or args.replace:
            raise ValueError("--delete takes no --version or --replace")
        embfile.untag(args.folder, args.name)
        print(f"{args.folder}: removed tag {args.name}", file=sys.stderr)
        return
    version = embfile.tag(args.folder, args.name, args.version, replace=args.replace)
    print(f"{args.folder}: tag {args.name} names version {version}", file=sys.stderr)


def _append(args: argparse.Namespace) -> None:
    how = "replace" if args.replace else "error"
    options = _reading_all(args)
    for src in args.sources:
        version = embfile.append(args.folder, src, how, shard_bytes=args.shard_size, **options)
        print(f"{args.folder}: version {version} appends {src}", file=sys.stderr)


def _remove(args: argparse.Namespace) -> None:
    version = embfile.remove(args.folder, _given_keys(args), missing=args.missing)
    print(f"{args.folder}: version {version}", file=sys.stderr)


def _compact(args: argparse.Namespace) -> None:
    version = embfile.compact(args.folder, shard_bytes=args.shard_size)
    print(f"{args.folder}: version {version}", file=sys.stderr)


def _vacuum(args: argparse.Namespace) -> None:
    gone = embfile.vacuum(args.folder, keep=args.keep, grace=args.grace)
    print(f"{args.folder}: removed {len(gone)} versions", file=sys.stderr)


def _cache(args: argparse.Namespace) -> None:
    if args.action == "clear":
        cache = remote.Cache(args.cache_dir)
        cache.clear()
        print(f"{cache.root}: emptied", file=sys.stderr)
        return
    if not args.url:
        raise ValueError("embfile cache fetch needs the URL of a dataset")
    root = embfile.prefetch(args.url, args.version, cache_dir=args.cache_dir)
    print(f"{args.url}: cached in {root}", file=sys.stderr)


def _merge(args: argparse.Namespace) -> None:
    embfile.merge(args.sources, args.dst, shard_bytes=args.shard_size, **_reading_all(args))


def _subset(args: argparse.Namespace) -> None:
    embfile.subset(args.src, args.dst, _given_keys(args), missing=args.missing, shard_bytes=args.shard_size)


def _search(args: argparse.Namespace) -> None:
    with embfile.open(args.file, args.version) as db:
        source = None if args.key or _is_npy(args.queries) else _queries(args.queries)
        ragged_queries = source is not None and source.ragged
        if source is not None and ragged_queries:
            if args.pool is None:
                raise ValueError(
                    f"{args.queries} holds per-residue (ragged) records: pass --pool mean (or max, first, last) to "
                    "query with each one's rows pooled"
                )
            source = pooled(source, args.pool)
        if db.ragged and args.pool is None:
            raise ValueError(f"{args.file} holds per-residue (ragged) records: pass --pool mean (or max, first, last)")
        if args.pool and not db.ragged and not ragged_queries:
            raise ValueError(f"{args.file} has one vector per key: --pool is for per-residue (ragged) records")
        if args.exclude_self and source is None and not args.key:
            raise ValueError("--exclude-self needs queries named by key: records of a file, not an .npy array's rows")
        how = {"k": args.k, "metric": args.metric, "pool": args.pool if db.ragged else None, "dims": args.dims}
        if args.among:
            how["among"] = _listed_keys(args.among, "--among")
        if args.key:
            results: Iterable[tuple[list[str], np.ndarray, np.ndarray]] = [
                (list(args.key), *db.search_keys(list(args.key), **how))
            ]
        elif source is None:
            scores, keys = db.search(np.atleast_2d(_npy(args.queries)), **how)
            results = [([str(i) for i in range(len(scores))], scores, keys)]
        else:  # a chunk of queries at a time: as many as the file holds, in flat memory
            results = (
                (n, *db.search(x, query_keys=n if args.exclude_self else None, **how))
                for n, x in ((_names(names), x) for names, x in source.chunks)
            )
        _print_hits(results, args.format)


def _print_hits(results: Iterable[tuple[list[str], np.ndarray, np.ndarray]], form: str) -> None:
    """Each query's hits: ``query key score`` lines (tsv: with a header), or one JSON object of them all."""
    if form == "json":
        hits = {
            n: [{"key": k, "score": s} for k, s in zip(ks, _json_numbers(ss))]
            for names, scores, keys in results
            for n, ss, ks in zip(names, scores, keys)
        }
        print(json.dumps(hits, ensure_ascii=False, indent=1))
        return
    sep = "\t" if form == "tsv" else " "
    if form == "tsv":
        print("query\tkey\tscore")
    for names, scores, keys in results:
        sys.stdout.write(
            "".join(f"{n}{sep}{k}{sep}{s:.6g}\n" for n, ss, ks in zip(names, scores, keys) for k, s in zip(ks, ss))
        )


def _queries(path: str) -> Source:
    """The records of the queries file at ``path``, read as ``convert`` reads it."""
    try:
        formats.detect_format(path)
    except errors.ConversionError:
        raise ValueError(
            f"{path} is neither a .npy array (save the queries with numpy.save) nor a file convert reads"
        ) from None
    return formats.read(path)


def _names(keys: Sequence[str] | EncodedKeys) -> list[str]:
    return keys.tolist() if hasattr(keys, "tolist") else list(keys)  # a chunk's keys, perhaps encoded


def _is_npy(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _npy(path: str) -> np.ndarray:
    """The array saved at ``path`` by ``numpy.save`` (one :func:`_is_npy` found), never unpickled."""
    with open(path, "rb") as f:
        try:
            array: np.ndarray = np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as e:  # object arrays, a damaged header
            raise ValueError(f"{path}: {e}") from None
    return array


def _index(args: argparse.Namespace) -> None:
    embfile.write_index(args.folder)
    with embfile.open(args.folder) as ds:
        print(f"wrote {os.path.join(args.folder, '_index.emb')}: {len(ds):,} keys in {len(ds.files)} shards")


def _verify(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            with embfile.open(path) as db:
                db.verify()
            print(f"{path}: OK")
        except errors.ChecksumError as e:
            status = 1
            print(f"{path}: DAMAGED", *(f"  {p}" for p in e.problems), sep="\n")
        except (errors.EmbFileError, OSError) as e:
            status = 1
            print(f"{path}: UNREADABLE: {e}")
    return status


def run() -> None:
    """Console-script entry point: exit with main()'s status; a closed pipe (``| head``) is not an error."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    sys.exit(status)
