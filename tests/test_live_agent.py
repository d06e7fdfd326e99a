"""The live agent: same policy and guardrails as in simulation, steering a real job."""

from __future__ import annotations

import time

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys import chaos
from raysys.agent.actor import RemoteAgentActor
from raysys.control.controller import RemoteJobController


def test_goodput_agent_handles_an_injected_straggler(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=2)
    spec["name"] = "live"
    spec["model"]["kwargs"]["hidden"] = [256, 256]  # compute-bound enough for slowness to show
    spec["runtime"]["steps_per_call"] = 0
    spec["agent"] = {"policy": "goodput", "interval_s": 1.0, "cooldown_s": 0.0}
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = RemoteAgentActor.remote(controller, spec)
    agent_done = agent.wait.remote()
    try:
        wait_for(controller, lambda p: p["step"] >= 20)
        chaos.slow("live", "alpha/1", 3.0)
        t_slow = time.time()
        deadline = t_slow + 3 * 1.0 + 5.0  # three intervals, plus the steps that measure it
        acted = []
        while time.time() < deadline and not acted:
            events = ray.get(controller.rescale_events.remote())
            acted = [e for e in events if e["kind"] in ("replace", "rebalance")
                     and "alpha" in e["detail"] and e["t_decision"] >= t_slow]
            time.sleep(0.2)
        losses_before = ray.get(controller.progress.remote())["loss"]
        wait_for(controller, lambda p: p["step"] >= 150)
        ray.get(agent.stop.remote())
        history = ray.get(agent_done)["decisions"]
        ray.get(controller.stop.remote())
        summary = ray.get(done)
    finally:
        ray.kill(agent)
        ray.kill(controller)
    assert acted, f"no replace/rebalance of alpha within 3 intervals; agent said {history}"
    assert any("alpha" in h["applied"] for h in history)
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
