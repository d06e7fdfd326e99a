"""The live agent: same policy and guardrails as in simulation, steering a real job."""

from __future__ import annotations

import time

import pytest
import ray
from conftest import make_spec, write_table
from test_elastic import wait_for

from raysys import chaos
from raysys.agent.actor import RemoteAgentActor
from raysys.control.controller import RemoteJobController


@pytest.mark.parametrize("policy", ["rl", "goodput"])
def test_agent_handles_an_injected_straggler(policy, ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=2)
    spec["name"] = "live"
    spec["model"]["kwargs"]["hidden"] = [256, 256]  # compute-bound enough for slowness to show
    spec["runtime"]["steps_per_call"] = 0
    spec["agent"] = {"policy": policy, "interval_s": 1.0, "cooldown_s": 0.0}
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = None
    try:
        wait_for(controller, lambda p: p["step"] >= 20)
        chaos.slow("live", "alpha/1", 3.0)
        slow_step = ray.get(controller.progress.remote())["step"]
        # The agent starts now: what it does is about the straggler, not about the start.
        agent = RemoteAgentActor.remote(controller, spec)
        agent_done = agent.wait.remote()
        ray.get(agent.status.remote())  # constructed: the policy is loaded, the loop runs
        deadline = time.time() + 3 * 1.0 + 2.0  # three intervals, and slack for the calls
        handled = []
        while time.time() < deadline and not handled:
            # The straggler stops holding the step back when it is replaced, its share is cut
            # by a rebalance, or it is retired by a scale-down (which retires the slowest).
            handled = [d for d in ray.get(agent.status.remote())["decisions"]
                       if d["step"] >= slow_step and (
                           d["applied"] in ("replace alpha/1", "scale alpha -1")
                           or d["applied"].startswith("rebalance alpha"))]
            time.sleep(0.2)
        losses_before = ray.get(controller.progress.remote())["loss"]
        wait_for(controller, lambda p: p["step"] >= 150)
        # ...and the controller carried it out (a cold replace completes when its actor is up).
        wait_for(controller, lambda p: any(
            e["kind"] in ("replace", "scale_down") and e["detail"].startswith("alpha/1")
            or e["kind"] == "rebalance" for e in ray.get(controller.rescale_events.remote())),
            timeout_s=60)
        ray.get(agent.stop.remote())
        history = ray.get(agent_done)["decisions"]
        ray.get(controller.stop.remote())
        summary = ray.get(done)
    finally:
        if agent is not None:
            ray.kill(agent)
        ray.kill(controller)
    assert handled, f"straggler alpha/1 not handled within 3 intervals; agent said {history}"
    assert summary["final_loss"] < losses_before or summary["final_loss"] < 0.5


def test_agent_with_unloadable_policy_falls_back_to_static_and_job_goes_on(
        ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=40)
    spec["agent"] = {"policy": "tabularq", "checkpoint": str(tmp_path / "missing.npz"),
                     "interval_s": 0.5}
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = RemoteAgentActor.remote(controller, spec)
    try:
        status = ray.get(agent.status.remote())
        summary = ray.get(done)
        final = ray.get(agent.wait.remote(30))
    finally:
        ray.kill(agent)
        ray.kill(controller)
    assert status["policy"] == "static"
    assert "missing.npz" in status["warnings"][0] and "static policy" in status["warnings"][0]
    assert summary["steps"] == 40 and not final["running"]


def test_node_metrics_are_scraped_into_the_snapshot(ray_cluster):
    from raysys.agent.actor import parse_node_gauges, with_node_metrics
    from raysys.control.snapshot import NodeView, Snapshot

    text = ('# HELP ray_node_cpu_utilization x\nray_node_cpu_utilization{ip="a"} 42.5\n'
            'ray_node_mem_used{ip="a"} 2.0e9\nray_node_mem_total{ip="a"} 8.0e9\n')
    assert parse_node_gauges(text) == {"ray_node_cpu_utilization": 42.5,
                                       "ray_node_mem_used": 2.0e9, "ray_node_mem_total": 8.0e9}
    nodes = [NodeView(n["NodeID"], n["Labels"], 1.0, 1.0) for n in ray.nodes() if n["Alive"]]
    snap = Snapshot(0.0, 0, 0, 1, [], [], nodes, {}, {}, None, 0.0, 0, 0, 0.0, 0.0)
    deadline = time.time() + 30  # the reporter agent publishes node gauges every few seconds
    while time.time() < deadline:
        with_node_metrics(snap)
        if all(n.memory_used_fraction > 0 for n in snap.nodes):
            break
        time.sleep(1)
    assert all(0 < n.memory_used_fraction < 1 for n in snap.nodes)
    assert all(0 <= n.cpu_utilization <= 1 for n in snap.nodes)


def test_a_killed_agent_is_restarted_and_steers_again(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=100_000)
    spec["agent"] = {"policy": "threshold", "interval_s": 0.5}
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = RemoteAgentActor.remote(controller, spec)
    try:
        wait_for(controller, lambda p: p["step"] >= 3)
        pid = ray.get(agent.pid.remote())
        ray.kill(agent, no_restart=False)  # as if its process had crashed
        deadline = time.time() + 60
        status = None
        while time.time() < deadline:
            try:
                status = ray.get(agent.status.remote(), timeout=5)
                if ray.get(agent.pid.remote(), timeout=5) != pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
        assert status is not None and status["running"] and status["policy"] == "threshold"
        assert ray.get(agent.pid.remote()) != pid
        ray.get(controller.stop.remote())
        ray.get(done)
    finally:
        ray.kill(agent, no_restart=True)
        ray.kill(controller)


def test_rl_agent_recovers_a_lost_node_and_uses_new_capacity(ray_cluster, tmp_path):
    """alpha's workers need a whole 4-CPU node each, so its size is set by its nodes: losing one
    takes a worker with it, and a node joining later is the only room to grow back into.
    alpha holds 95% of the data and a step is mostly its compute, so a second alpha worker
    pays per the objective (with the small batches of the other tests a step is mostly sync,
    and growing would not pay)."""
    data = {"alpha": write_table(tmp_path / "alpha.parquet", 2000, 12, 4, seed=1),
            "beta": write_table(tmp_path / "beta.parquet", 100, 12, 4, seed=2)}
    spare_room = ray_cluster.add_node(num_cpus=4, labels={"partner": "alpha"})
    ray_cluster.wait_for_nodes()
    spec = make_spec(data, tmp_path, steps=100_000, alpha_workers=2)
    spec["name"] = "live-nodes"
    spec["global_batch_size"] = 600
    spec["model"]["kwargs"]["hidden"] = [256, 256]
    spec["runtime"]["steps_per_call"] = 0
    spec["partners"][0]["cpus_per_worker"] = 4.0
    spec["partners"][0]["workers"] = {"initial": 2, "min": 1, "max": 3}
    spec["agent"] = {"policy": "rl", "interval_s": 1.0, "cooldown_s": 0.0}
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = RemoteAgentActor.remote(controller, spec)
    joined = None
    try:
        wait_for(controller, lambda p: p["step"] >= 20 and p["workers"]["alpha"] == 2)
        loss_start = ray.get(controller.progress.remote())["loss"]
        ray_cluster.remove_node(spare_room)  # one of alpha's workers goes with it
        spare_room = None
        wait_for(controller, lambda p: p["workers"]["alpha"] == 1, timeout_s=60)
        step_after_loss = ray.get(controller.progress.remote())["step"]
        wait_for(controller, lambda p: p["step"] >= step_after_loss + 20)  # training goes on
        joined = ray_cluster.add_node(num_cpus=4, labels={"partner": "alpha"})
        try:
            wait_for(controller, lambda p: p["workers"]["alpha"] == 2, timeout_s=90)
        except AssertionError as timed_out:  # say what the agent saw and did meanwhile
            state = ray.get(agent.wait.remote(0))
            raise AssertionError(f"{timed_out}; agent: {state}") from None
        step = ray.get(controller.progress.remote())["step"]
        wait_for(controller, lambda p: p["step"] >= step + 20)
        workers = ray.get(controller.workers.remote())
        ray.get(agent.stop.remote())
        history = ray.get(agent.wait.remote(30))["decisions"]
        ray.get(controller.stop.remote())
        summary = ray.get(done)
    finally:
        ray.kill(agent)
        ray.kill(controller)
        for node in (spare_room, joined):  # the session cluster keeps only its own nodes
            if node is not None:
                ray_cluster.remove_node(node)
    active = [w for w in workers if w["state"] == "active" and w["partner"] == "alpha"]
    assert any(w["node_id"] == joined.node_id for w in active), (workers, history)
    assert any("alpha" in h["applied"] and "+" in h["applied"] for h in history), history
    assert summary["partners"]["alpha"]["failures"] >= 1, (summary["partners"]["alpha"], history)
    assert summary["final_loss"] < loss_start
