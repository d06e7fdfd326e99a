"""The digits demo split: right files and columns, non-IID, no row lost or duplicated, seeded."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysys.data import check_schema_agreement, load_partner_table
from raysys.data.demo import FEATURES, describe_split, write_digits_demo

PARTNERS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_digits_demo(tmp_path_factory.mktemp("digits"))


def histograms(paths) -> dict[str, np.ndarray]:
    return {
        name: np.bincount(pq.read_table(p)["label"].to_numpy(), minlength=10)
        for name, p in paths.items()
    }


def test_writes_one_file_per_partner_plus_test(split):
    assert list(split) == [*PARTNERS, "test"]
    for name, path in split.items():
        assert path.name == f"{name}.parquet" and path.exists()
        schema = pq.read_schema(path)
        assert schema.names == [*FEATURES, "label"]
        assert all(str(schema.field(f).type) == "float" for f in FEATURES)
        assert str(schema.field("label").type) == "int64"


def test_pixels_scaled_to_unit_interval(split):
    x = load_partner_table("alpha", str(split["alpha"]), None, "label").x
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9


def sort_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_every_digit_lands_in_exactly_one_file(split):
    from sklearn.datasets import load_digits

    digits = load_digits()
    want = np.column_stack([digits.data / 16.0, digits.target]).astype(np.float32)
    got = np.concatenate(
        [
            np.column_stack([t.x, t.y]).astype(np.float32)
            for t in (load_partner_table(n, str(p), None, "label") for n, p in split.items())
        ]
    )
    assert len(got) == len(want) == 1797
    np.testing.assert_array_equal(sort_rows(got), sort_rows(want))  # same multiset of rows


def test_test_set_is_stratified(split):
    test = histograms(split)["test"]
    assert test.sum() == pytest.approx(0.2 * 1797, abs=5)
    assert test.max() - test.min() <= 2  # digits has 174..183 rows per class


def test_partners_are_non_iid(split):
    hist = histograms(split)
    shares = {p: hist[p] / hist[p].sum() for p in PARTNERS}
    # Total variation distance between class mixes; IID shards of this size would be ~0.05.
    tv = [0.5 * np.abs(shares[a] - shares[b]).sum() for a in PARTNERS for b in PARTNERS if a < b]
    assert max(tv) > 0.3
    assert all(hist[p].sum() >= 20 for p in PARTNERS)


def test_large_alpha_is_close_to_iid(tmp_path):
    hist = histograms(write_digits_demo(tmp_path, alpha=1000.0))
    shares = [hist[p] / hist[p].sum() for p in PARTNERS]
    assert max(0.5 * np.abs(shares[0] - s).sum() for s in shares) < 0.1


def test_deterministic_by_seed(tmp_path, split):
    again = write_digits_demo(tmp_path / "again")
    other = write_digits_demo(tmp_path / "other", seed=1)
    for name in split:
        assert pq.read_table(again[name]).equals(pq.read_table(split[name]))
    assert not pq.read_table(other["alpha"]).equals(pq.read_table(split["alpha"]))


def test_partners_agree_on_schema(split):
    schemas = {
        n: load_partner_table(n, str(p), None, "label").schema
        for n, p in split.items()
        if n != "test"
    }
    names, num_classes = check_schema_agreement(schemas, 10)
    assert names == FEATURES and num_classes == 10


def test_min_rows_holds_even_when_alpha_is_tiny(tmp_path):
    partners = [f"p{i}" for i in range(12)]
    hist = histograms(write_digits_demo(tmp_path, partners=partners, alpha=0.01, min_rows=30))
    assert all(hist[p].sum() >= 30 for p in partners)
    assert sum(hist[p].sum() for p in partners) + hist["test"].sum() == 1797


def test_describe_split_lists_rows_and_class_counts(split):
    text = describe_split(split)
    hist = histograms(split)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "rows", "|"]
    for name in split:
        row = next(line for line in lines if line.startswith(name + " "))
        cells = row.replace("|", " ").split()
        assert cells[0] == name and int(cells[1]) == hist[name].sum()
        assert [int(c) for c in cells[2:]] == hist[name].tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"partners": []}, "at least one partner"),
        ({"partners": ["a", "a"]}, "distinct"),
        ({"partners": ["test"]}, "file name"),
        ({"partners": ["../x"]}, "file name"),
        ({"alpha": 0.0}, "alpha"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"partners": [f"p{i}" for i in range(80)]}, "cannot give 80 partners"),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_digits_demo(tmp_path, **kwargs)


def test_the_cli_writes_the_demo_split(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "raysys.cli", "data", "demo", "--out",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "alpha.parquet", "beta.parquet", "gamma.parquet", "test.parquet"]
