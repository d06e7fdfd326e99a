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
    agent_done = agent.run.remote()
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
        history = ray.get(agent_done)
        ray.get(controller.stop.remote())
        summary = ray.get(done)
    finally:
        ray.kill(agent)
        ray.kill(controller)
    assert acted, f"no replace/rebalance of alpha within 3 intervals; agent said {history}"
    assert any("alpha" in h["applied"] for h in history)
    assert summary["final_loss"] < losses_before or summary["final_loss"] < 0.5
