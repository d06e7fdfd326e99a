"""A ready-made multi-partner data set: scikit-learn's digits, split non-IID across partners.

The digits ship inside scikit-learn (no download), so `raysys data demo` works on an offline
machine. The split is the usual federated-learning benchmark recipe: for every class, a
Dirichlet(alpha) draw decides what fraction of that class each partner gets, so small alpha gives
partners very different class mixes (the situation joint training is for), large alpha near-IID.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LABEL = "label"
FEATURES = [f"pixel_{i}" for i in range(64)]
_REDRAWS = 200  # Dirichlet redraws before falling back to topping up the small partners


def write_digits_demo(
    out_dir: str | Path,
    partners: Sequence[str] = ("alpha", "beta", "gamma"),
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    min_rows: int = 20,
) -> dict[str, Path]:
    """Write `<partner>.parquet` for each partner and `test.parquet`; return {name: path}.

    The test set is a stratified `test_fraction` of all rows, shared by nobody (it is for
    evaluating the joint model). Every partner gets at least `min_rows` training rows.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    partners = list(partners)
    _check_args(partners, alpha, test_fraction, min_rows)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
    y = digits.target.astype(np.int64)

    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed])))
    test_rows, train_rows = _stratified_split(y, test_fraction, rng)
    if len(train_rows) < min_rows * len(partners):
        raise ValueError(
            f"{len(train_rows)} training rows cannot give {len(partners)} partners "
            f"{min_rows} rows each"
        )
    shards = _dirichlet_split(y, train_rows, len(partners), alpha, min_rows, rng)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in [*zip(partners, shards, strict=True), ("test", test_rows)]:
        rows = rng.permutation(rows)  # files not sorted by class, as real data would not be
        paths[name] = out / f"{name}.parquet"
        _write_parquet(paths[name], x[rows], y[rows])
    return paths


def describe_split(paths: Mapping[str, str | Path]) -> str:
    """A table of rows and per-class counts (columns = class ids) for each file, for the CLI."""
    labels = {n: pq.read_table(p, columns=[LABEL])[LABEL].to_numpy() for n, p in paths.items()}
    classes = np.unique(np.concatenate(list(labels.values())))
    width = max(len("name"), *(len(n) for n in labels))
    lines = [f"{'name':<{width}}  {'rows':>5} | " + " ".join(f"{c:>4}" for c in classes)]
    lines.append("-" * len(lines[0]))
    for name, y in labels.items():
        counts = " ".join(f"{np.count_nonzero(y == c):>4}" for c in classes)
        lines.append(f"{name:<{width}}  {len(y):>5} | {counts}")
    return "\n".join(lines)


def _check_args(partners: list[str], alpha: float, test_fraction: float, min_rows: int) -> None:
    if not partners:
        raise ValueError("at least one partner is needed")
    if len(set(partners)) != len(partners):
        raise ValueError(f"partner names must be distinct, got {partners}")
    for name in partners:
        if not name or name == "test" or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"partner name {name!r} cannot be used as a file name here")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1, got {min_rows}")


def _stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, train rows): `fraction` of every class, rounded, goes to the test set."""
    test, train = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * len(rows)))
        test.append(rows[:k])
        train.append(rows[k:])
    return np.concatenate(test), np.concatenate(train)


def _dirichlet_split(
    y: np.ndarray,
    rows: np.ndarray,
    n_partners: int,
    alpha: float,
    min_rows: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split `rows` across partners, class by class, with Dirichlet(alpha) proportions."""
    by_class = [rng.permutation(rows[y[rows] == c]) for c in np.unique(y[rows])]
    for _ in range(_REDRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(n_partners)]
        for class_rows in by_class:
            p = rng.dirichlet(np.full(n_partners, alpha))
            cuts = np.round(np.cumsum(p)[:-1] * len(class_rows)).astype(int)
            for shard, part in zip(shards, np.split(class_rows, cuts), strict=True):
                shard.append(part)
        split = [np.concatenate(s) for s in shards]
        if min(len(s) for s in split) >= min_rows:
            return split
    # Tiny alpha with many partners rarely leaves everyone min_rows rows; rather than fail, move
    # rows (deterministically) from the largest partners to the short ones.
    return _top_up(split, min_rows, rng)


def _top_up(split: list[np.ndarray], min_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    split = [rng.permutation(s) for s in split]
    for i in range(len(split)):
        while len(split[i]) < min_rows:
            donor = max(range(len(split)), key=lambda j: (len(split[j]), -j))
            take = min(min_rows - len(split[i]), len(split[donor]) - min_rows)
            split[i] = np.concatenate([split[i], split[donor][:take]])
            split[donor] = split[donor][take:]
    return split


def _write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    columns = {name: pa.array(x[:, j], type=pa.float32()) for j, name in enumerate(FEATURES)}
    columns[LABEL] = pa.array(y, type=pa.int64())
    pq.write_table(pa.table(columns), path)


def write_blobs_table(path: str | Path, rows: int, features: int, classes: int, seed: int) -> str:
    """A synthetic classification table (Gaussian blobs, columns f0.. and `label`), for tests and
    benchmarks that need data of a given shape without the digits."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features))
    y = rng.integers(0, classes, size=rows)
    x = (centers[y] + rng.normal(scale=1.5, size=(rows, features))).astype(np.float32)
    cols = {f"f{i}": x[:, i] for i in range(features)}
    cols[LABEL] = y.astype(np.int64)
    pq.write_table(pa.table(cols), path)
    return str(path)
