"""ClusterEnv: gymnasium conformance, masking, reward = -score decomposition, determinism."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from test_sim_fixtures import base_scenario, tiny

import raysys.agent  # noqa: F401  (registers the env)
from raysys.agent.env import ENV_ID, ClusterEnv
from raysys.agent.scenarios import scenario_from_dict

EVENTFUL = base_scenario(
    name="eventful",
    episode={"samples": 100_000, "observation_noise": 0.03},
    events=[{"kind": "straggler", "at": 60, "worker": "alpha/0", "factor": 3.0}],
    random_events=[{"kind": "worker_failures", "rate_per_hour": 6}],
)


def make_env(**kwargs) -> ClusterEnv:
    return ClusterEnv({"scenarios": [tiny(), scenario_from_dict(EVENTFUL)], **kwargs})


def test_passes_gymnasium_check_env() -> None:
    env = make_env()
    check_env(env, skip_render_check=True)


def test_registered_on_import_of_raysys_agent() -> None:
    env = gym.make(ENV_ID, config={"scenarios": [tiny()]})
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observations", "action_mask"}
    assert info["action_mask"].dtype == bool
    env.close()


def test_episode_return_is_minus_the_score() -> None:
    env = make_env(randomize=True)
    rng = np.random.default_rng(0)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            allowed = np.flatnonzero(info["action_mask"])
            obs, reward, done, truncated, info = env.step(int(rng.choice(allowed)))
            assert not truncated
            assert env.observation_space.contains(obs)
            np.testing.assert_array_equal(obs["action_mask"], info["action_mask"])
            total += reward
        assert total == pytest.approx(-info["score"], rel=1e-9)
        assert info["score"] == pytest.approx(env.sim.score)


def test_masked_action_is_executed_as_noop() -> None:
    env = make_env()
    obs, info = env.reset(seed=1, options={"scenario_index": 0})
    env.step(1)  # scale alpha up: starts the cooldown
    _, _, _, _, info = env.step(0)
    mask = info["action_mask"]
    assert not mask[1:].any()  # still cooling down: only noop allowed
    workers_before = len(env.sim.workers)
    _, _, _, _, info = env.step(1)
    assert info["decision"] == "noop" and not info["applied"]
    assert len(env.sim.workers) == workers_before


def test_reset_with_a_seed_is_deterministic() -> None:
    def rollout(seed: int) -> list[float]:
        env = make_env()
        obs, info = env.reset(seed=seed)
        out = [float(obs["observations"].sum())]
        for _ in range(30):
            obs, reward, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[-1]))
            out.append(reward)
            if done:
                break
        return out

    assert rollout(7) == rollout(7)
    assert rollout(7) != rollout(8)


def test_rejects_scenarios_with_more_partners_than_the_layout() -> None:
    with pytest.raises(ValueError, match="more than 1 partners"):
        ClusterEnv({"scenarios": [tiny()], "max_partners": 1})


def test_progress_shaping_shifts_the_return_by_a_constant() -> None:
    env = make_env(progress_shaping=True)
    obs, info = env.reset(seed=4, options={"scenario_index": 0})
    total, done = 0.0, False
    while not done:
        obs, reward, done, _, info = env.step(0)
        total += reward
    sim = env.sim
    kappa = (1 + sim.cost_per_worker_second * sim.initial_workers) / sim.initial_rate
    assert total == pytest.approx(-info["score"] + kappa * sim.samples_total, rel=1e-9)
