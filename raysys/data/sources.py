"""Read one partner's table (parquet, csv or npz) into float32 features and int64 labels.

This runs only inside the partner's own workers (ARCHITECTURE.md invariant 1), so every check a
partner's data can fail happens here, before training starts, with a message that names the
partner, the file and the column: the person who reads it is usually the partner's data owner, not
the job author, and "ValueError: could not convert" would not tell them which of their files to fix.

npz layouts (chosen by the arrays present, see docs/data.md):
  * one 1-D array per column, keyed by column name (features and label alike); or
  * ``x``: a 2-D array [rows, n_features], optional ``feature_names`` (1-D str array, one name per
    column of ``x``; default ``x_0 .. x_{n-1}``), and the labels in an array named like the label
    column or, failing that, ``y``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysys.data.schema import DataError, TableSchema, check_schema_agreement, short_list

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
NPZ_SUFFIXES = (".npz",)

# pandas writes a non-trivial index as an extra column; it is bookkeeping, never a feature.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")
_INT64_MAX = np.iinfo(np.int64).max

# Builds the DataError for this partner and file; called as fail(message) or fail(message, column).
Fail = Callable[..., DataError]

# Defined in schema.py (the controller needs them without the file readers); re-exported here.
__all__ = [
    "DataError",
    "PartnerTable",
    "TableSchema",
    "check_schema_agreement",
    "load_partner_table",
]


@dataclass
class PartnerTable:
    x: np.ndarray  # float32 [rows, n_features], C-contiguous
    y: np.ndarray  # int64 [rows]
    schema: TableSchema


@dataclass
class _Column:
    """One source column before conversion. `values` is None when the column is not numeric."""

    name: str
    dtype: str
    values: np.ndarray | None
    nulls: int = 0


def load_partner_table(
    partner: str,
    path: str,
    features: list[str] | None,
    label: str,
    filesystem_uri_ok: bool = True,
) -> PartnerTable:
    """Load `path` for `partner`; `features=None` takes every column except the label."""

    def fail(msg: str, column: str | None = None) -> DataError:
        where = f"partner {partner!r} ({path})"
        return DataError(f"{where}: column {column!r}: {msg}" if column else f"{where}: {msg}")

    fmt = _format_of(path)
    if fmt is None:
        suffixes = ", ".join(PARQUET_SUFFIXES + CSV_SUFFIXES + NPZ_SUFFIXES)
        ext = os.path.splitext(path)[1] or "(none)"
        raise fail(f"unknown file extension {ext!r} (supported: {suffixes})")
    fs, inner = _resolve(path, filesystem_uri_ok, fail)

    if fmt == "npz":
        names, columns, rows = _read_npz(fs, inner, label, fail)
    else:
        names, columns, rows = _read_arrow(fs, inner, fmt, features, label, fail)

    if label not in names:
        raise fail(f"label column not found; the file has columns {short_list(names)}", label)
    if features is None:
        features = [n for n in names if n != label and not _PANDAS_INDEX.fullmatch(n)]
        if not features:
            raise fail(f"no feature columns besides label {label!r}")
    else:
        _check_feature_list(features, label, names, fail)

    if rows == 0:
        raise fail("file has 0 rows")

    x = np.empty((rows, len(features)), dtype=np.float32)
    schema_features = []
    for j, name in enumerate(features):
        col = columns[name]
        x[:, j] = _feature_values(col, fail)
        schema_features.append((name, col.dtype))
    y = _label_values(columns[label], fail)
    classes = tuple(int(c) for c in np.unique(y))
    schema = TableSchema(
        features=tuple(schema_features),
        label=(label, columns[label].dtype),
        classes=classes,
        rows=rows,
    )
    return PartnerTable(x=x, y=y, schema=schema)


# --- file access ----------------------------------------------------------------------------------


def _format_of(path: str) -> str | None:
    low = path.lower()
    formats = {"parquet": PARQUET_SUFFIXES, "csv": CSV_SUFFIXES, "npz": NPZ_SUFFIXES}
    return next((fmt for fmt, suffixes in formats.items() if low.endswith(suffixes)), None)


def _resolve(path: str, uri_ok: bool, fail: Fail) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or a filesystem URI into (filesystem, inner path); check it is a file."""
    if "://" in path:
        if not uri_ok:
            raise fail("filesystem URIs are not allowed here; give a local path")
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:  # bad scheme, unreachable store, missing credentials...
            raise fail(f"cannot open filesystem URI: {exc}") from exc
    else:
        fs, inner = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        info = fs.get_file_info(inner)
    except Exception as exc:
        raise fail(f"cannot stat file: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise fail("file not found")
    if info.type != pafs.FileType.File:
        raise fail("is not a regular file (a directory?)")
    if info.size == 0:
        raise fail("file is empty (0 bytes, 0 rows)")
    return fs, inner


def _read_arrow(
    fs: pafs.FileSystem, inner: str, fmt: str, features: list[str] | None, label: str, fail: Fail
) -> tuple[list[str], dict[str, _Column], int]:
    try:
        if fmt == "parquet":
            # Read the footer first so that only the needed columns are decoded.
            names = pq.read_schema(inner, filesystem=fs).names
            wanted = None if features is None else [c for c in (*features, label) if c in names]
            table = pq.read_table(inner, columns=wanted, filesystem=fs)
        else:
            with fs.open_input_stream(inner) as stream:  # decompresses .csv.gz by extension
                table = pacsv.read_csv(stream)
            names = table.column_names
    except Exception as exc:
        raise fail(f"cannot read {fmt} file: {exc}") from exc

    columns: dict[str, _Column] = {}
    for name in dict.fromkeys(table.column_names):
        hits = table.schema.get_all_field_indices(name)
        if len(hits) > 1:
            # Arrow tolerates duplicate names; we cannot know which one the partner meant.
            columns[name] = _Column(name, "duplicate", None)
            continue
        columns[name] = _arrow_column(name, table.column(hits[0]))
    return list(names), columns, table.num_rows


def _arrow_column(name: str, col: pa.ChunkedArray) -> _Column:
    t = col.type
    if pa.types.is_null(t):
        # What CSV inference gives a column whose every cell is empty/NA: report it as missing.
        return _Column(name, "null", np.zeros(len(col)), nulls=len(col))
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return _Column(name, str(t), None)
    dtype = np.dtype(t.to_pandas_dtype()).name
    if col.null_count:
        # Fill so that the array keeps its dtype; the nulls are reported via `nulls`.
        filler = False if pa.types.is_boolean(t) else 0
        values = col.fill_null(filler).to_numpy()
    else:
        values = col.to_numpy()
    return _Column(name, dtype, values, col.null_count)


def _read_npz(
    fs: pafs.FileSystem, inner: str, label: str, fail: Fail
) -> tuple[list[str], dict[str, _Column], int]:
    try:
        with fs.open_input_file(inner) as f:
            data = f.read()
        # allow_pickle=False: a data file must never be able to run code in the worker.
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not hasattr(npz, "files"):
            raise ValueError("not an .npz archive (a single .npy array?)")
    except Exception as exc:
        raise fail(f"cannot read npz file: {exc}") from exc

    def get(key: str) -> np.ndarray:
        try:
            return npz[key]
        except ValueError as exc:  # object arrays refused without pickle
            raise fail(f"cannot load array: {exc}", key) from exc

    with npz:
        if "x" in npz.files and get("x").ndim == 2:
            return _npz_matrix(npz.files, get, label, fail)
        columns, lengths = {}, {}
        for key in npz.files:
            arr = get(key)
            if arr.ndim != 1:
                raise fail(f"expected a 1-D array per column, got shape {arr.shape}", key)
            columns[key] = _numpy_column(key, arr)
            lengths[key] = len(arr)
        if len(set(lengths.values())) > 1:
            raise fail(f"columns have different lengths: {lengths}")
        return list(npz.files), columns, next(iter(lengths.values()), 0)


def _npz_matrix(
    files: list[str], get: Callable[[str], np.ndarray], label: str, fail: Fail
) -> tuple[list[str], dict[str, _Column], int]:
    x = get("x")
    n = x.shape[1]
    if "feature_names" in files:
        feature_names = [str(s) for s in get("feature_names").reshape(-1)]
        if len(feature_names) != n:
            raise fail(f"has {len(feature_names)} names but 'x' has {n} columns", "feature_names")
    else:
        feature_names = [f"x_{i}" for i in range(n)]
    label_key = label if label in files else "y" if "y" in files else None
    columns = {name: _numpy_column(name, x[:, j]) for j, name in enumerate(feature_names)}
    if label_key is not None:
        y = get(label_key)
        if y.shape != (x.shape[0],):
            raise fail(f"label array {label_key!r} has shape {y.shape}, 'x' has {x.shape}", label)
        columns[label] = _numpy_column(label, y)
    return [*feature_names, *([label] if label_key else [])], columns, x.shape[0]


def _numpy_column(name: str, arr: np.ndarray) -> _Column:
    if arr.dtype.kind in "biuf":
        return _Column(name, arr.dtype.name, arr)
    return _Column(name, arr.dtype.name, None)


# --- validation -----------------------------------------------------------------------------------


def _check_feature_list(features: Sequence[str], label: str, names: list[str], fail: Fail) -> None:
    if not features:
        raise fail("the feature list is empty")
    seen: set[str] = set()
    for f in features:
        if f in seen:
            raise fail("listed twice in features", f)
        seen.add(f)
    if label in seen:
        raise fail("is the label and cannot also be a feature", label)
    missing = [f for f in features if f not in names]
    if missing:
        raise fail(
            f"feature column not found ({len(missing)} missing: {short_list(missing)}); "
            f"the file has columns {short_list(names)}",
            missing[0],
        )


def _feature_values(col: _Column, fail: Fail) -> np.ndarray:
    if col.dtype == "duplicate":
        raise fail("appears more than once in the file", col.name)
    if col.values is None:
        raise fail(f"is not numeric (dtype {col.dtype})", col.name)
    bad = col.nulls
    if col.values.dtype.kind == "f":
        bad += int(np.count_nonzero(~np.isfinite(col.values)))
    if bad:
        detail = f" ({col.nulls} of them missing/null)" if col.nulls else ""
        raise fail(f"{bad} NaN/inf values{detail}", col.name)
    with np.errstate(over="ignore"):
        out = col.values.astype(np.float32)
    overflow = int(np.count_nonzero(~np.isfinite(out)))
    if overflow:
        raise fail(f"{overflow} values outside the float32 range", col.name)
    return out


def _label_values(col: _Column, fail: Fail) -> np.ndarray:
    if col.dtype == "duplicate":
        raise fail("appears more than once in the file", col.name)
    v = col.values
    if v is None:
        raise fail(f"labels must be integer class ids, got dtype {col.dtype}", col.name)
    if col.nulls:
        raise fail(f"{col.nulls} missing/null labels", col.name)
    if v.dtype.kind == "f":
        nonfinite = int(np.count_nonzero(~np.isfinite(v)))
        if nonfinite:
            raise fail(f"{nonfinite} NaN/inf labels", col.name)
        fractional = v != np.floor(v)
        if fractional.any():
            example = v[np.argmax(fractional)].item()
            raise fail(
                f"{int(fractional.sum())} non-integer labels (e.g. {example!r}); "
                "labels must be integer class ids",
                col.name,
            )
    negative = v < 0
    if negative.any():
        raise fail(
            f"{int(negative.sum())} negative labels (min {v.min().item()}); "
            "labels must be class ids >= 0",
            col.name,
        )
    if v.dtype.kind in "uf" and v.max() > _INT64_MAX:
        raise fail(f"label {v.max().item()} does not fit in int64", col.name)
    return v.astype(np.int64)
