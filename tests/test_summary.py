"""DataSummary / compare_summaries: fingerprints, exact statistics, no row content, and warnings
that name the partner and the column. Pure unit tests: no Ray, no files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from raysys.data.schema import DataError, TableSchema
from raysys.data.summary import (
    MAX_COLUMN_WARNINGS,
    MIN_ROWS_FOR_STATS,
    DataSummary,
    compare_summaries,
    format_summary_table,
    schema_fingerprint,
    summarize,
)

FEATURES = tuple((f"f{i}", "float64") for i in range(4))


def schema_for(x: np.ndarray, y: np.ndarray, features=None, label=("label", "int64")):
    feats = features or tuple((f"f{i}", "float64") for i in range(x.shape[1]))
    return TableSchema(feats, label, tuple(int(c) for c in np.unique(y)), len(y))


def summary_of(x: np.ndarray, y: np.ndarray, **kw) -> DataSummary:
    return summarize(x, y, schema_for(x, y, **kw))


def random_table(rows: int, seed: int, cols: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols)).astype(np.float32)
    y = rng.integers(0, classes, size=rows).astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm], y[perm]


def digits_schema(y: np.ndarray) -> TableSchema:
    feats = tuple((f"pixel_{i}", "float32") for i in range(64))
    return TableSchema(feats, ("label", "int64"), tuple(int(c) for c in np.unique(y)), len(y))


def digits_parts(digits, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = digits
    names = ["alpha", "beta", "gamma", "delta"][:n]
    return {name: (x[ix], y[ix]) for name, ix in
            zip(names, np.array_split(np.arange(len(y)), n), strict=True)}


def summaries_of(parts: dict) -> dict[str, DataSummary]:
    return {name: summarize(x, y, digits_schema(y)) for name, (x, y) in parts.items()}


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_depends_on_names_and_dtypes_only():
    fp = schema_fingerprint(FEATURES, "int64")
    assert fp == schema_fingerprint(tuple(FEATURES), "int64")
    assert len(fp) == 64
    renamed = (("g0", "float64"), *FEATURES[1:])
    retyped = (("f0", "float32"), *FEATURES[1:])
    reordered = (FEATURES[1], FEATURES[0], *FEATURES[2:])
    others = {schema_fingerprint(f, "int64") for f in (renamed, retyped, reordered)}
    others.add(schema_fingerprint(FEATURES, "float64"))
    assert fp not in others and len(others) == 4


def test_fingerprint_ignores_data_and_label_name():
    x1, y1 = random_table(50, seed=1)
    x2, y2 = random_table(80, seed=2)
    a = summary_of(x1, y1)
    b = summary_of(x2, y2, label=("target", "int64"))  # label names are per-partner config
    assert a.fingerprint == b.fingerprint


def test_fingerprint_mismatch_raises_naming_column():
    x, y = random_table(50, seed=1)
    alpha = summary_of(x, y)
    retyped = (("f0", "float64"), ("f1", "int64"), ("f2", "float64"), ("f3", "float64"))
    beta = summary_of(x, y, features=retyped)
    with pytest.raises(DataError, match=r"partner 'beta'.*column 'f1' has dtype int64.*'alpha'"):
        compare_summaries({"alpha": alpha, "beta": beta})
    renamed = (("f0", "float64"), ("f1", "float64"), ("f2", "float64"), ("z", "float64"))
    with pytest.raises(DataError, match=r"partner 'gamma'.*column 'f3' missing"):
        compare_summaries({"alpha": alpha, "gamma": summary_of(x, y, features=renamed)})


def test_forged_fingerprint_is_refused():
    x, y = random_table(50, seed=1)
    s = summary_of(x, y)
    bad = DataSummary(**{**s.__dict__, "fingerprint": "0" * 64})
    with pytest.raises(DataError, match="partner 'beta'.*does not match its own columns"):
        compare_summaries({"alpha": s, "beta": bad})


# --- statistics -------------------------------------------------------------------------------


def test_stats_equal_numpy():
    x, y = random_table(1000, seed=3, cols=6, classes=4)
    x[:, 2] *= 1000.0
    s = summary_of(x, y)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, x64.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.std, x64.std(axis=0), rtol=1e-10)
    assert s.rows == 1000 and s.missing == (0,) * 6
    assert s.counts == {int(c): int(n) for c, n in zip(*np.unique(y, return_counts=True),
                                                       strict=True)}
    # min/max are rounded outward: they bound the data, within 10% (two significant digits).
    lo, hi = x64.min(axis=0), x64.max(axis=0)
    assert np.all(np.array(s.min) <= lo) and np.all(np.array(s.max) >= hi)
    np.testing.assert_allclose(s.min, lo, rtol=0.1)
    np.testing.assert_allclose(s.max, hi, rtol=0.1)


def test_stats_chunked_equal_numpy(monkeypatch):
    """Block merging (Chan's formula) agrees with one pass, including a shifted column."""
    import raysys.data.summary as summary

    monkeypatch.setattr(summary, "_BLOCK_ROWS", 7)
    x, y = random_table(100, seed=4)
    x[:, 1] += 1e4
    s = summary_of(x, y)
    np.testing.assert_allclose(s.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.std, x.astype(np.float64).std(axis=0), rtol=1e-9)


def test_missing_values_counted_and_skipped():
    """load_partner_table refuses NaN, but summarize on raw arrays counts them and skips them."""
    x, y = random_table(40, seed=5)
    x[[1, 5, 9], 2] = np.nan
    x[0, 3] = np.inf
    s = summary_of(x, y)
    assert s.missing == (0, 0, 3, 1)
    col = x[:, 2].astype(np.float64)
    np.testing.assert_allclose(s.mean[2], np.nanmean(col), rtol=1e-10)
    np.testing.assert_allclose(s.std[2], np.nanstd(col), rtol=1e-10)
    clean = summary_of(*random_table(40, seed=6))
    warnings = compare_summaries({"alpha": clean, "beta": s})
    assert any("partner 'beta' column 'f2': 3 missing values" in w for w in warnings)


def test_round_out_bounds_exactly():
    from raysys.data.summary import _round_out

    for v in (0.0, 1.0, 16.0, 0.1, -0.1, 123.456, -123.456, 1e-7, 3.0e30, 97.0):
        lo, hi = _round_out(v, down=True), _round_out(v, down=False)
        assert lo <= v <= hi
    assert _round_out(123.456, down=True) == 120.0 and _round_out(123.456, down=False) == 130.0
    assert _round_out(-0.0123, down=True) == -0.013


# --- residency: no row leaves ----------------------------------------------------------------


def feature_numbers(s: DataSummary) -> set[float]:
    """Every per-feature number of the summary (the rest are counts: rows, missing, classes)."""
    nums: set[float] = set()
    for t in (s.mean, s.std, s.min, s.max):
        nums |= set(t or ())
    return nums


@pytest.mark.parametrize("rows", [MIN_ROWS_FOR_STATS, 6, 50, 5000])
def test_summary_holds_no_row_value(rows):
    x, y = random_table(rows, seed=rows, cols=8)
    s = summary_of(x, y)
    nums = feature_numbers(s)
    # Not just whole rows: no single feature value of any row appears among the numbers.
    assert not any(float(v) in nums for v in x.ravel())
    assert not any(float(v) in nums for v in x.astype(np.float64).ravel())


@pytest.mark.parametrize("rows", range(1, MIN_ROWS_FOR_STATS))
def test_tiny_partner_gets_no_feature_stats(rows):
    """With <= 4 rows, min, max, mean and std would determine every value of a column."""
    x, y = random_table(rows, seed=rows)
    s = summary_of(x, y)
    assert not s.has_stats and s.mean is s.std is s.min is s.max is None
    assert s.rows == rows and sum(s.counts.values()) == rows
    big = summary_of(*random_table(100, seed=9))
    warnings = compare_summaries({"alpha": big, "tiny": s})
    assert any("partner 'tiny'" in w and "withheld" in w for w in warnings)


def test_summary_size_does_not_grow_with_rows():
    small = pickle.dumps(summary_of(*random_table(10, seed=1)))
    large = pickle.dumps(summary_of(*random_table(200_000, seed=1)))
    assert abs(len(large) - len(small)) < 64  # only the digits of the counts differ
    assert len(large) < 4096


# --- warnings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_same_distribution_splits_give_no_warnings(digits, n):
    summaries = summaries_of(digits_parts(digits, n))
    assert compare_summaries(summaries) == []


def test_shifted_feature_warns_naming_partner_and_column(digits):
    parts = digits_parts(digits, 3)
    x, y = parts["beta"]
    x = x.copy()
    x[:, 3] += 10.0
    parts["beta"] = (x, y)
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("partner 'beta' column 'pixel_3': ")
    assert "does not overlap" in warnings[0]


def test_mean_shift_with_overlapping_ranges_warns(digits):
    parts = digits_parts(digits, 2)
    x, y = parts["beta"]
    x = x.copy()
    x[:, 20] = np.clip(x[:, 20] + 0.6, 0, 1)  # same [0, 1] range, mean moved by ~2 std
    parts["beta"] = (x, y)
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("partner 'beta' column 'pixel_20': mean ")
    assert "in 'alpha'" in warnings[0] and "pooled std apart" in warnings[0]


def test_constant_feature_at_one_partner_warns(digits):
    parts = digits_parts(digits, 3)
    x, y = parts["gamma"]
    x = x.copy()
    x[:, 36] = 0.0  # a column the partner filled with zeros
    parts["gamma"] = (x, y)
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("partner 'gamma' column 'pixel_36': constant 0 here")


def test_label_only_at_one_partner_warns(digits):
    parts = digits_parts(digits, 2)
    x, y = parts["beta"]
    keep = y != 9
    parts["beta"] = (x[keep], y[keep])
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == 1, warnings
    assert "partner 'alpha' column 'label': class 9 has" in warnings[0]
    assert "none in 'beta'" in warnings[0]


def test_label_missing_at_one_of_three_warns(digits):
    parts = digits_parts(digits, 3)
    x, y = parts["gamma"]
    keep = y != 4
    parts["gamma"] = (x[keep], y[keep])
    warnings = compare_summaries(summaries_of(parts))
    assert warnings == [
        "partner 'gamma' column 'label': class 4 has no rows here but 10% of rows in the "
        "other partners"
    ]


def test_class_mix_difference_warns(digits):
    x, y = digits
    low, high = y < 5, y >= 5
    # alpha: mostly classes 0-4; beta: mostly 5-9 (a few of each kept so no class is absent).
    a = np.concatenate([np.flatnonzero(low)[:600], np.flatnonzero(high)[:60]])
    b = np.concatenate([np.flatnonzero(high)[60:660], np.flatnonzero(low)[600:660]])
    parts = {"alpha": (x[a], y[a]), "beta": (x[b], y[b])}
    warnings = compare_summaries(summaries_of(parts))
    tv = [w for w in warnings if "class mix" in w]
    assert len(tv) == 1 and tv[0].startswith("partner 'beta' column 'label'"), warnings


def test_small_partner_noise_is_not_flagged(digits):
    x, y = digits
    parts = {"alpha": (x[:1500], y[:1500]), "small": (x[1500:1510], y[1500:1510])}
    assert compare_summaries(summaries_of(parts)) == []


def test_rare_value_at_small_partner_is_not_flagged():
    """12 rows holding one of the three non-zero values of a rare column: a z-test calls that
    4+ standard errors; under shuffling it happens in ~2.5% of splits, so no warning."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1418, 3)).astype(np.float32)
    x[:, 1] = 0.0
    x[[3, 700, 1410], 1] = 0.0625
    y = rng.integers(0, 3, size=1418)
    parts = {"big": (x[:1406], y[:1406]), "small": (x[1406:], y[1406:])}
    summaries = {n: summary_of(a, b) for n, (a, b) in parts.items()}
    assert summaries["small"].mean[1] > 0 and compare_summaries(summaries) == []
    # The same for the rare value only at the small partner: "constant here" is not flagged.
    x[[3, 700], 1] = 0.0
    summaries = {"big": summary_of(x[:1406], y[:1406]), "small": summary_of(x[1406:], y[1406:])}
    assert compare_summaries(summaries) == []


def test_varies_at_one_partner_constant_at_the_others(digits):
    parts = digits_parts(digits, 3)
    for name in ("alpha", "beta"):
        x, y = parts[name]
        x = x.copy()
        x[:, 36] = 0.0
        parts[name] = (x, y)
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("partner 'gamma' column 'pixel_36': varies here")
    assert "constant 0 in 'alpha'; differs from 2 of 2 partners" in warnings[0]


def test_warnings_capped_per_partner(digits):
    parts = digits_parts(digits, 2)
    x, y = parts["beta"]
    x = x + 5.0  # every column shifted out of range
    parts["beta"] = (x, y)
    warnings = compare_summaries(summaries_of(parts))
    assert len(warnings) == MAX_COLUMN_WARNINGS + 1
    assert warnings[-1].startswith("partner 'beta': and ")
    assert all(w.startswith("partner 'beta'") for w in warnings)


def test_single_partner_and_empty():
    s = summary_of(*random_table(30, seed=1))
    assert compare_summaries({"alpha": s}) == []
    with pytest.raises(DataError):
        compare_summaries({})


def test_format_summary_table(digits):
    summaries = summaries_of(digits_parts(digits, 2))
    summaries["tiny"] = summary_of(*random_table(3, seed=1, cols=64),
                                   features=digits_schema(np.arange(3)).features)
    text = format_summary_table(summaries)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["partner", "rows", "fingerprint"]
    assert lines[1].startswith("alpha") and "withheld" in lines[3]
