"""Differential privacy and secure aggregation in live jobs: equivalences, accounting, budgets,
and a worker lost under secure aggregation."""

from __future__ import annotations

import math

import pytest
import ray
from conftest import make_spec
from opacus.accountants import RDPAccountant
from test_elastic import TOLERANCE, final_parameters, reference_for

from raysys.train.reference import max_relative_difference


def test_dp_without_noise_or_clipping_equals_plain_training(run, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=20, alpha_workers=2)
    spec["partners"][0]["privacy"] = {"dp": {"noise_multiplier": 0.0, "max_grad_norm": 1e9}}
    controller, done = run(spec)
    final = final_parameters(controller, done)
    assert max_relative_difference(final, reference_for(spec)) <= TOLERANCE
    ledger = ray.get(controller.progress.remote())["ledger"]
    assert ledger["alpha"]["epsilon"] == math.inf  # no noise: no privacy, and it says so
    assert ledger["beta"]["epsilon"] is None


def test_epsilon_is_the_accountants_and_a_spent_budget_stops_only_that_partner(
        run, two_partner_data, tmp_path):
    """alpha: sigma 2, target epsilon 2 (34 steps at its sampling rate 19/150), 2 workers sharing
    the noise under secure aggregation; the job runs 50 steps."""
    spec = make_spec(two_partner_data, tmp_path, steps=50, alpha_workers=2)
    spec["secure_aggregation"] = True
    spec["partners"][0]["privacy"] = {"dp": {"noise_multiplier": 2.0, "target_epsilon": 2.0,
                                             "max_grad_norm": 1.0, "delta": 1e-5}}
    spec["runtime"]["steps_per_call"] = 8
    controller, done = run(spec)
    summary = ray.get(done)
    events = ray.get(controller.progress.remote())["events"]
    alpha, beta = summary["partners"]["alpha"], summary["partners"]["beta"]
    direct = RDPAccountant()
    for _ in range(alpha["steps_participated"]):
        direct.step(noise_multiplier=2.0, sample_rate=19 / 150)
    assert alpha["steps_participated"] == 34 and alpha["skipped_steps"] == 16
    assert alpha["epsilon"] == direct.get_epsilon(1e-5) <= 2.0
    assert alpha["budget_spent_at_step"] == 34 and alpha["samples"] == 34 * 19
    assert beta["steps_participated"] == 50 and beta["epsilon"] is None
    assert summary["steps"] == 50 and summary["stop_reason"] is None
    # beta shares its loss: the job has a training loss (beta's).
    assert not summary["loss_private"] and math.isfinite(summary["final_loss"])
    assert any("partner alpha spent its privacy budget" in e and "alpha stops contributing" in e
               for e in events), events


def test_target_epsilon_alone_lasts_the_run_and_a_spent_budget_can_stop_the_job(
        run, two_partner_data, tmp_path):
    # target alone: the noise is chosen so that the planned steps fit the budget
    spec = make_spec(two_partner_data, tmp_path, steps=60)
    spec["partners"][1]["privacy"] = {"dp": {"target_epsilon": 1.0, "max_grad_norm": 1.0}}
    controller, done = run(spec)
    summary = ray.get(done)
    beta = summary["partners"]["beta"]
    assert beta["steps_participated"] == 60 and beta["budget_spent_at_step"] is None
    assert 0.9 <= beta["epsilon"] <= 1.0  # most of the budget used, none of it exceeded

    # sigma 2 and target 2: 37 steps at beta's sampling rate 11/90, and the job stops there.
    # alpha is under DP too (no budget), so no partner shares its training loss: the job shows
    # it as private, not as the NaN of a diverged run.
    spec = make_spec(two_partner_data, tmp_path, steps=100)
    spec["partners"][1]["privacy"] = {"dp": {"noise_multiplier": 2.0, "target_epsilon": 2.0,
                                             "max_grad_norm": 1.0, "on_budget_spent": "stop_job"}}
    spec["partners"][0]["privacy"] = {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    controller, done = run(spec)
    summary = ray.get(done)
    progress = ray.get(controller.progress.remote())
    beta = summary["partners"]["beta"]
    assert summary["steps"] == beta["steps_participated"] == beta["budget_spent_at_step"] == 37
    assert summary["stop_reason"] == "a partner's privacy budget is spent"
    assert summary["loss_private"] and summary["final_loss"] is None and progress["loss"] is None
    steps_logged = [e for e in progress["events"] if "step 10/100" in e]
    assert steps_logged and "loss private (DP)" in steps_logged[0], progress["events"]


def test_secure_aggregation_trains_like_plain_and_survives_a_lost_worker(
        run, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=30, alpha_workers=2)
    spec["secure_aggregation"] = True
    # The sparse graph's setting reaches the workers; with two partners it is the full graph
    # (tests/test_secagg.py tests sparse graphs themselves).
    spec["secure_aggregation_neighbours"] = 1
    spec["partners"][0]["workers"]["min"] = 1
    spec["chaos"] = [{"at_step": 12, "worker": "alpha/1", "kill": True}]
    controller, done = run(spec)
    final = final_parameters(controller, done)
    summary_events = ray.get(controller.progress.remote())["events"]
    # fixed point rounds each worker's local sums at 2^-24: equal within quantization error
    assert max_relative_difference(final, reference_for(spec)) <= 1e-4
    assert any("alpha/1 died" in e for e in summary_events), summary_events


def test_a_failed_step_without_secure_aggregation_is_accounted_twice_over(
        run, two_partner_data, tmp_path):
    """alpha/1 is killed at step 6: the survivors' step 6 fails after their noisy sums went on
    the ring in clear, and runs again with fresh noise on the same rows. beta's accountant
    counts that step at sigma / sqrt(2) (two releases of one batch)."""
    spec = make_spec(two_partner_data, tmp_path, steps=12, alpha_workers=2)
    spec["partners"][0]["workers"]["min"] = 1
    spec["partners"][1]["privacy"] = {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                             "delta": 1e-5}}
    spec["runtime"]["steps_per_call"] = 3
    spec["chaos"] = [{"at_step": 6, "worker": "alpha/1", "kill": True}]
    controller, done = run(spec)
    summary = ray.get(done)
    beta = summary["partners"]["beta"]
    assert beta["steps_participated"] == 12 and beta["failures"] == 0
    q = beta["samples"] / 12 / 90  # beta's batch over its 90 rows
    direct = RDPAccountant()
    direct.history = [(1.0, q, 11), (1.0 / math.sqrt(2), q, 1)]
    assert beta["epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
