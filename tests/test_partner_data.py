"""A partner's bad data stops the job before step 1 with an error naming partner and column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import make_spec

from raysys.data.sources import DataError
from raysys.runner import run_job
from raysys.spec import JobSpec


def test_nan_in_one_partner_stops_the_job_before_any_step(ray_cluster, two_partner_data,
                                                          tmp_path):
    table = pq.read_table(two_partner_data["beta"])
    f3 = table["f3"].to_numpy().copy()
    f3[5] = np.nan
    pq.write_table(table.set_column(3, "f3", pa.array(f3)), two_partner_data["beta"])
    spec = JobSpec.model_validate(make_spec(two_partner_data, tmp_path))
    with pytest.raises(DataError) as exc:
        run_job(spec, quiet=True)
    assert "beta" in str(exc.value) and "f3" in str(exc.value) and "NaN" in str(exc.value)
    assert not (tmp_path / "ckpt").exists()  # nothing was trained, nothing was written


def test_schema_mismatch_between_partners_names_both(ray_cluster, two_partner_data, tmp_path):
    table = pq.read_table(two_partner_data["beta"])
    pq.write_table(table.rename_columns(["g0", *table.column_names[1:]]),
                   two_partner_data["beta"])
    spec = JobSpec.model_validate(make_spec(two_partner_data, tmp_path))
    with pytest.raises(DataError) as exc:
        run_job(spec, quiet=True)
    msg = str(exc.value)
    assert "alpha" in msg and "beta" in msg and ("f0" in msg or "g0" in msg)
    assert not [a for a in ray.util.list_named_actors() if a.startswith("raysys:t:")]


def test_a_shifted_feature_is_warned_about_naming_partner_and_column(
        ray_cluster, two_partner_data, tmp_path):
    """Only aggregates are compared: the job starts, and its log names the odd partner out."""
    table = pq.read_table(two_partner_data["beta"])
    f3 = table["f3"].to_numpy() + 50.0  # beta's f3 is on another scale than alpha's
    pq.write_table(table.set_column(3, "f3", pa.array(f3)), two_partner_data["beta"])
    spec = JobSpec.model_validate(make_spec(two_partner_data, tmp_path, steps=2))
    summary = run_job(spec, quiet=True)
    assert summary["steps"] == 2
    warnings = [w for w in summary["data_warnings"] if "'f3'" in w]
    assert warnings and "partner 'beta'" in warnings[0], summary["data_warnings"]
