"""Ingest: annotation files -> validated rows (bronze) and rejected rows (quarantine).

The driver only plans: it lists the input files and cuts them into chunks (byte ranges of JSON
Lines files, row groups of Parquet files, whole CSV files). Spark tasks then read their chunk
straight from storage (local paths or URIs through pyarrow's filesystems), validate each line
with :mod:`dollyflow.core.records`, and emit one Arrow row per line. No record passes through
the driver, and a file larger than memory streams through its tasks chunk by chunk.

Line numbers of JSON Lines chunks are exact: a first, cheap pass counts the line starts in
every chunk (C-speed ``bytes.count``), and the running sum gives each chunk its first line.
Gzip-compressed files (``.jsonl.gz``, ``.csv.gz``) cannot be cut into byte ranges: each is one
task that decompresses it as a stream. A UTF-8 byte order mark at the very start of a file (as
Excel, PowerShell and other Windows tools write) is dropped; anywhere else it is data (and a line
starting with one is malformed JSON). Files of a directory or glob that are not read (hidden,
``_``-prefixed, unknown extension) are listed with the reason, for the run's accounting.

A ``.json`` file whose first character is ``[`` holds one JSON array (format ``json_array``): one
task per file streams it block by block (:func:`iter_json_array` delimits the elements; orjson
parses each), so memory is bounded by the longest element, and each record's line is the line
its element starts on. Lines (and array elements) longer than 4 x ``ingest.max_field_chars``
bytes are quarantined as ``oversized_line`` without ever being held whole.
"""
from __future__ import annotations

import csv
import fnmatch
import functools
import gzip
import io
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dollyflow.config import IngestConfig
from dollyflow.core.records import (Rules, Verdict, check_json_line, check_object, has_surrogates,
                                    max_line_bytes, raw_text, record_id)
from dollyflow.core.storage import filesystem

EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip"}     # streamed, one task per file (JSON Lines and CSV)
#: Always JSON Lines. A ``.json`` file (or any file read with ``ingest.format=json``) whose first
#: character is ``[`` holds one JSON array instead (format ``json_array``: one task per file,
#: streamed element by element).
JSON_LINES_EXTENSIONS = (".jsonl", ".ndjson")
SNIFF_BYTES = 64 * 1024
BOM = b"\xef\xbb\xbf"             # UTF-8 byte order mark


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str                  # json (JSON Lines) | json_array | csv | parquet
    size: int                    # bytes on storage (compressed size for .gz)
    compression: str | None = None


@dataclass(frozen=True)
class Inputs:
    files: list[InputFile]
    skipped: list[tuple[str, str]]   # (path, reason) of every file the directory or glob held but not read

PARSED_SCHEMA = pa.schema([
    ("record_id", pa.string()), ("instruction", pa.string()), ("context", pa.string()),
    ("response", pa.string()), ("category", pa.string()), ("source_file", pa.string()),
    ("source_line", pa.int64()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string()),
    ("pos", pa.int64()),
])
PARSED_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, reason string, detail string, raw string, pos long")
LINE_BITS = 40   # pos = file index << 40 | line: the input order of a line, as one sortable long


def _uri(fs: pafs.FileSystem, path: str, original: str) -> str:
    if "://" not in original:
        return path
    scheme = original.split("://", 1)[0]
    return f"{scheme}://{path}"


def _format_of(path: str, fmt: str) -> tuple[str | None, str | None]:
    """(format, compression) of a file: ``fmt`` unless it is ``auto``, else by extension
    (``data.jsonl.gz`` -> json, gzip); format None when the extension is unknown."""
    root, ext = os.path.splitext(path)
    compression = COMPRESSIONS.get(ext.lower())
    if compression:
        ext = os.path.splitext(root)[1]
    if fmt != "auto":
        return fmt, compression
    return EXTENSIONS.get(ext.lower()), compression


def _extension(path: str) -> str:
    """The extension that tells the format, lower-case: ``data.jsonl.gz`` -> ``.jsonl``."""
    root, ext = os.path.splitext(path)
    if ext.lower() in COMPRESSIONS:
        ext = os.path.splitext(root)[1]
    return ext.lower()


def _holds_json_array(uri: str, compression: str | None) -> bool:
    """Whether a JSON file's first character (after a BOM and whitespace, within its first
    SNIFF_BYTES) is ``[``: one JSON array of records rather than JSON Lines."""
    with _open(uri, compression) as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(BOM):
        head = head[len(BOM):]
    return head.lstrip(b" \t\r\n")[:1] == b"["


def _known() -> str:
    return ", ".join(EXTENSIONS) + " (each but .parquet optionally .gz)"


def glob_match(path: str, pattern: str) -> bool:
    """Whether ``path`` matches the glob ``pattern``, one ``/``-separated segment at a time, as a
    shell does: ``*``, ``?`` and ``[...]`` match within one segment (:func:`fnmatch.fnmatchcase`),
    never across a ``/``; a ``**`` segment matches any number of segments, none included
    (``dir/**/*.jsonl`` is every ``.jsonl`` file below ``dir``, ``dir/*.jsonl`` those in ``dir``)."""
    parts, pats = path.split("/"), pattern.split("/")

    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return match(i, j + 1) or (i < len(parts) and match(i + 1, j))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)


def list_inputs(spec: str, fmt: str = "auto") -> Inputs:
    """Every input file named by a file, a directory (read recursively) or a glob
    (:func:`glob_match`: ``*`` within one directory, ``**`` across any), and every file of the directory
    or glob that is skipped, with the reason: hidden (``.``), Spark/Delta metadata (``_``, such as
    ``_SUCCESS`` or ``_delta_log/``, listed once per directory) or an unknown extension."""
    if not spec:
        raise ValueError("ingest.input is empty: name a file, a directory or a glob")
    fs, path = filesystem(spec)
    has_glob = any(c in path for c in "*?[")
    base = path
    recursive = True            # a directory: every file below it
    if has_glob:
        parts = path.split("/")
        i = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:i]) or "/"
        # a glob lists only as deep as it can match: "dir/*.jsonl" the directory itself
        recursive = "**" in parts[i:] or len(parts) - i > 1
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"ingest input not found: {spec}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
                 if i.type == pafs.FileType.File]
    out: list[InputFile] = []
    skipped: dict[str, str] = {}
    for i in sorted(infos, key=lambda i: i.path):
        if has_glob and not glob_match(i.path, path):
            continue
        rel = i.path[len(base):].lstrip("/")
        parts = [p for p in rel.split("/") if p]
        hidden = next((k for k, p in enumerate(parts) if p.startswith((".", "_"))), None)
        if hidden is not None:
            name = parts[hidden]
            where = "/".join([base.rstrip("/")] + parts[:hidden + 1]) + ("/" if hidden < len(parts) - 1 else "")
            kind = "hidden (name starts with '.')" if name.startswith(".") else \
                "name starts with '_' (Spark/Delta metadata such as _SUCCESS, _delta_log)"
            skipped.setdefault(_uri(fs, where, spec), kind)
            continue
        f, compression = _format_of(i.path, fmt)
        if f is None:
            if info.type == pafs.FileType.File:
                raise ValueError(f"cannot tell the format of {i.path}; set ingest.format (known: {_known()})")
            ext = "".join(PurePosixPath(i.base_name).suffixes) or "none"
            skipped[_uri(fs, i.path, spec)] = f"unknown extension {ext!r} (read: {_known()}; or set ingest.format)"
            continue
        if compression and f == "parquet":
            skipped[_uri(fs, i.path, spec)] = "a gzip-compressed Parquet file is not readable as Parquet"
            continue
        uri = _uri(fs, i.path, spec)
        if f == "json" and _extension(i.path) not in JSON_LINES_EXTENSIONS and _holds_json_array(uri, compression):
            f = "json_array"
        out.append(InputFile(uri, f, i.size, compression))
    skipped_list = sorted(skipped.items())
    if not out:
        why = "; ".join(f"{p}: {r}" for p, r in skipped_list[:5])
        raise FileNotFoundError(f"no input files ({_known()}) match {spec}" + (f"; skipped {why}" if why else ""))
    return Inputs(out, skipped_list)


def plan_chunks(files: list[InputFile], chunk_bytes: int) -> list[dict]:
    """Split JSON Lines files into byte ranges, Parquet files into row groups (read from the
    footer only), CSV and compressed files into one chunk each (quoted CSV fields may span
    lines; a gzip stream has no random access)."""
    if chunk_bytes < 1:
        raise ValueError(f"ingest.chunk_bytes must be >= 1, got {chunk_bytes}")
    chunks = []
    for file_index, f in enumerate(files):
        first = len(chunks)
        uri, fmt, size = f.uri, f.format, f.size
        if fmt == "json" and not f.compression:
            for s in range(0, max(size, 1), chunk_bytes):
                chunks.append({"file": uri, "format": fmt, "start": s, "end": min(s + chunk_bytes, size)})
        elif fmt == "parquet":
            fs, path = filesystem(uri)
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
            row = 1  # rows are numbered across row groups, from 1
            for g in range(meta.num_row_groups):
                chunks.append({"file": uri, "format": fmt, "start": g, "end": g + 1, "first_line": row})
                row += meta.row_group(g).num_rows
        else:
            chunks.append({"file": uri, "format": fmt, "start": 0, "end": size, "first_line": 1})
        for c in chunks[first:]:
            c["file_index"] = file_index
            c["compression"] = f.compression
    for i, c in enumerate(chunks):
        c["chunk"] = i
        c.setdefault("first_line", 0)  # JSON Lines: filled in from the line counts
    return chunks


# ---------------------------------------------------------------------------------------------
# task side: reading a chunk


def _open(uri: str, compression: str | None = None):
    """A buffered binary stream of the file; decompressed as it is read for ``gzip``."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        raw = open(path, "rb", buffering=1 << 20)
    else:
        raw = io.BufferedReader(fs.open_input_file(path), buffer_size=1 << 20)
    if compression == "gzip":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 20)
    if compression:
        raise ValueError(f"{uri}: unsupported compression {compression!r}")
    return raw


def count_line_starts(uri: str, start: int, end: int) -> int:
    """How many lines start at a byte offset in [start, end)."""
    if end <= start:
        return 0
    with _open(uri) as f:
        n = 0
        pos = max(start - 1, 0)
        f.seek(pos)
        if start == 0:
            n = 1  # the first line of the file
        remaining = end - 1 - pos  # newline positions p in [start-1, end-1) start a line at p+1
        while remaining > 0:
            buf = f.read(min(remaining, 8 << 20))
            if not buf:
                break
            n += buf.count(b"\n")
            remaining -= len(buf)
        return n


class OversizedLine(bytes):
    """The beginning (``max_line_bytes`` bytes) of a line longer than that; ``total``: its whole
    length in bytes (without the newline). The rest was skipped in bounded pieces, never held."""
    total: int

    def __new__(cls, head: bytes, total: int):
        self = super().__new__(cls, head)
        self.total = int(total)
        return self


SKIP_PIECE = 1 << 18   # bytes read at a time while skipping the rest of an oversized line


def _skip_line(f) -> tuple[int, bool]:
    """Read past the next newline (or to the end) in pieces of SKIP_PIECE: (bytes read, whether
    a newline ended them)."""
    n = 0
    while True:
        piece = f.readline(SKIP_PIECE)
        n += len(piece)
        if not piece:
            return n, False
        if piece.endswith(b"\n"):
            return n, True


def _read_line(f, max_bytes: int | None) -> tuple[bytes, int]:
    """(line, bytes consumed) of the next line: the line with its newline, or, when it is longer
    than ``max_bytes`` (its newline not counted), an :class:`OversizedLine` of its first
    ``max_bytes`` bytes, the rest skipped in bounded pieces. (b"", 0) at the end."""
    if max_bytes is None:
        line = f.readline()
        return line, len(line)
    line = f.readline(max_bytes + 1)
    if len(line) <= max_bytes or line.endswith(b"\n"):
        return line, len(line)
    skipped, newline = _skip_line(f)
    used = len(line) + skipped
    return OversizedLine(line[:max_bytes], used - newline), used


def iter_json_lines(uri: str, start: int, end: int, first_line: int,
                    compression: str | None = None, max_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes without newline) for the lines that start in [start, end); a
    UTF-8 BOM at the start of the file is dropped. A compressed file is read whole (its one
    chunk starts at 0). A line longer than ``max_bytes`` comes as an :class:`OversizedLine`
    (its beginning only): no line is ever read whole beyond that bound."""
    with _open(uri, compression) as f:
        pos = start
        if compression:
            end = sys.maxsize     # offsets are of the compressed bytes: read the stream to its end
        elif start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous chunk
                pos = start + _skip_line(f)[0]
        else:
            f.seek(0)
        line_no = first_line
        first = start == 0
        while pos < end:
            line, used = _read_line(f, max_bytes)
            if not used:
                break
            pos += used
            if isinstance(line, OversizedLine):
                yield line_no, line
                line_no += 1
                first = False
                continue
            if first:
                first = False
                if line.startswith(BOM):
                    line = line[len(BOM):]
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            yield line_no, line
            line_no += 1


@dataclass(frozen=True)
class ArrayProblem:
    """Where a JSON array file stops being one: ``head``, the bytes there (bounded), and why."""
    head: bytes
    detail: str


_WS = re.compile(rb"[ \t\r\n]*")
_NON_STRUCTURAL = re.compile(rb'[^"{}\[\],]*')
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\[\s\S][^"\\]*)*')   # up to a string's closing quote
ARRAY_BLOCK = 1 << 18


def iter_json_array(f, max_bytes: int, block: int = ARRAY_BLOCK) -> Iterator[tuple[int, int, object]]:
    """The elements of the one JSON array a binary stream holds, read in blocks of ``block``
    bytes: (line where the element starts, its index from 1, its bytes). An element longer than
    ``max_bytes`` comes as an :class:`OversizedLine` (its beginning; the rest is scanned, not
    kept), so memory stays bounded whatever the file. Elements are only delimited here (strings,
    escapes and bracket depth are tracked; a ``,`` or the closing ``]`` at depth 0 ends one), and
    parsed by the caller, so a malformed element is one bad record and the next one is read as
    usual. Where the array itself breaks (the file ends inside it, data after its ``]``) an
    :class:`ArrayProblem` comes, and reading stops."""
    line, index = 1, 0
    state = "start"                 # start | first | before | element | done
    depth, in_str, esc = 0, False, False
    pieces: list[bytes] = []
    size, elem_line, oversized = 0, 0, False
    first_block = True

    def add(piece: bytes) -> None:
        nonlocal size, oversized
        if not oversized and size + len(piece) > max_bytes:
            oversized = True
            pieces[:] = [b"".join(pieces + [piece])[:max_bytes]]
        elif not oversized:
            pieces.append(piece)
        size += len(piece)

    def element() -> object:
        if oversized:
            return OversizedLine(pieces[0], size)
        data = b"".join(pieces).rstrip(b" \t\r\n")
        if not data:
            return ArrayProblem(b"", "an empty element (two commas, or a comma before ']')")
        return data

    while True:
        buf = f.read(max(block, len(BOM)) if first_block else block)
        if not buf:
            break
        if first_block:
            first_block = False
            if buf.startswith(BOM):
                buf = buf[len(BOM):]
        p, n, cursor, start = 0, len(buf), 0, 0
        while p < n:
            if state != "element":
                p = _WS.match(buf, p).end()
                if p == n:
                    break
                c = buf[p]
                if state == "start":
                    if c != 0x5B:   # "["
                        line += buf.count(b"\n", cursor, p)
                        yield line, 0, ArrayProblem(buf[p:p + 200], "not a JSON array (no '[' at its start)")
                        return
                    state, p = "first", p + 1
                    continue
                if state == "done":
                    line += buf.count(b"\n", cursor, p)
                    yield line, index + 1, ArrayProblem(buf[p:p + max_bytes], "data after the array's closing ']'")
                    return
                if state == "first" and c == 0x5D:   # "[]": no element
                    state, p = "done", p + 1
                    continue
                line += buf.count(b"\n", cursor, p)
                cursor = p
                index += 1
                elem_line, pieces, size, oversized = line, [], 0, False
                state, start, depth, in_str, esc = "element", p, 0, False, False
                continue
            if in_str:
                if esc:
                    esc, p = False, p + 1
                    continue
                p = _STRING_BODY.match(buf, p).end()
                if p == n:
                    break
                if buf[p] == 0x5C:   # a backslash as the block's last byte: escape the next block's first
                    esc, p = True, p + 1
                else:
                    in_str, p = False, p + 1
                continue
            p = _NON_STRUCTURAL.match(buf, p).end()
            if p == n:
                break
            c = buf[p]
            if c == 0x22:                       # '"'
                in_str, p = True, p + 1
            elif c in (0x7B, 0x5B):             # '{' '['
                depth, p = depth + 1, p + 1
            elif depth > 0 and c in (0x7D, 0x5D):
                depth, p = depth - 1, p + 1
            elif depth == 0 and c in (0x2C, 0x5D):   # ',' or ']' ends the element
                add(buf[start:p])
                yield elem_line, index, element()
                state, p = ("before" if c == 0x2C else "done"), p + 1
            else:                               # a stray '}' at depth 0: part of a malformed element
                p += 1
        if state == "element":
            add(buf[start:n])
        line += buf.count(b"\n", cursor, n)
    if state == "element" and (depth or in_str):
        yield elem_line, index, ArrayProblem(b"".join(pieces)[:max_bytes],
                                             "the file ends inside this element: the array is not closed")
    elif state == "element":       # a complete element, then the end of the file: keep the element
        yield elem_line, index, element()
        yield line, index + 1, ArrayProblem(b"", "the file ends before the array's closing ']'")
    elif state in ("first", "before"):
        yield line, index + 1, ArrayProblem(b"", "the file ends before the array's closing ']'")


def _iter_json_array(uri: str, rules: Rules, compression: str | None = None) -> Iterator[tuple]:
    """(line, verdict, raw, element index) of every element of a JSON array file."""
    bound = max_line_bytes(rules.max_field_chars)
    with _open(uri, compression) as f:
        for line, index, elem in iter_json_array(f, bound):
            where = f"element {index} of the JSON array (line {line})"
            if isinstance(elem, ArrayProblem):
                yield line, Verdict(reason="malformed_json", detail=f"{where}: {elem.detail}"), elem.head, index
            elif isinstance(elem, OversizedLine):
                yield line, Verdict(reason="oversized_line",
                                    detail=f"{where}: {elem.total} bytes > {bound} (4 x ingest.max_field_chars); "
                                           "not read whole"), elem, index
            else:
                v = check_json_line(elem, rules)
                if v.reason is not None:
                    v = Verdict(reason=v.reason, detail=f"{where}" + (f": {v.detail}" if v.detail else ""))
                yield line, v, elem, index


def _raise_field_limit() -> int:
    """Lift the csv module's field size limit (131,072 characters by default, beyond which the
    reader raises and the task fails): fields are bounded by ``ingest.max_field_chars`` instead,
    a longer one quarantines its row as ``oversized_field``. Returns the previous limit."""
    previous = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return previous
        except OverflowError:   # a C long narrower than Py_ssize_t (Windows)
            limit //= 2


class _LineTooLong(Exception):
    """A CSV line longer than the bound; its beginning and its length in characters."""

    def __init__(self, head: str, total: int):
        super().__init__(f"line of {total} characters")
        self.head, self.total = head, total


class _BoundedLines:
    """The physical lines of a text stream (opened with ``newline=""``, as the csv module wants),
    each at most ``max_chars`` characters: a longer one is skipped in bounded pieces and raises
    :class:`_LineTooLong` (the iterator goes on after it). ``count``: lines read so far."""

    def __init__(self, text, max_chars: int):
        self.text, self.max_chars, self.count = text, max_chars, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.max_chars + 1)
        if not line:
            raise StopIteration
        self.count += 1
        if len(line) > self.max_chars and not line.endswith(("\n", "\r")):
            total = len(line)
            while True:
                piece = self.text.readline(SKIP_PIECE)
                if not piece:
                    break
                if piece.endswith(("\n", "\r")):
                    total += len(piece.rstrip("\r\n"))
                    break
                total += len(piece)
            raise _LineTooLong(line[:self.max_chars], total)
        return line


def _iter_csv(uri: str, rules: Rules, compression: str | None = None) -> Iterator[tuple[int, Verdict, str]]:
    previous = _raise_field_limit()
    max_chars = max_line_bytes(rules.max_field_chars)
    try:
        with _open(uri, compression) as f:
            # utf-8-sig: a BOM at the start of the file is dropped (it would otherwise stick to the
            # first header name and fail every row); one anywhere else stays part of its field
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
            lines = _BoundedLines(text, max_chars)
            reader = csv.reader(lines)
            try:
                header = next(reader)
            except StopIteration:
                return
            except _LineTooLong as exc:
                raise ValueError(f"{uri}: the CSV header (line 1) has {exc.total} characters, more than "
                                 f"{max_chars} (4 x ingest.max_field_chars): not a CSV header") from None
            start = lines.count + 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except _LineTooLong as exc:
                    # the record that holds it is quarantined from its first line; the lines
                    # after it are read afresh
                    yield start, Verdict(reason="oversized_line",
                                         detail=_oversized_detail(exc.total, max_chars, "characters")), \
                        OversizedText(exc.head, exc.total)
                    start = lines.count + 1
                    reader = csv.reader(lines)
                    continue
                line = start
                start = lines.count + 1
                raw = ",".join(row)
                if any(has_surrogates(v) for v in row) or any(has_surrogates(h) for h in header):
                    yield line, Verdict(reason="invalid_utf8", detail="undecodable bytes"), raw
                    continue
                if not any(v.strip() for v in row):
                    yield line, Verdict(reason="blank_line"), raw
                    continue
                if len(row) != len(header):
                    yield line, Verdict(reason="malformed_row",
                                        detail=f"{len(row)} columns, header has {len(header)}"), raw
                    continue
                yield line, check_object(dict(zip(header, row)), rules), raw
    finally:
        csv.field_size_limit(previous)


class OversizedText(str):
    """The beginning of an oversized CSV line; ``total``: its length in characters."""
    total: int

    def __new__(cls, head: str, total: int):
        self = super().__new__(cls, head)
        self.total = int(total)
        return self


def _oversized_detail(total: int, bound: int, unit: str = "bytes") -> str:
    return f"line of {total} {unit} > {bound} (4 x ingest.max_field_chars); not read whole"


def _iter_parquet(uri: str, group: int, first_line: int, rules: Rules) -> Iterator[tuple[int, Verdict, object]]:
    """(row number, verdict, raw) of one row group. Only the columns ``ingest.field_map`` maps to
    the four dolly fields are read (Parquet is columnar: any other column, however large, is never
    fetched nor decoded); raw is the row's mapped columns as a dict, made into text by the caller
    only for a rejected row."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        present = set(pf.schema_arrow.names)
        wanted = list(dict.fromkeys(key for _, key in rules.keys if key in present))
        line = first_line
        if not wanted:     # none of the fields: every row is missing them (counted from the footer)
            for _ in range(pf.metadata.row_group(group).num_rows):
                yield line, check_object({}, rules), {}
                line += 1
            return
        for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=wanted):
            cols = {}
            for name in batch.schema.names:
                col = batch.column(name)
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) \
                        or pa.types.is_string_view(col.type):
                    col = col.cast(pa.binary())  # decode ourselves, so invalid UTF-8 is caught
                cols[name] = col.to_pylist()
            for i in range(batch.num_rows):
                obj, bad = {}, None
                for name, values in cols.items():
                    v = values[i]
                    if isinstance(v, bytes):
                        try:
                            v = v.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            bad = Verdict(reason="invalid_utf8", detail=f"{name} byte {exc.start}")
                            v = v.decode("utf-8", "backslashreplace")
                    obj[name] = v
                yield line, bad or check_object(obj, rules), obj
                line += 1


def parse_chunk(chunk: dict, rules: Rules, raw_limit: int, batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """Validated rows of one chunk as Arrow batches in PARSED_SCHEMA (built column by column).
    ``pos`` orders the rows of the input: file, then line (the element index in a JSON array,
    where several elements may share a line)."""
    uri = chunk["file"]
    if chunk["format"] == "json":
        rules = replace(rules, from_json=True)
        bound = max_line_bytes(rules.max_field_chars)
        items = ((n, Verdict(reason="oversized_line", detail=_oversized_detail(line.total, bound))
                  if isinstance(line, OversizedLine) else check_json_line(line, rules), line, n)
                 for n, line in iter_json_lines(uri, chunk["start"], chunk["end"], chunk["first_line"],
                                                chunk.get("compression"), max_bytes=bound))
    elif chunk["format"] == "json_array":
        items = _iter_json_array(uri, replace(rules, from_json=True), chunk.get("compression"))
    elif chunk["format"] == "csv":
        items = ((n, v, raw, n) for n, v, raw in _iter_csv(uri, rules, chunk.get("compression")))
    else:
        items = ((n, v, raw, n) for n, v, raw in _iter_parquet(uri, chunk["start"], chunk["first_line"], rules))
    cols: list[list] = [[] for _ in PARSED_SCHEMA]
    (rid, ins, ctx, rsp, cat, _src, line_no, reason, detail, raws, order) = cols
    base = chunk["file_index"] << LINE_BITS
    for n, verdict, raw, at in items:
        r = verdict.record
        line_no.append(n)
        order.append(at)
        if r is not None:
            i, c, p, k = r["instruction"], r["context"], r["response"], r["category"]
            rid.append(record_id(i, c, p, k))
            ins.append(i)
            ctx.append(c)
            rsp.append(p)
            cat.append(k)
            reason.append(None)
            detail.append(None)
            raws.append(None)
        else:
            for col in (rid, ins, ctx, rsp, cat):
                col.append(None)
            reason.append(verdict.reason)
            detail.append(verdict.detail)
            if isinstance(raw, dict):    # a Parquet row: its mapped columns, as JSON text
                raw = json.dumps(raw, ensure_ascii=False, default=str)
            raws.append(raw_text(raw, raw_limit, getattr(raw, "total", None)))
        if len(line_no) >= batch_rows:
            yield _to_batch(cols, uri, base)
            for col in cols:
                col.clear()
    if line_no:
        yield _to_batch(cols, uri, base)


def _to_batch(cols: list[list], uri: str, base: int) -> pa.RecordBatch:
    import pyarrow.compute as pc
    n = len(cols[6])
    arrays = []
    for col, f in zip(cols, PARSED_SCHEMA):
        if f.name == "source_file":
            arrays.append(pa.array([uri] * n, type=f.type))   # one value per chunk
        elif f.name == "pos":
            arrays.append(pc.add(pa.array(col, type=pa.int64()), pa.scalar(base, pa.int64())))
        else:
            arrays.append(pa.array(col, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=PARSED_SCHEMA)


@dataclass(frozen=True)
class ChunkParser:
    """The mapInArrow function over ``spark.range(len(chunks))``: chunk ids in, rows out."""
    chunks: tuple
    rules: Rules
    raw_limit: int
    batch_rows: int = 8192

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for i in batch.column("id").to_pylist():
                yield from parse_chunk(self.chunks[i], self.rules, self.raw_limit, self.batch_rows)


@dataclass(frozen=True)
class LineCounter:
    """mapInArrow function: chunk ids in, (chunk, line starts) out."""
    chunks: tuple

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            ids = batch.column("id").to_pylist()
            counts = [count_line_starts(self.chunks[i]["file"], self.chunks[i]["start"], self.chunks[i]["end"])
                      for i in ids]
            yield pa.RecordBatch.from_arrays([pa.array(ids, pa.int64()), pa.array(counts, pa.int64())],
                                             names=["chunk", "lines"])


def rules_of(cfg: IngestConfig) -> Rules:
    return Rules(categories=frozenset(cfg.categories), max_field_chars=cfg.max_field_chars,
                 field_map=dict(cfg.field_map), default_category=cfg.default_category)


def _one_task_each(spark, n: int):
    return spark.range(0, n, 1, numPartitions=max(n, 1))


def parse_inputs(spark, cfg: IngestConfig):
    """(DataFrame in PARSED_DDL with one row per input line/row, ``reason`` null when valid;
    the :class:`Inputs`: files read and files skipped). Each chunk is one Spark task."""
    inputs = list_inputs(cfg.input, cfg.format)
    chunks = plan_chunks(inputs.files, cfg.chunk_bytes)
    # Pass 1: count the line starts of every JSON Lines chunk that has a successor in its file
    # (one small row per chunk comes back), so each chunk knows its first line number.
    json_chunks = [c for c in chunks if c["format"] == "json" and not c["compression"]]
    last = {c["file"]: c["chunk"] for c in json_chunks}
    to_count = tuple(c for c in json_chunks if c["chunk"] != last[c["file"]])
    counts: dict[int, int] = {}
    if to_count:
        got = (_one_task_each(spark, len(to_count)).mapInArrow(LineCounter(to_count), "chunk long, lines long")
               .toPandas().itertuples(index=False, name=None))
        counts = {to_count[i]["chunk"]: n for i, n in got}
    nxt: dict[str, int] = {}
    for c in json_chunks:
        c["first_line"] = nxt.get(c["file"], 1)
        if c["chunk"] in counts:
            nxt[c["file"]] = c["first_line"] + counts[c["chunk"]]
    parsed = _one_task_each(spark, len(chunks)).mapInArrow(
        ChunkParser(tuple(chunks), rules_of(cfg), cfg.raw_max_chars), PARSED_DDL)
    return parsed, inputs


def rejected_keys(keys, held=None):
    """(record_id, pos, why) of the valid lines that do not become bronze rows: every occurrence
    of a record_id after its first in input order (``repeated_in_input``), and the first one of a
    record_id that bronze holds already (``in_bronze``). The two are disjoint, so counting them
    counts the input's existing rows. ``keys``: (record_id, pos) of the valid lines; ``held``:
    bronze's record_ids (None: no bronze yet). One shuffle over both."""
    from pyspark.sql import functions as F

    tagged = keys.select("record_id", "pos", F.lit(False).alias("held"))
    if held is not None:
        tagged = tagged.unionByName(held.select("record_id", F.lit(None).cast("long").alias("pos"),
                                                F.lit(True).alias("held")))
    per_key = (tagged.groupBy("record_id")
               .agg(F.min("pos").alias("first"), F.collect_list("pos").alias("seen"), F.max("held").alias("held"))
               .filter((F.size("seen") > 1) | (F.col("held") & (F.size("seen") > 0))))
    return (per_key
            .select("record_id", "first",
                    F.explode(F.when(F.col("held"), F.col("seen"))
                              .otherwise(F.array_remove("seen", F.col("first")))).alias("pos"))
            .select("record_id", "pos",
                    F.when(F.col("pos") == F.col("first"), F.lit("in_bronze"))
                    .otherwise(F.lit("repeated_in_input")).alias("why")))
