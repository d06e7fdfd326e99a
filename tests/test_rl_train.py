"""A tiny PPO run (RLlib, local Ray) writes checkpoints that RLPolicy loads and decides with."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ray.rllib")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from raysys.agent.env import SHIPPED_SCENARIOS  # noqa: E402
from raysys.agent.rl.policy import RLPolicy  # noqa: E402
from raysys.agent.rl.train import TrainConfig, train  # noqa: E402
from raysys.agent.scenarios import load_scenario  # noqa: E402
from raysys.agent.sim import Simulator  # noqa: E402
from raysys.control.guardrails import Guardrails  # noqa: E402

# Trace-free scenarios, so the test runs without the Pollux traces.
SCENARIOS = [str(SHIPPED_SCENARIOS / f"{n}.yaml") for n in ("live_cpu", "worker_failures")]


def test_tiny_training_run_gives_a_loadable_policy(tmp_path) -> None:
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        scenarios=SCENARIOS[0],
        minutes=2.0,
        max_iterations=1,
        train_batch_size=256,
        minibatch_size=128,
        num_epochs=1,
        num_envs_per_env_runner=2,
        hidden=(16, 16),
        advisor=True,  # the advisor's features and action, and a clone that follows it
        prior="advisor",
        prior_rounds=((1, 0.0), (1, 0.5)),
        prior_epochs=1,
        eval_seeds=0,
    )
    result = train(cfg, log=lambda _: None)
    assert result.iterations == 1 and result.env_steps >= 256
    assert (result.out / "train.json").is_file()
    assert any((result.out / "tb").iterdir())  # TensorBoard event file
    for checkpoint in (result.module, result.algorithm):  # RLModule alone, or inside the Algorithm
        scenario = load_scenario(SCENARIOS[1])
        policy = RLPolicy(checkpoint=checkpoint, cost_per_worker_second=0.04)
        guard = Guardrails(scenario.spec.guardrails)
        sim = Simulator(scenario, seed=3)
        for _ in range(50):
            snap = sim.snapshot()
            index = policy.action_index(snap)  # one observation per Snapshot (history, advisor)
            follows = index == policy.advisor.follow_action  # its proposal passed the Guardrails
            assert follows or guard.mask(snap, policy.action_space)[index]
            sim.apply(guard.filter(policy.advisor.decision(index, snap), snap))
            sim.advance(sim.interval_s)
