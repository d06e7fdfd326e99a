"""`raysys profile` measures the live system and writes rows the simulator's fitter reads."""

from __future__ import annotations

from conftest import make_spec

from raysys.agent.profile_fit import read_profile_csv
from raysys.profile import profile
from raysys.spec import JobSpec


def test_profile_writes_pollux_rows_for_each_point(ray_cluster, two_partner_data, tmp_path):
    spec = JobSpec.model_validate(make_spec(two_partner_data, tmp_path))
    # Two points (each starts its own workers, the cost of this test): 1 and 2 workers.
    out = profile(spec, [1, 2], [16], steps=6, warmup=2, out=tmp_path / "p.csv",
                  echo=lambda _: None)
    rows = read_profile_csv(out)
    assert list(rows.local_bsz) == [16, 16]
    assert sorted(set(rows.placement)) == ["1", "2"]  # alpha's node holds both workers
    assert all(0 <= s < t for s, t in zip(rows.sync_time, rows.step_time, strict=True))
