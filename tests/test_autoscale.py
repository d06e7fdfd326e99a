"""agent.autoscale: the Snapshot counts what the autoscaler can add; the request follows the
group. Ray's request_resources is the edge we do not own: a recorder stands in for it."""

from __future__ import annotations

from conftest import make_spec

from raysys.control.autoscale import CapacityRequest, virtual_nodes
from raysys.control.guardrails import Guardrails
from raysys.control.snapshot import NodeView, PartnerView, Snapshot
from raysys.spec import JobSpec


def spec(two_partner_data, tmp_path) -> JobSpec:
    s = make_spec(two_partner_data, tmp_path)
    s["agent"] = {"policy": "threshold", "autoscale": True}
    return JobSpec.model_validate(s)


def test_virtual_nodes_hold_what_workers_max_still_allows(two_partner_data, tmp_path):
    nodes = virtual_nodes(spec(two_partner_data, tmp_path), {"alpha": 1, "beta": 4})
    assert [(n.id, n.labels, n.free_cpus) for n in nodes] == [
        ("autoscaler:alpha", {"partner": "alpha"}, 3 * 0.25)]  # beta is at its max of 4


def test_the_agent_may_grow_a_partner_beyond_the_nodes_that_exist(two_partner_data, tmp_path):
    from raysys.control.decisions import Noop, Scale

    s = spec(two_partner_data, tmp_path)
    full = NodeView("n1", {"partner": "alpha"}, 1.0, 0.0)  # no free CPU on alpha's node
    snap = Snapshot(
        time_s=100.0, step=10, samples_done=10, samples_total=100, workers=[],
        partners=[PartnerView("alpha", 1, 1, 4, 19), PartnerView("beta", 1, 1, 4, 11)],
        nodes=[full], cpus_per_worker={"alpha": 0.25, "beta": 0.25},
        placement={"alpha": {"partner": "alpha"}, "beta": {"partner": "beta"}},
        last_rescale_time_s=None, last_rescale_cost_s=0.0, recent_failures=0,
        actions_last_minute=0, step_time_s=0.1, throughput=100.0)
    guard = Guardrails()
    assert snap.worker_slots_for("alpha") == 0
    assert guard.filter(Scale("alpha", +2), snap) == Noop()  # nowhere to put a worker
    snap.nodes.extend(virtual_nodes(s, {"alpha": 1, "beta": 1}))
    assert snap.worker_slots_for("alpha") == 3
    assert guard.filter(Scale("alpha", +2), snap) == Scale("alpha", +2)


def test_the_request_follows_the_group_and_is_released(two_partner_data, tmp_path):
    calls = []
    req = CapacityRequest(spec(two_partner_data, tmp_path), lambda b, s: calls.append((b, s)))
    req.sync({"alpha": 2, "beta": 1})
    req.sync({"alpha": 2, "beta": 1})  # unchanged: not sent again
    req.sync({"alpha": 3, "beta": 1})
    req.release()
    assert len(calls) == 3
    bundles, selectors = calls[0]
    assert bundles == [{"CPU": 0.25}] * 3
    assert selectors == [{"partner": "alpha"}] * 2 + [{"partner": "beta"}]
    assert len(calls[1][0]) == 4
    assert calls[2] == ([], [])


def test_a_failing_request_never_fails_the_job(two_partner_data, tmp_path):
    def broken(bundles, selectors):
        raise RuntimeError("no autoscaler here")

    CapacityRequest(spec(two_partner_data, tmp_path), broken).sync({"alpha": 1})
