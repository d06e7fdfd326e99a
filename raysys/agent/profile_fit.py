"""Step-time model of a synchronous data-parallel job, fitted from measured profiles.

The model is Pollux's (Qiao et al., OSDI 2021, section 3.2), so that the real GPU traces published
with that paper and the profiles `raysys profile` writes for our own live system fit the same way:

    compute(b)   = alpha_c + beta_c * b                        (one worker, local batch b, speed 1)
    sync(n, k)   = 0                                           if n == 1
                 = alpha_r + beta_r * max(n - 2, 0)            if k == 1 (all n workers on one node)
                 = alpha_n + beta_n * max(n - 2, 0)            if k > 1  (the ring crosses nodes)
    step(b,n,k)  = (compute^gamma + sync^gamma) ^ (1 / gamma)  (gamma >= 1: how much they overlap)

Profiles are CSV files in the Pollux `placements.csv` format: placement (replicas per node as
digits, e.g. ``1124``), local_bsz, step_time, sync_time. step_time - sync_time is the compute part.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

PROFILE_COLUMNS = ("placement", "local_bsz", "step_time", "sync_time")
TRACES_ENV = "RAYSYS_TRACES"
_MIN = 1e-8  # parameters are kept strictly positive so log-space fitting stays defined


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per step as a function of local batch, worker count and nodes crossed."""

    alpha_c: float
    beta_c: float
    alpha_r: float
    beta_r: float
    alpha_n: float
    beta_n: float
    gamma: float = 1.0

    @classmethod
    def parametric(
        cls,
        a: float,
        b: float,
        c: float,
        d: float,
        gamma: float = 1.0,
        c_local: float | None = None,
        d_local: float | None = None,
    ) -> StepTimeModel:
        """compute = a + b*batch; sync = c + d*(n-2)+ across nodes (c_local/d_local within one)."""
        return cls(
            a, b, c if c_local is None else c_local, d if d_local is None else d_local, c, d, gamma
        )

    def compute_time(self, local_batch: float) -> float:
        return self.alpha_c + self.beta_c * local_batch

    def sync_time(self, workers: int, nodes: int) -> float:
        if workers <= 1:
            return 0.0
        extra = max(workers - 2, 0)
        if nodes <= 1:
            return self.alpha_r + self.beta_r * extra
        return self.alpha_n + self.beta_n * extra

    def combine(self, compute: float, sync: float) -> float:
        """Overlap of compute and sync; the slowest worker of a step sets the step's time."""
        if sync <= 0.0:
            return compute
        g = self.gamma
        return (compute**g + sync**g) ** (1.0 / g)

    def step_time(self, local_batch: float, workers: int, nodes: int) -> float:
        return self.combine(self.compute_time(local_batch), self.sync_time(workers, nodes))

    def predict(self, local_bsz: np.ndarray, workers: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Vectorised step_time over arrays of rows."""
        compute = self.alpha_c + self.beta_c * local_bsz
        extra = np.maximum(workers - 2, 0)
        sync = np.where(
            nodes > 1, self.alpha_n + self.beta_n * extra, self.alpha_r + self.beta_r * extra
        )
        sync = np.where(workers > 1, sync, 0.0)
        g = self.gamma
        return (compute**g + sync**g) ** (1.0 / g)

    def scaled(self, compute: float = 1.0, sync: float = 1.0) -> StepTimeModel:
        """Same shape, compute and sync times multiplied (randomised scenarios, slower hardware)."""
        return StepTimeModel(
            self.alpha_c * compute,
            self.beta_c * compute,
            self.alpha_r * sync,
            self.beta_r * sync,
            self.alpha_n * sync,
            self.beta_n * sync,
            self.gamma,
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ProfileRows:
    """Profile rows as columns: workers/nodes are derived from the placement string."""

    placement: tuple[str, ...]
    local_bsz: np.ndarray
    step_time: np.ndarray
    sync_time: np.ndarray

    @property
    def workers(self) -> np.ndarray:
        return np.array([sum(int(c) for c in p) for p in self.placement], dtype=float)

    @property
    def nodes(self) -> np.ndarray:
        return np.array([len(p) for p in self.placement], dtype=float)

    def __len__(self) -> int:
        return len(self.placement)

    def subset(self, index: np.ndarray) -> ProfileRows:
        return ProfileRows(
            tuple(self.placement[i] for i in index),
            self.local_bsz[index],
            self.step_time[index],
            self.sync_time[index],
        )


@dataclass(frozen=True)
class FitReport:
    """A fitted model and its relative error on rows it did not see."""

    model: StepTimeModel
    train_rows: int
    test_rows: int
    median_rel_error: float
    p90_rel_error: float
    mean_rel_error: float


def placement_string(workers_per_node: Iterable[int]) -> str:
    """Pollux placement digits for a worker layout, e.g. [2, 1] -> '21' (a node holds <= 9)."""
    counts = [int(c) for c in workers_per_node if c > 0]
    if any(c > 9 for c in counts):
        raise ValueError(f"placement digits hold at most 9 workers per node, got {counts}")
    return "".join(str(c) for c in counts)


def write_profile_csv(rows: Iterable[Sequence | dict], path: str | Path) -> Path:
    """Write profile rows (placement, local_bsz, step_time, sync_time) in the Pollux format.

    Each row is a mapping with those keys or a 4-sequence in that order; placement may be a string
    of digits or a list of workers per node.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PROFILE_COLUMNS)
        for row in rows:
            values = [row[k] for k in PROFILE_COLUMNS] if isinstance(row, dict) else list(row)
            if len(values) != 4:
                raise ValueError(f"a profile row has 4 fields {PROFILE_COLUMNS}, got {row!r}")
            placement = values[0] if isinstance(values[0], str) else placement_string(values[0])
            step, sync = float(values[2]), float(values[3])
            if not (step > 0 and 0 <= sync < step):
                raise ValueError(f"need 0 <= sync_time < step_time, got {row!r}")
            writer.writerow([placement, int(values[1]), repr(step), repr(sync)])
    return path


def read_profile_csv(path: str | Path) -> ProfileRows:
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(PROFILE_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; need {PROFILE_COLUMNS}")
        records = [
            (
                r["placement"].strip(),
                float(r["local_bsz"]),
                float(r["step_time"]),
                float(r["sync_time"]),
            )
            for r in reader
        ]
    if not records:
        raise ValueError(f"{path}: no profile rows")
    for i, (placement, _, step, sync) in enumerate(records, start=2):
        if not placement.isdigit() or step <= 0 or sync < 0 or sync >= step:
            raise ValueError(f"{path}:{i}: bad row (placement digits, 0 <= sync < step)")
    placements, bsz, step, sync = zip(*records, strict=True)
    return ProfileRows(tuple(placements), np.array(bsz), np.array(step), np.array(sync))


def _residuals(
    log_params: np.ndarray,
    rows: ProfileRows,
    workers: np.ndarray,
    nodes: np.ndarray,
    single_node_only: bool,
) -> np.ndarray:
    p = np.exp(log_params)
    model = _model_from(p, single_node_only)
    compute = model.alpha_c + model.beta_c * rows.local_bsz
    # Two error terms, as Pollux fits them: the compute part alone and the whole step (log space,
    # so short and long steps weigh alike).
    measured_compute = np.maximum(rows.step_time - rows.sync_time, _MIN)
    err_compute = np.log(compute) - np.log(measured_compute)
    err_step = np.log(model.predict(rows.local_bsz, workers, nodes)) - np.log(rows.step_time)
    # A weak prior towards small retrogression keeps extrapolation to larger n optimistic.
    prior = 0.05 * np.array([p[3] / p[2], p[5] / p[4]])
    return np.concatenate([err_compute, err_step, prior])


def _model_from(p: np.ndarray, single_node_only: bool) -> StepTimeModel:
    p = [float(v) for v in p]
    gamma = 1.0 + p[6]
    if single_node_only:
        # Without multi-node rows nothing constrains alpha_n/beta_n: assume crossing nodes is at
        # least 10% slower than staying on one, as Pollux does.
        return StepTimeModel(p[0], p[1], p[2], p[3], p[2] * 1.1, p[3] * 1.1, gamma)
    return StepTimeModel(p[0], p[1], p[2], p[3], p[4], p[5], gamma)


def fit_rows(rows: ProfileRows) -> StepTimeModel:
    """Least-squares fit of the 7 parameters in log space (keeps them positive)."""
    from scipy.optimize import least_squares

    workers, nodes = rows.workers, rows.nodes
    compute = np.maximum(rows.step_time - rows.sync_time, _MIN)
    single = rows.local_bsz == rows.local_bsz.min()
    slope = _MIN
    if len(np.unique(rows.local_bsz)) > 1:
        slope = max(float(np.polyfit(rows.local_bsz, compute, 1)[0]), 1e-6)
    start_alpha_c = max(float(np.median(compute[single])) - slope * rows.local_bsz.min(), 1e-4)
    multi = rows.sync_time[workers > 1]
    start_sync = float(np.median(multi)) if len(multi) else 1e-3
    start = np.log(
        [start_alpha_c, slope, start_sync, start_sync / 10, start_sync, start_sync / 10, 0.5]
    )
    single_node_only = not np.any(nodes > 1)
    result = least_squares(
        _residuals,
        start,
        args=(rows, workers, nodes, single_node_only),
        bounds=(np.log(_MIN), np.log(1e4)),
        method="trf",
    )
    return _model_from(np.exp(result.x), single_node_only)


def relative_errors(model: StepTimeModel, rows: ProfileRows) -> np.ndarray:
    predicted = model.predict(rows.local_bsz, rows.workers, rows.nodes)
    return np.abs(predicted - rows.step_time) / rows.step_time


def fit_profile(csv_path: str | Path) -> StepTimeModel:
    """Fit a StepTimeModel to every row of a profile CSV (a file, or a trace folder)."""
    return _fit_profile_cached(str(_profile_file(csv_path)))


@lru_cache(maxsize=32)
def _fit_profile_cached(path: str) -> StepTimeModel:
    return fit_rows(read_profile_csv(path))


def fit_report(csv_path: str | Path, holdout_every: int = 5) -> FitReport:
    """Fit on all rows but every `holdout_every`-th and report relative error on those held out."""
    rows = read_profile_csv(_profile_file(csv_path))
    index = np.arange(len(rows))
    held = index % holdout_every == holdout_every - 1
    if held.sum() == 0 or (~held).sum() < 7:
        raise ValueError(f"{csv_path}: too few rows ({len(rows)}) to hold some out")
    model = fit_rows(rows.subset(index[~held]))
    errors = relative_errors(model, rows.subset(index[held]))
    return FitReport(
        model,
        int((~held).sum()),
        int(held.sum()),
        float(np.median(errors)),
        float(np.quantile(errors, 0.9)),
        float(errors.mean()),
    )


def _profile_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "placements.csv" if path.is_dir() else path


def traces_dir() -> Path:
    """The Pollux traces folder: $RAYSYS_TRACES, else ../shared/data/pollux-traces from the repo."""
    override = os.environ.get(TRACES_ENV)
    if override:
        return Path(override)
    repo = Path(__file__).resolve().parents[2]
    return (repo / ".." / "shared" / "data" / "pollux-traces").resolve()


def trace_profile(name: str) -> Path:
    """Path of a named trace's placements.csv (e.g. 'cifar10'); FileNotFoundError if absent."""
    path = traces_dir() / name / "placements.csv"
    if not path.is_file():
        raise FileNotFoundError(f"trace {name!r} not found at {path} (set ${TRACES_ENV})")
    return path


def ideal_throughput(model: StepTimeModel, global_batch: float, workers: int) -> float:
    """Samples/s of `workers` equal workers on one node each (nodes = workers), speed 1."""
    step = model.step_time(global_batch / workers, workers, workers)
    return global_batch / step if step > 0 and math.isfinite(step) else 0.0
