"""Per-partner data summaries, and the consistency checks the controller runs on them.

One model trains on every partner's rows, so partners must hold the same kind of data. Each
partner's worker calls `summarize` right after `load_partner_table` and sends the resulting
`DataSummary` to the controller, which calls `compare_summaries` once `check_schema_agreement`
has passed: hard mismatches raise `DataError`, strong distribution differences come back as
warnings that name the partner and the column.

What a summary reveals (residency, ARCHITECTURE.md invariant 1: only aggregates leave a worker):
  * the schema (column names, dtypes, label dtype) as a sha256 fingerprint plus the names/dtypes
    themselves (already in `TableSchema`), the row count, and the count of rows per class;
  * per feature: the number of missing (non-finite) values, the mean and the population std
    (ddof=0), and a min/max rounded *outward* to `RANGE_DIGITS` significant digits, so the range
    bounds the data without stating a row's exact extreme value (unless that value is itself
    round, like 0, 1 or 16);
  * nothing per row. Exceptions inherent to aggregates: a feature that is constant at a partner
    reveals that constant (it is every row's value), and class counts reveal how many rows have
    each label (the schema already reveals the set of classes).
  * Partners with fewer than `MIN_ROWS_FOR_STATS` rows get no per-feature statistics at all:
    with n <= 4 rows, the exact min, max, mean and std of a column determine every value of it
    (min and max are two values; sum and sum of squares then fix the other two). Their
    distribution is not checked, and `compare_summaries` says so.
Not covered: an observer who sees summaries of the same partner before and after one row was
added can difference them; summaries are computed once per job, from the file as loaded.

`load_partner_table` rejects any NaN, inf or null feature value (DataError naming partner and
column), so after a successful load every missing count is 0; `summarize` still counts non-finite
values and computes the statistics over the finite ones, so it is also correct on raw arrays.

This module needs only numpy (not pyarrow), so the controller can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np

from raysys.data.schema import DataError, TableSchema

# --- thresholds ---------------------------------------------------------------------------------

# Below this many rows a partner's per-feature statistics are withheld: with n <= 4 rows, min, max,
# mean and std of a column pin down all its values (see the module docstring); 5 is the first
# count where they do not.
MIN_ROWS_FOR_STATS = 5

# min/max are rounded outward to this many significant digits: coarse enough not to repeat a
# row's exact value, fine enough (<= 10% of the magnitude) for the range-overlap check.
RANGE_DIGITS = 2

# A difference is warned about only if data drawn from ONE distribution would show it with a
# probability below this (per column). It keeps small partners, whose statistics are noisy, from
# raising alarms by chance: with 784 columns, at most ~8% odds of one spurious warning per pair.
CHANCE = 1e-4

# Standardized mean difference (Cohen's d, within-partner variances pooled by rows) above which a
# feature's means count as far apart: d = 1 means the means are one typical spread apart, a
# "large" effect; random halves of one data set give d ~ sqrt(2/n), near 0.
MEAN_SHIFT_STD = 1.0

# Total variation distance between two partners' class proportions above which the
# class mix counts as strongly different: 0.5 means half of the partner's rows would have to
# change class to match. (Non-IID label mixes are normal in joint training; only strong ones are
# flagged, and only as warnings.)
LABEL_TV = 0.5

# The TV must also exceed this multiple of what sampling alone gives (an upper bound on the
# expected TV of same-distribution samples), so a 10-row partner is not flagged for its noise.
LABEL_TV_CHANCE_FACTOR = 3.0

# Column warnings per partner before the rest are summarised as "and N more": 784 pixel columns
# must not flood the log.
MAX_COLUMN_WARNINGS = 5

# Bumped whenever what goes into the fingerprint changes, so old and new summaries never match.
_FINGERPRINT_VERSION = 1
_BLOCK_ROWS = 65536  # rows per chunk in summarize: bounds the float64 temporaries on big tables


# --- the summary --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSummary:
    """What a partner's worker sends about its data: aggregates only, see the module docstring.

    Per-feature tuples are aligned with `features`; they are None when the partner has fewer
    than MIN_ROWS_FOR_STATS rows. A value is NaN for a column with fewer than
    MIN_ROWS_FOR_STATS finite values (only possible on raw arrays, see `summarize`).
    """

    fingerprint: str  # sha256 hex of feature names+dtypes and label dtype (see schema_fingerprint)
    features: tuple[tuple[str, str], ...]  # (name, dtype), as in TableSchema
    label: tuple[str, str]  # (name, dtype); the name is per-partner config, not in the fingerprint
    rows: int
    label_counts: tuple[tuple[int, int], ...]  # (class, rows), sorted by class, counts > 0
    missing: tuple[int, ...]  # non-finite values per feature
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None  # population std (ddof=0)
    min: tuple[float, ...] | None = None  # rounded down to RANGE_DIGITS significant digits
    max: tuple[float, ...] | None = None  # rounded up to RANGE_DIGITS significant digits

    @property
    def feature_names(self) -> list[str]:
        return [n for n, _ in self.features]

    @property
    def counts(self) -> dict[int, int]:
        return dict(self.label_counts)

    @property
    def has_stats(self) -> bool:
        return self.mean is not None


def schema_fingerprint(features: tuple[tuple[str, str], ...], label_dtype: str) -> str:
    """sha256 over the column names and dtypes, never over data.

    The label column's *name* is left out on purpose: each partner's spec may name its label
    column differently (`data.label`); its dtype must agree (check_schema_agreement).
    """
    canon = json.dumps(
        {"v": _FINGERPRINT_VERSION, "features": [list(f) for f in features], "label": label_dtype},
        separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode()).hexdigest()


def summarize(x: np.ndarray, y: np.ndarray, schema: TableSchema) -> DataSummary:
    """Summarize one partner's loaded table (x [rows, features], y [rows]) for the controller.

    Call it right after `load_partner_table`, inside the worker: `summarize(t.x, t.y, t.schema)`.
    """
    if x.ndim != 2 or x.shape[1] != len(schema.features) or y.shape != (x.shape[0],):
        raise ValueError(
            f"x {x.shape} and y {y.shape} do not match a schema of "
            f"{len(schema.features)} features"
        )
    rows = int(x.shape[0])
    classes, counts = np.unique(y, return_counts=True)
    label_counts = tuple((int(c), int(n)) for c, n in zip(classes, counts, strict=True))
    n, mean, m2, lo, hi = _column_moments(x)
    base = {
        "fingerprint": schema_fingerprint(schema.features, schema.label[1]),
        "features": schema.features,
        "label": schema.label,
        "rows": rows,
        "label_counts": label_counts,
        "missing": tuple(int(v) for v in rows - n),
    }
    if rows < MIN_ROWS_FOR_STATS:
        return DataSummary(**base)
    enough = n >= MIN_ROWS_FOR_STATS  # per column: all-NaN-but-a-few columns get NaN stats
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(m2 / n)

    def col(values: np.ndarray, fn=float) -> tuple[float, ...]:
        return tuple(fn(v) if ok else float("nan") for v, ok in zip(values, enough, strict=True))

    return DataSummary(
        **base,
        mean=col(mean),
        std=col(std),
        min=col(lo, lambda v: _round_out(v, down=True)),
        max=col(hi, lambda v: _round_out(v, down=False)),
    )


def _column_moments(
    x: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column: finite count, mean, sum of squared deviations, min, max (float64).

    Works in row blocks merged with Chan et al.'s parallel formula, so a large float32 table
    never gets a full-size float64 copy.
    """
    cols = x.shape[1]
    n = np.zeros(cols, dtype=np.int64)
    mean = np.zeros(cols)
    m2 = np.zeros(cols)
    lo = np.full(cols, np.inf)
    hi = np.full(cols, -np.inf)
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        block = np.asarray(x[start:start + _BLOCK_ROWS], dtype=np.float64)
        finite = np.isfinite(block)
        if finite.all():
            bn = np.full(cols, block.shape[0], dtype=np.int64)
            bmean = block.mean(axis=0)
            bm2 = ((block - bmean) ** 2).sum(axis=0)
            blo, bhi = block.min(axis=0), block.max(axis=0)
        else:
            bn = finite.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                bmean = np.where(finite, block, 0.0).sum(axis=0) / bn
            bmean = np.where(bn > 0, bmean, 0.0)
            bm2 = np.where(finite, (block - bmean) ** 2, 0.0).sum(axis=0)
            blo = np.where(finite, block, np.inf).min(axis=0)
            bhi = np.where(finite, block, -np.inf).max(axis=0)
        total = n + bn
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = bmean - mean
            mean = np.where(total > 0, mean + delta * (bn / total), 0.0)
            m2 = np.where(total > 0, m2 + bm2 + delta**2 * (n * bn / total), 0.0)
        n, lo, hi = total, np.minimum(lo, blo), np.maximum(hi, bhi)
    return n, mean, m2, lo, hi


def _round_out(v: float, down: bool) -> float:
    """Round `v` down (or up) to RANGE_DIGITS significant digits; the result still bounds `v`."""
    v = float(v)
    if v == 0.0 or not math.isfinite(v):
        return v
    d = Decimal(v)  # exact binary value, so the rounded bound never lands inside the data
    quantum = Decimal(1).scaleb(d.adjusted() - RANGE_DIGITS + 1)
    out = float(d.quantize(quantum, rounding=ROUND_FLOOR if down else ROUND_CEILING))
    # Decimal -> float may round back across v; step one ulp outward if it did.
    if down and out > v:
        out = math.nextafter(out, -math.inf)
    elif not down and out < v:
        out = math.nextafter(out, math.inf)
    return out


# --- comparing partners -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pooled:
    """The other partners' class counts as one (label checks compare a partner with them)."""

    name: str  # for messages: "'alpha'" or "the other partners"
    rows: int
    counts: dict[int, int]


def compare_summaries(summaries: Mapping[str, DataSummary]) -> list[str]:
    """Check that all partners hold consistent data; return warnings, raise DataError on a hard
    mismatch.

    Hard (DataError): schema fingerprints that differ (naming the first differing column), or a
    summary whose fingerprint does not match its own columns. check_schema_agreement catches
    the same schema differences first with its own messages; this is the check on the summaries.

    Warnings, each naming the partner and the column:
      * a feature whose mean is more than MEAN_SHIFT_STD pooled std from another partner's, or
        whose range does not overlap another partner's. These are checked pair by pair and a
        partner is named only when it differs from a strict majority of the others, so one odd
        partner does not get every partner flagged (with two partners, the second is named);
      * a feature constant at one partner but varying at the others, or the reverse;
      * a class with rows at one partner and none at the others, or none at one partner but
        common at several others; a class mix at total variation distance above LABEL_TV
        (pairwise, majority as above);
      * missing values (impossible after load_partner_table, which rejects them);
      * partners with too few rows to have their features checked.
    A difference is reported only if same-distribution data would show it with probability below
    CHANCE (distribution-free bounds, so rare values held by a small partner raise nothing; the
    price: a partner of a few dozen rows needs a mean ~3 std off to be flagged). At most
    MAX_COLUMN_WARNINGS warnings per partner; the rest are counted.
    """
    if not summaries:
        raise DataError("no partner summaries to compare")
    _check_fingerprints(summaries)
    names = list(summaries)
    warnings: list[str] = []
    for name in names:
        s = summaries[name]
        if not s.has_stats:
            warnings.append(
                f"partner {name!r}: {s.rows} rows (< {MIN_ROWS_FOR_STATS}): feature statistics "
                "withheld (they would reveal its rows), its feature distribution is not checked"
            )
    if len(names) < 2:
        return warnings
    for i, name in enumerate(names):
        s = summaries[name]
        others = {n: summaries[n] for n in names if n != name}
        rest = _pool(others)
        # Pairwise checks are symmetric: with two partners, report them once, for the second.
        pairs = {} if len(names) == 2 and i == 0 else others
        found = _label_warnings(name, s, rest, summaries, pairs) + _missing_warnings(name, s)
        if s.has_stats:
            found += _feature_warnings(name, s, others, pairs)
        warnings += found[:MAX_COLUMN_WARNINGS]
        if len(found) > MAX_COLUMN_WARNINGS:
            more = len(found) - MAX_COLUMN_WARNINGS
            warnings.append(f"partner {name!r}: and {more} more column(s) differ")
    return warnings



def _check_fingerprints(summaries: Mapping[str, DataSummary]) -> None:
    for name, s in summaries.items():
        if s.fingerprint != schema_fingerprint(s.features, s.label[1]):
            raise DataError(
                f"partner {name!r}: summary fingerprint does not match its own columns "
                "(summary built by a different raysys version?)"
            )
        n = len(s.features)
        stats = (s.mean, s.std, s.min, s.max)
        lengths = {len(s.missing)} | {len(t) for t in stats if t is not None}
        if lengths != {n}:
            raise DataError(f"partner {name!r}: summary statistics do not cover its {n} features")
    ref_name, ref = next(iter(summaries.items()))
    for name, s in summaries.items():
        if s.fingerprint != ref.fingerprint:
            raise DataError(
                f"partner {name!r} schema fingerprint {s.fingerprint[:12]} differs from partner "
                f"{ref_name!r} ({ref.fingerprint[:12]}): {_first_difference(s, ref, ref_name)}"
            )


def _first_difference(s: DataSummary, ref: DataSummary, ref_name: str) -> str:
    names, ref_names = s.feature_names, ref.feature_names
    missing = [c for c in ref_names if c not in names]
    if missing:
        return f"column {missing[0]!r} missing ({len(missing)} missing in all)"
    extra = [c for c in names if c not in ref_names]
    if extra:
        return f"column {extra[0]!r} not at partner {ref_name!r} ({len(extra)} extra in all)"
    if names != ref_names:
        i = next(i for i, (a, b) in enumerate(zip(names, ref_names, strict=True)) if a != b)
        return f"position {i} is column {names[i]!r} but {ref_names[i]!r} at {ref_name!r}"
    ref_dtypes = dict(ref.features)
    for col, dtype in s.features:
        if dtype != ref_dtypes[col]:
            return f"column {col!r} has dtype {dtype} but {ref_dtypes[col]} at {ref_name!r}"
    return (
        f"label column {s.label[0]!r} has dtype {s.label[1]} but {ref.label[1]} "
        f"at {ref_name!r}"
    )


def _pool(others: Mapping[str, DataSummary]) -> _Pooled:
    label = repr(next(iter(others))) if len(others) == 1 else "the other partners"
    counts: dict[int, int] = {}
    for s in others.values():
        for c, k in s.label_counts:
            counts[c] = counts.get(c, 0) + k
    return _Pooled(label, sum(s.rows for s in others.values()), counts)


def _missing_warnings(name: str, s: DataSummary) -> list[str]:
    return [
        f"partner {name!r} column {col!r}: {k} missing values of {s.rows}"
        for col, k in zip(s.feature_names, s.missing, strict=True)
        if k
    ]


def _feature_warnings(
    name: str, s: DataSummary, others: Mapping[str, DataSummary], pairs: Mapping[str, DataSummary]
) -> list[str]:
    """Column warnings for partner `name`: each column is compared with every other partner,
    and reported only when it differs from a strict majority of them (naming the closest)."""
    out = []
    comparable = {n: t for n, t in others.items() if t.has_stats}
    for j, col in enumerate(s.feature_names):
        if any(math.isnan(v) for v in (s.mean[j], s.std[j], s.min[j], s.max[j])):
            continue
        diffs, compared = [], 0
        for other, t in comparable.items():
            if math.isnan(t.mean[j]):
                continue
            compared += 1
            found = _pair_difference(s, t, j, repr(other), other in pairs, len(others) == 1)
            if found is not None:
                diffs.append(found)
        if diffs and 2 * len(diffs) > compared:
            _, text = min(diffs)
            tail = f"; differs from {len(diffs)} of {compared} partners" if compared > 1 else ""
            out.append(f"partner {name!r} column {col!r}: {text}{tail}")
    return out


def _pair_difference(
    s: DataSummary, t: DataSummary, j: int, other: str, symmetric: bool, two_partners: bool
) -> tuple[float, str] | None:
    """(standardized distance, description) if column j differs strongly between s and t.

    `symmetric`: also run the symmetric checks (ranges, means); with two partners they run for
    the second one only, so a difference is reported once.
    """
    m, sd, lo, hi = s.mean[j], s.std[j], s.min[j], s.max[j]
    tm, tsd, tlo, thi = t.mean[j], t.std[j], t.min[j], t.max[j]
    n, nt = s.rows, t.rows
    # Constant here, varying there (a column filled with a default?): blamed on the constant
    # side, so it is checked whatever `symmetric` says; the reverse only with 3+ partners (with
    # two, the other partner's own check reports it).
    if sd == 0 and tsd > 0 and tlo <= m <= thi:
        varying = _rows_not_equal(m, nt, tm, tsd, tlo, thi)
        if _all_in_group(nt, n + nt, varying) < CHANCE:
            return math.inf, (
                f"constant {m:.3g} here but varies in {other} (mean {tm:.3g}, std {tsd:.3g})"
            )
        return None
    if tsd == 0 and sd > 0 and lo <= tm <= hi:
        varying = _rows_not_equal(tm, n, m, sd, lo, hi)
        if not two_partners and _all_in_group(n, n + nt, varying) < CHANCE:
            return math.inf, (
                f"varies here (mean {m:.3g}, std {sd:.3g}) but is constant {tm:.3g} in {other}"
            )
        return None
    if not symmetric:
        return None
    # Cohen's d with the within-partner variances weighted by rows: a 7-row partner whose
    # sample std happens to be near 0 must not shrink the scale.
    pooled = math.sqrt((n * sd**2 + nt * tsd**2) / (n + nt))
    d = abs(m - tm) / pooled if pooled > 0 else (math.inf if m != tm else 0.0)
    if hi < tlo or thi < lo:
        if _disjoint_by_chance(n, nt) >= CHANCE:
            return None
        return d, (
            f"range [{lo:.3g}, {hi:.3g}] does not overlap [{tlo:.3g}, {thi:.3g}] in {other}"
        )
    if pooled == 0:
        return (d, f"constant {m:.3g} vs {tm:.3g} in {other}") if m != tm else None
    if d > MEAN_SHIFT_STD and _mean_gap_by_chance(s, t, j) < CHANCE:
        return d, f"mean {m:.3g} vs {tm:.3g} in {other} ({d:.1f} pooled std apart)"
    return None


def _mean_gap_by_chance(s: DataSummary, t: DataSummary, j: int) -> float:
    """Upper bound on the chance of a mean gap this large in column j if the two partners' rows
    were shuffled together (one distribution): Bernstein's inequality, which also holds for
    sampling without replacement, P(|mean_n - mu| >= e) <= 2 exp(-n e^2 / (2 var + 2/3 R e)).

    A normal z-test is not used on purpose: a 12-row partner that happens to hold one of the three
    non-zero values of a rare pixel looks 4.6 standard errors away, but the range term R keeps
    that bound near 1, while a real shift between large partners still gets a tiny bound.
    """
    n, nt = s.rows, t.rows
    total = n + nt
    m, tm = s.mean[j], t.mean[j]
    mu = (n * m + nt * tm) / total
    var = (n * (s.std[j] ** 2 + (m - mu) ** 2) + nt * (t.std[j] ** 2 + (tm - mu) ** 2)) / total
    spread = max(s.max[j], t.max[j]) - min(s.min[j], t.min[j])
    bound = 1.0
    # The gap m - tm fixes both partners' deviations from mu; either sample's bound applies.
    for rows, gap in ((n, abs(m - mu)), (nt, abs(tm - mu))):
        denom = 2 * var + 2 / 3 * spread * gap
        if denom > 0:
            bound = min(bound, 2 * math.exp(-rows * gap**2 / denom))
    return bound


def _rows_not_equal(c: float, n: int, mean: float, std: float, lo: float, hi: float) -> float:
    """Lower bound on how many of n rows (with this mean, std and range) differ from c.

    For X in [lo, hi]: (X - c)^2 <= D^2 with D the farther bound, and it is 0 when X == c, so the
    fraction of rows != c is >= mean((X - c)^2) / D^2 = (std^2 + (mean - c)^2) / D^2.
    """
    far = max(hi - c, c - lo)
    return n * min(1.0, (std**2 + (mean - c) ** 2) / far**2) if far > 0 else 0.0


def _all_in_group(group: int, total: int, k: float) -> float:
    """Upper bound on the chance that k particular rows (rows of one class, rows != a constant)
    all fall in one group of `group` rows out of `total`, if the partners' rows were shuffled
    among them (same distribution everywhere): C(group, k) / C(total, k) <= (group / total)^k.
    A small partner holding the only few rows of a rare value is therefore not flagged."""
    return (group / total) ** k if total else 1.0


def _disjoint_by_chance(n: int, m: int) -> float:
    """P(all n rows fall on one side of all m rows) for exchangeable continuous data: 2/C(n+m, n).
    Ties (discrete data) only make disjoint ranges less likely."""
    log_comb = math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
    return min(1.0, 2.0 * math.exp(-log_comb))


def _label_warnings(
    name: str, s: DataSummary, rest: _Pooled, summaries: Mapping[str, DataSummary],
    pairs: Mapping[str, DataSummary],
) -> list[str]:
    head = f"partner {name!r} column {s.label[0]!r}"
    here = s.counts
    out = []
    for c, k in sorted(here.items()):
        # Class c only here: a strong signal unless it is a few rows of a rare class.
        if rest.counts.get(c, 0) == 0 and _all_in_group(s.rows, s.rows + rest.rows, k) < CHANCE:
            out.append(
                f"{head}: class {c} has {k} rows ({k / s.rows:.0%}) here but none in {rest.name}"
            )
    holders = {c: sum(1 for t in summaries.values() if t.counts.get(c, 0)) for c in rest.counts}
    for c, k in sorted(rest.counts.items()):
        # A class held by a single other partner is reported there ("none in ..."), not twice.
        if c in here or holders[c] < 2:
            continue
        q = k / rest.rows
        if _all_in_group(rest.rows, s.rows + rest.rows, k) < CHANCE:
            out.append(f"{head}: class {c} has no rows here but {q:.0%} of rows in {rest.name}")
    diffs = []
    for other, t in pairs.items():
        tv, noise = _class_mix_distance(s, t)
        if tv > LABEL_TV and tv > LABEL_TV_CHANCE_FACTOR * noise:
            diffs.append((tv, other))
    if diffs and 2 * len(diffs) > len(pairs):
        tv, other = min(diffs)
        tail = f"; differs from {len(diffs)} of {len(pairs)} partners" if len(pairs) > 1 else ""
        out.append(
            f"{head}: class mix differs from {other!r} (total variation distance {tv:.2f}){tail}"
        )
    return out


def _class_mix_distance(s: DataSummary, t: DataSummary) -> tuple[float, float]:
    """Total variation distance of the class proportions, and an upper bound on its expected
    value for two same-distribution samples of these sizes (E|p_hat - q| <= sqrt(Var) per class,
    summed and halved)."""
    a, b = s.counts, t.counts
    classes = sorted(set(a) | set(b))
    p = np.array([a.get(c, 0) / s.rows for c in classes])
    q = np.array([b.get(c, 0) / t.rows for c in classes])
    tv = 0.5 * float(np.abs(p - q).sum())
    mix = (p * s.rows + q * t.rows) / (s.rows + t.rows)
    noise = 0.5 * float(np.sqrt(mix * (1 - mix) * (1 / s.rows + 1 / t.rows)).sum())
    return tv, noise


# --- report ---------------------------------------------------------------------------------------


def format_summary_table(summaries: Mapping[str, DataSummary]) -> str:
    """Plain-text table, one line per partner, for the final report and logs."""
    header = ("partner", "rows", "fingerprint", "classes", "missing", "features")
    lines = [header]
    for name, s in summaries.items():
        counts = " ".join(f"{c}:{k}" for c, k in s.label_counts)
        if len(counts) > 48:
            counts = f"{len(s.label_counts)} classes ({counts[:40]}...)"
        if s.has_stats:
            stats = f"{len(s.features)} ({sum(1 for v in s.std if v == 0)} constant)"
        else:
            stats = f"{len(s.features)} (stats withheld: < {MIN_ROWS_FOR_STATS} rows)"
        lines.append((name, str(s.rows), s.fingerprint[:12], counts, str(sum(s.missing)), stats))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )
