"""Step-time model fitting: recovers known parameters; fits the real Pollux traces."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.agent.profile_fit import (
    StepTimeModel,
    fit_profile,
    fit_report,
    placement_string,
    read_profile_csv,
    relative_errors,
    traces_dir,
    write_profile_csv,
)

TRUE = StepTimeModel(
    alpha_c=0.02, beta_c=0.0015, alpha_r=0.03, beta_r=0.004, alpha_n=0.12, beta_n=0.006, gamma=1.8
)
PLACEMENTS = [
    "1",
    "2",
    "3",
    "4",
    "11",
    "12",
    "22",
    "13",
    "111",
    "112",
    "222",
    "1111",
    "1122",
    "2222",
    "11111",
    "123",
    "44",
    "444",
]


def synthetic_rows(model: StepTimeModel, noise: float = 0.0, seed: int = 0) -> list[tuple]:
    """Pollux-format rows from a known model: sync_time = step - compute, as in the traces."""
    rng = np.random.default_rng(seed)
    rows = []
    for placement in PLACEMENTS:
        workers, nodes = sum(int(c) for c in placement), len(placement)
        for batch in (8, 16, 32, 64, 128, 256):
            compute = model.compute_time(batch) * float(np.exp(rng.normal(0, noise)))
            step = model.combine(compute, model.sync_time(workers, nodes))
            step *= float(np.exp(rng.normal(0, noise)))
            rows.append(
                {
                    "placement": placement,
                    "local_bsz": batch,
                    "step_time": step,
                    "sync_time": max(step - compute, 0.0),
                }
            )
    return rows


def test_fit_recovers_known_parameters(tmp_path) -> None:
    path = write_profile_csv(synthetic_rows(TRUE), tmp_path / "profile.csv")
    fitted = fit_profile(path)
    for name, true in TRUE.to_dict().items():
        assert getattr(fitted, name) == pytest.approx(true, rel=0.03), name


def test_fit_on_noisy_profiles_predicts_held_out_rows(tmp_path) -> None:
    path = write_profile_csv(synthetic_rows(TRUE, noise=0.03, seed=1), tmp_path / "noisy.csv")
    report = fit_report(path, holdout_every=5)
    assert report.test_rows == len(PLACEMENTS) * 6 // 5
    assert report.median_rel_error < 0.05
    rows = read_profile_csv(path)
    truth = relative_errors(TRUE, rows)
    assert np.median(relative_errors(report.model, rows)) < np.median(truth) * 1.5


def test_single_node_profiles_assume_crossing_nodes_costs_more(tmp_path) -> None:
    rows = [r for r in synthetic_rows(TRUE) if len(r["placement"]) == 1]
    fitted = fit_profile(write_profile_csv(rows, tmp_path / "one-node.csv"))
    assert fitted.alpha_n == pytest.approx(1.1 * fitted.alpha_r)
    assert fitted.step_time(64, 4, 1) == pytest.approx(TRUE.step_time(64, 4, 1), rel=0.05)


def test_profile_csv_round_trip_and_validation(tmp_path) -> None:
    path = write_profile_csv([([2, 1], 32, 0.5, 0.1), ("4", 16, 0.25, 0.05)], tmp_path / "p.csv")
    rows = read_profile_csv(path)
    assert rows.placement == ("21", "4")
    np.testing.assert_array_equal(rows.workers, [3, 4])
    np.testing.assert_array_equal(rows.nodes, [2, 1])
    assert placement_string([0, 3, 1]) == "31"
    with pytest.raises(ValueError, match="sync_time < step_time"):
        write_profile_csv([("1", 8, 0.1, 0.2)], tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("placement,local_bsz,step_time\n1,8,0.1\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_profile_csv(tmp_path / "cols.csv")


@pytest.mark.parametrize("trace", ["cifar10", "bert", "imagenet"])
def test_real_pollux_traces_fit_within_ten_percent(trace: str) -> None:
    folder = traces_dir() / trace
    if not (folder / "placements.csv").is_file():
        pytest.skip(f"Pollux trace {trace} not found under {traces_dir()} (set RAYSYS_TRACES)")
    report = fit_report(folder, holdout_every=5)
    assert report.median_rel_error <= 0.10
    assert report.model.gamma >= 1.0
