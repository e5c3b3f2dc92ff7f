"""Input files: paths, globs and URIs resolved to Parquet files, and their footers.

Footers are read once per run (`read_footers`, in threads) and travel with the paths as an
`InputFiles` value: the schema check, split pruning, the row count of a scoring job and the
driver's small reads all use the same footers instead of reading them again.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import SchemaError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
HIDDEN_PREFIXES = ("_", ".")
_GLOB_CHARS = "*?["


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `path` (a local path or any URI) and the path in it."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise SchemaError(f"{path}: cannot open this filesystem URI: {err}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _display(uri_or_path: str, fs_path: str, fs: pafs.FileSystem) -> str:
    """How a file is named to users and to Ray: a local path, or a URI with its scheme."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs_path
    return f"{uri_or_path.split('://', 1)[0]}://{fs_path}"


def _hidden(path: str, root: str) -> bool:
    """Whether a name of `path` below `root` starts with `_` or `.`: writers' leftovers
    (`_temporary/`, `_SUCCESS`, `.hive-staging*`) are never data, as in pyarrow's
    `ignore_prefixes`."""
    below = path[len(root.rstrip("/")) + 1 :].split("/")
    return any(part.startswith(HIDDEN_PREFIXES) for part in below)


def _is_data_file(path: str, root: str) -> bool:
    return not _hidden(path, root) and path.lower().endswith(PARQUET_SUFFIXES)


def resolve_files(path: str | list[str]) -> list[str]:
    """Expand folders (recursively, Parquet suffixes only), globs and files into a sorted list.

    Args:
        path: one or more local paths, globs or filesystem URIs (s3://, gs://, file://, ...).

    Example:
        >>> resolve_files("data/logs")  # doctest: +SKIP
        ['/abs/data/logs/day-2024-01-01.parquet', ...]
    """
    found: list[str] = []
    for item in [path] if isinstance(path, str) else path:
        fs, fs_path = filesystem_for(item)
        if any(ch in fs_path for ch in _GLOB_CHARS):
            base = fs_path[: min(fs_path.find(ch) for ch in _GLOB_CHARS if ch in fs_path)]
            base = base.rsplit("/", 1)[0]
            if isinstance(fs, pafs.LocalFileSystem):
                matches = sorted(p for p in glob.glob(fs_path, recursive=True) if os.path.isfile(p))
            else:
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                matches = sorted(
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, fs_path)
                )
            matches = [m for m in matches if not _hidden(m, base)]
            if not matches:
                raise SchemaError(f"{item}: no files match this pattern")
            found += [_display(item, m, fs) for m in matches]
            continue
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.NotFound:
            raise SchemaError(f"{item}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
            files = sorted(
                i.path
                for i in infos
                if i.type == pafs.FileType.File and _is_data_file(i.path, fs_path)
            )
            if not files:
                raise SchemaError(f"{item}: folder holds no Parquet files (*.parquet)")
            found += [_display(item, f, fs) for f in files]
        else:
            found.append(_display(item, fs_path, fs))
    return found


@dataclass(frozen=True)
class Footer:
    """One file's Parquet footer: its path, Arrow schema and metadata (row groups, stats)."""

    file: str
    schema: pa.Schema
    metadata: pq.FileMetaData

    def row_group_stats(self, column: str) -> list[Any] | None:
        """The column's statistics per row group (an entry is None where a row group has
        none); None when the file has no such column."""
        md = self.metadata
        names = [md.schema.column(i).path for i in range(md.num_columns)]
        if column not in names:
            return None
        index = names.index(column)
        return [md.row_group(rg).column(index).statistics for rg in range(md.num_row_groups)]


# What pyarrow raises for bytes it cannot decode (OSError: a page header, a truncated file).
DECODE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)


def corrupt_data(file: str, err: BaseException) -> SchemaError:
    """The error for a file whose footer reads but whose data does not."""
    reason = " ".join(str(err).split())  # Arrow's messages span lines; keep one
    return SchemaError(f"{file}: corrupt Parquet data, cannot read it ({reason})")


def first_unreadable(files: Iterable[str], columns: list[str]) -> SchemaError | None:
    """`corrupt_data` for the first file whose `columns` cannot be decoded, or None."""
    for file in files:
        fs, fs_path = filesystem_for(file)
        try:
            for _ in pq.ParquetFile(fs_path, filesystem=fs).iter_batches(columns=columns):
                pass
        except DECODE_ERRORS as err:
            return corrupt_data(file, err)
    return None


def _read_footer(file: str) -> Footer:
    fs, fs_path = filesystem_for(file)
    try:
        metadata = pq.read_metadata(fs_path, filesystem=fs)
        schema = metadata.schema.to_arrow_schema()
    except DECODE_ERRORS as err:
        raise SchemaError(f"{file}: not a Parquet file, or truncated ({err})") from None
    return Footer(file, schema, metadata)


def read_footers(files: list[str]) -> list[Footer]:
    """Footers of all files, read in parallel threads when there are many."""
    if len(files) <= 4:
        return [_read_footer(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(_read_footer, files))


@dataclass(frozen=True)
class InputFiles:
    """Checked input files with their footers (from `pipeline.data.validate.check_schema`).

    Example:
        >>> files = check_schema(config.data)  # doctest: +SKIP
        >>> files.paths[:1], files.rows  # doctest: +SKIP
        (['/abs/data/logs/day-2024-01-01.parquet'], 1000000)
    """

    footers: tuple[Footer, ...]

    @classmethod
    def read(cls, files: Iterable[str]) -> InputFiles:
        """Read the footers of `files` (in this order)."""
        return cls(tuple(read_footers(list(files))))

    @property
    def paths(self) -> list[str]:
        return [f.file for f in self.footers]

    @property
    def rows(self) -> int:
        return sum(f.metadata.num_rows for f in self.footers)

    def reordered(self, paths: list[str]) -> InputFiles:
        """The same files in the order of `paths` (each path one of `self.paths`)."""
        by_path = {f.file: f for f in self.footers}
        return InputFiles(tuple(by_path[p] for p in paths))

    def __len__(self) -> int:
        return len(self.footers)


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def file_days(path: str) -> set[str]:
    """The days a file belongs to by its path: a folder or the file itself named exactly a
    date, or a partition folder `<column>=<date>` (`2024-01-15/part-0.parquet`,
    `2024-01-15.parquet`, `day=2024-01-15/...`); a name merely holding a date gives none.

    Example:
        >>> sorted(file_days("s3://b/dt=2024-01-15/p.parquet")), file_days("x-2024-01-15.pq")
        (['2024-01-15'], set())
    """
    segments = path.split("/")
    names = [s.partition("=")[2] if "=" in s else s for s in segments[:-1]]
    names.append(segments[-1].split(".", 1)[0])
    return {name for name in names if _DAY.match(name)}


def join(base: str, *parts: str) -> str:
    """`base` (a local path or a URI) with `parts` appended, `/`-separated.

    Example:
        >>> join("s3://bucket/runs", "search", "state.json"), join("/tmp/runs", "x")
        ('s3://bucket/runs/search/state.json', '/tmp/runs/x')
    """
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def as_uri(path: str, storage: str) -> str:
    """A path as Ray reports it for something under `storage` (within its filesystem: no
    scheme) as a URI of that filesystem; local paths stay paths.

    Example:
        >>> as_uri("bucket/runs/c1", "s3://bucket/runs"), as_uri("/tmp/runs/c1", "/tmp/runs")
        ('s3://bucket/runs/c1', '/tmp/runs/c1')
    """
    scheme, found, _ = storage.partition("://")
    return f"{scheme}://{path}" if found and "://" not in path else path


def exists(path: str) -> bool:
    """Whether a file or folder exists at a local path or URI."""
    fs, fs_path = filesystem_for(path)
    return fs.get_file_info(fs_path).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    """A small text file's content, from a local path or URI."""
    fs, fs_path = filesystem_for(path)
    with fs.open_input_stream(fs_path) as stream:
        return stream.read().decode()


def write_text(path: str, text: str) -> None:
    """Write a small text file at a local path or URI (its folder is created)."""
    fs, fs_path = filesystem_for(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as stream:
        stream.write(text.encode())


SUCCESS_FILE = "_SUCCESS"
STAGING_FOLDER = "_temporary"


def staging_folder(output: str) -> str:
    """A new folder under `output` to write into before `commit` (hidden from readers: its
    name starts with `_`)."""
    import uuid

    return join(output, STAGING_FOLDER, uuid.uuid4().hex)


def commit(staging: str, output: str, marker: dict) -> list[str]:
    """Move every file written under `staging` to the same place under `output`, then write
    `_SUCCESS` (JSON: `marker`, plus the committed files) last, and remove the staging
    folder. A reader trusts an output only once `_SUCCESS` is there."""
    import json

    fs, source = filesystem_for(staging)
    _, target = filesystem_for(output)
    moved = []
    for info in fs.get_file_info(pafs.FileSelector(source, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(source.rstrip("/")) + 1 :]
        destination = f"{target.rstrip('/')}/{relative}"
        fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        fs.move(info.path, destination)
        moved.append(relative)
    discard(staging)
    write_text(join(output, SUCCESS_FILE), json.dumps({**marker, "files": sorted(moved)}, indent=1))
    return moved


def discard(staging: str) -> None:
    """Remove a staging folder and, when it was the last one, the `_temporary` folder."""
    fs, path = filesystem_for(staging)
    for folder in (path, path.rsplit("/", 1)[0]):
        info = fs.get_file_info(folder)
        empty = not fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        if info.type == pafs.FileType.Directory and (folder == path or empty):
            fs.delete_dir(folder)
