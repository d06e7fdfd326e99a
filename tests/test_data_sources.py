"""load_partner_table and check_schema_agreement: round trips in every format, and every error names
the partner, the file and (where one is to blame) the column."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raysys.data import (
    DataError,
    TableSchema,
    check_schema_agreement,
    load_partner_table,
)

FEATURES = ["f0", "f1", "f2"]


@pytest.fixture
def frame() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f0": rng.normal(size=12).astype(np.float64),
        "f1": rng.integers(-5, 5, size=12).astype(np.int64),
        "f2": rng.random(12).astype(np.float32),
        "label": np.array([0, 1, 2, 3] * 3, dtype=np.int64),
    }


def write_parquet(path: Path, cols: dict) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def write_csv(path: Path, cols: dict) -> str:
    pacsv.write_csv(pa.table(cols), path)
    return str(path)


def expected_x(frame: dict) -> np.ndarray:
    return np.stack([frame[f].astype(np.float32) for f in FEATURES], axis=1)


def check_loaded(table, frame: dict) -> None:
    assert table.x.dtype == np.float32 and table.x.flags.c_contiguous
    assert table.y.dtype == np.int64
    np.testing.assert_array_equal(table.x, expected_x(frame))
    np.testing.assert_array_equal(table.y, frame["label"])
    assert table.schema.rows == 12
    assert table.schema.classes == (0, 1, 2, 3)
    assert [n for n, _ in table.schema.features] == FEATURES


# --- round trips ----------------------------------------------------------------------------------


def test_parquet_round_trip_keeps_dtypes_and_order(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", frame)
    table = load_partner_table("alpha", path, None, "label")
    check_loaded(table, frame)
    assert table.schema.features == (("f0", "float64"), ("f1", "int64"), ("f2", "float32"))
    assert table.schema.label == ("label", "int64")


def test_parquet_selects_and_orders_requested_features(tmp_path, frame):
    path = write_parquet(tmp_path / "a.pq", frame)
    table = load_partner_table("alpha", path, ["f2", "f0"], "label")
    assert [n for n, _ in table.schema.features] == ["f2", "f0"]
    np.testing.assert_array_equal(table.x[:, 0], frame["f2"])
    np.testing.assert_array_equal(table.x[:, 1], frame["f0"].astype(np.float32))


def test_parquet_ignores_pandas_index_column(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", {**frame, "__index_level_0__": np.arange(12)})
    table = load_partner_table("alpha", path, None, "label")
    assert [n for n, _ in table.schema.features] == FEATURES


def test_csv_round_trip(tmp_path, frame):
    path = write_csv(tmp_path / "a.csv", frame)
    table = load_partner_table("alpha", path, FEATURES, "label")
    np.testing.assert_allclose(table.x, expected_x(frame), rtol=1e-6)
    np.testing.assert_array_equal(table.y, frame["label"])
    # CSV types are inferred: floats come back as float64, whatever they were written from.
    assert table.schema.features == (("f0", "float64"), ("f1", "int64"), ("f2", "float64"))


def test_gzipped_csv_round_trip(tmp_path, frame):
    plain = Path(write_csv(tmp_path / "a.csv", frame))
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    table = load_partner_table("alpha", str(gz), None, "label")
    np.testing.assert_array_equal(table.y, frame["label"])
    assert table.schema.rows == 12


def test_npz_one_array_per_column(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, **frame)
    table = load_partner_table("alpha", str(path), None, "label")
    check_loaded(table, frame)
    assert table.schema.features == (("f0", "float64"), ("f1", "int64"), ("f2", "float32"))


def test_npz_matrix_with_feature_names_and_named_label(tmp_path, frame):
    path = tmp_path / "a.npz"
    x = expected_x(frame)
    np.savez(path, x=x, feature_names=np.array(FEATURES), label=frame["label"])
    table = load_partner_table("alpha", str(path), None, "label")
    check_loaded(table, frame)
    assert table.schema.features == tuple((f, "float32") for f in FEATURES)


def test_npz_matrix_defaults_names_and_takes_y_as_label(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, x=expected_x(frame), y=frame["label"])
    table = load_partner_table("alpha", str(path), ["x_1"], "target")
    np.testing.assert_array_equal(table.x[:, 0], frame["f1"].astype(np.float32))
    assert table.schema.label == ("target", "int64")


def test_integral_float_and_bool_labels_are_accepted(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": frame["label"].astype(float)})
    table = load_partner_table("alpha", path, None, "label")
    np.testing.assert_array_equal(table.y, frame["label"])
    assert table.schema.label == ("label", "float64")
    path = write_parquet(tmp_path / "b.parquet", {**frame, "label": frame["label"] % 2 == 1})
    assert load_partner_table("alpha", path, None, "label").schema.classes == (0, 1)


def test_file_uri_via_pyarrow_filesystem(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", frame)
    table = load_partner_table("alpha", Path(path).as_uri(), None, "label")
    check_loaded(table, frame)
    csv = write_csv(tmp_path / "a.csv", frame)
    assert load_partner_table("alpha", Path(csv).as_uri(), None, "label").schema.rows == 12


def test_uri_refused_when_not_allowed(tmp_path, frame):
    uri = Path(write_parquet(tmp_path / "a.parquet", frame)).as_uri()
    with pytest.raises(DataError, match=r"partner 'alpha' \(file://.*a\.parquet\): .*URI"):
        load_partner_table("alpha", uri, None, "label", filesystem_uri_ok=False)


# --- errors ---------------------------------------------------------------------------------------


def load_error(partner: str, path: str, features=None, label: str = "label") -> str:
    with pytest.raises(DataError) as info:
        load_partner_table(partner, path, features, label)
    message = str(info.value)
    assert f"partner {partner!r}" in message and path in message, message
    return message


def test_missing_file(tmp_path):
    assert "not found" in load_error("beta", str(tmp_path / "nope.parquet"))


def test_unknown_extension(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("f0,label\n1,0\n")
    assert "unknown file extension '.txt'" in load_error("beta", str(path))


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.parquet").mkdir()
    assert "not a regular file" in load_error("beta", str(tmp_path / "d.parquet"))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"this is not parquet")
    assert "cannot read parquet" in load_error("beta", str(path))


def test_missing_feature_column(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", frame)
    message = load_error("beta", path, ["f0", "pixel_9", "zz"])
    assert "column 'pixel_9'" in message and "2 missing" in message


def test_missing_label_column(tmp_path, frame):
    path = write_csv(tmp_path / "a.csv", frame)
    assert "column 'target': label column not found" in load_error("beta", path, label="target")


def test_label_listed_as_feature(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", frame)
    assert "column 'label'" in load_error("beta", path, ["f0", "label"])


def test_feature_listed_twice(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", frame)
    assert "column 'f0': listed twice" in load_error("beta", path, ["f0", "f0"])


def test_only_a_label_column(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"label": [0, 1]})
    assert "no feature columns" in load_error("beta", path)


def test_empty_parquet(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"f0": pa.array([], pa.float32()), "label": []})
    assert "0 rows" in load_error("beta", path)


def test_header_only_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f0,label\n")
    assert "0 rows" in load_error("beta", str(path))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"")
    assert "empty" in load_error("beta", str(path))


def test_non_numeric_feature(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", {**frame, "f1": ["x"] * 12})
    assert "column 'f1': is not numeric (dtype string)" in load_error("beta", path)


def test_non_numeric_feature_in_npz(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, **{**frame, "f2": np.array(["a"] * 12)})
    assert "column 'f2': is not numeric" in load_error("beta", str(path))


def test_nan_and_inf_in_feature_are_counted(tmp_path, frame):
    f0 = frame["f0"].copy()
    f0[[1, 4, 7]] = [np.nan, np.inf, -np.inf]
    path = write_parquet(tmp_path / "a.parquet", {**frame, "f0": f0})
    assert "column 'f0': 3 NaN/inf values" in load_error("beta", path)


def test_nulls_in_feature_count_as_missing(tmp_path, frame):
    f1 = pa.array([None, None, *frame["f1"][2:].tolist()], pa.int64())
    path = write_parquet(tmp_path / "a.parquet", {**frame, "f1": f1})
    assert "column 'f1': 2 NaN/inf values (2 of them missing/null)" in load_error("beta", path)


def test_nan_written_in_csv_is_caught(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f0,f1,label\n1.0,nan,0\n2.0,inf,1\n3.0,4.0,1\n")
    assert "column 'f1': 2 NaN/inf values" in load_error("beta", str(path))


def test_all_empty_csv_column_is_reported_as_missing(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f0,f1,label\n1.0,,0\n2.0,NA,1\n")
    assert "column 'f1': 2 NaN/inf values (2 of them missing/null)" in load_error("beta", str(path))


def test_float64_outside_float32_range(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", {**frame, "f0": np.full(12, 1e300)})
    assert "column 'f0': 12 values outside the float32 range" in load_error("beta", path)


def test_nan_label(tmp_path, frame):
    label = frame["label"].astype(float)
    label[0] = np.nan
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": label})
    assert "column 'label': 1 NaN/inf labels" in load_error("beta", path)


def test_null_label(tmp_path, frame):
    label = pa.array([None, *frame["label"][1:].tolist()], pa.int64())
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": label})
    assert "column 'label': 1 missing/null labels" in load_error("beta", path)


def test_fractional_label(tmp_path, frame):
    label = frame["label"].astype(float)
    label[[2, 5]] = [0.5, 2.25]
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": label})
    assert "column 'label': 2 non-integer labels (e.g. 0.5)" in load_error("beta", path)


def test_string_label(tmp_path, frame):
    path = write_csv(tmp_path / "a.csv", {**frame, "label": ["cat", "dog"] * 6})
    assert "column 'label': labels must be integer class ids" in load_error("beta", path)


def test_negative_label(tmp_path, frame):
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": frame["label"] - 2})
    assert "column 'label': 6 negative labels (min -2)" in load_error("beta", path)


def test_npz_columns_of_different_length(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, **{**frame, "f0": frame["f0"][:5]})
    assert "different lengths" in load_error("beta", str(path))


def test_npz_feature_names_of_wrong_length(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, x=expected_x(frame), feature_names=np.array(["a", "b"]), y=frame["label"])
    assert "column 'feature_names'" in load_error("beta", str(path))


def test_npz_object_array_is_refused_without_running_pickle(tmp_path, frame):
    path = tmp_path / "a.npz"
    np.savez(path, **{**frame, "f0": np.array([object()] * 12)})
    assert "column 'f0': cannot load array" in load_error("beta", str(path))


# --- schema agreement -----------------------------------------------------------------------------


def schema(features=(("a", "float64"), ("b", "float64")), classes=(0, 1), label="int64"):
    return TableSchema(features=tuple(features), label=("label", label), classes=classes, rows=5)


def test_agreement_infers_num_classes_from_max_label():
    names, num_classes = check_schema_agreement(
        {"alpha": schema(classes=(0, 3)), "beta": schema(classes=(1, 7))}, None
    )
    assert names == ["a", "b"] and num_classes == 8


def test_agreement_accepts_labels_within_given_num_classes():
    assert check_schema_agreement({"alpha": schema(classes=(0, 9))}, 10) == (["a", "b"], 10)


def test_agreement_label_outside_num_classes():
    schemas = {"alpha": schema(classes=(0, 1)), "beta": schema(classes=(0, 10, 12))}
    with pytest.raises(DataError, match=r"partner 'beta' column 'label': labels \[10, 12\]"):
        check_schema_agreement(schemas, 10)


def test_agreement_dtype_mismatch_names_both_partners():
    beta = schema(features=(("a", "float64"), ("b", "int64")))
    with pytest.raises(
        DataError, match="partner 'beta' column 'b' has dtype int64 but partner 'alpha' has float64"
    ):
        check_schema_agreement({"alpha": schema(), "beta": beta}, None)


def test_agreement_missing_feature():
    beta = schema(features=(("a", "float64"),))
    with pytest.raises(
        DataError, match=r"partner 'beta' has features \['a'\] missing 'b'.*'alpha'"
    ):
        check_schema_agreement({"alpha": schema(), "beta": beta}, None)


def test_agreement_extra_feature():
    beta = schema(features=(("a", "float64"), ("b", "float64"), ("c", "float64")))
    with pytest.raises(DataError, match="partner 'beta' .* extra 'c' that partner 'alpha' lacks"):
        check_schema_agreement({"alpha": schema(), "beta": beta}, None)


def test_agreement_feature_order():
    beta = schema(features=(("b", "float64"), ("a", "float64")))
    with pytest.raises(DataError, match="partner 'beta' orders .* column 'b' .* 'alpha' has 'a'"):
        check_schema_agreement({"alpha": schema(), "beta": beta}, None)


def test_agreement_duplicate_feature_in_reference():
    alpha = schema(features=(("a", "float64"), ("a", "float64")))
    with pytest.raises(DataError, match="partner 'alpha' lists feature 'a' more than once"):
        check_schema_agreement({"alpha": alpha, "beta": schema(features=(("a", "float64"),))}, None)


def test_agreement_label_dtype():
    with pytest.raises(DataError, match="partner 'beta' label column 'label' has dtype float64"):
        check_schema_agreement({"alpha": schema(), "beta": schema(label="float64")}, None)


def test_agreement_rejects_empty_and_bad_num_classes():
    with pytest.raises(DataError):
        check_schema_agreement({}, None)
    with pytest.raises(DataError, match="num_classes"):
        check_schema_agreement({"alpha": schema()}, 0)


def test_loaded_tables_from_different_formats_agree(tmp_path, frame):
    # The same data as parquet and npz yields equal schemas, so partners may mix those formats.
    pq_path = write_parquet(tmp_path / "a.parquet", frame)
    npz_path = tmp_path / "b.npz"
    np.savez(npz_path, **frame)
    schemas = {
        "alpha": load_partner_table("alpha", pq_path, None, "label").schema,
        "beta": load_partner_table("beta", str(npz_path), None, "label").schema,
    }
    assert check_schema_agreement(schemas, None) == (FEATURES, 4)


def test_label_beyond_int64(tmp_path, frame):
    label = pa.array([2**63 + 5, *frame["label"][1:].tolist()], pa.uint64())
    path = write_parquet(tmp_path / "a.parquet", {**frame, "label": label})
    assert "column 'label': label 9223372036854775813 does not fit in int64" in load_error(
        "beta", path
    )


def test_schema_and_error_survive_pickling(tmp_path, frame):
    # Workers send both to the controller through Ray, which pickles them.
    path = write_parquet(tmp_path / "a.parquet", frame)
    schema_ = load_partner_table("alpha", path, None, "label").schema
    assert pickle.loads(pickle.dumps(schema_)) == schema_
    error = DataError("partner 'alpha' (a.csv): column 'x': bad")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, DataError) and str(again) == str(error)
