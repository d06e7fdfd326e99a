"""The RL policy's advisor: following it everywhere is goodput, in the training env and through
RLPolicy (a behaviour-cloned module, saved and loaded as the live agent loads it); label smoothing
leaves the clone room to explore; a prior that cannot run is refused before training starts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.rllib")

from raysys.agent.env import SHIPPED_SCENARIOS  # noqa: E402
from raysys.agent.evaluate import run_episode  # noqa: E402
from raysys.agent.goodput import GoodputGreedyPolicy  # noqa: E402
from raysys.agent.rl.advisor import GOODPUT_OPTIONS  # noqa: E402
from raysys.agent.rl.env import HistoryEnv  # noqa: E402
from raysys.agent.rl.module import MaskedActorCritic  # noqa: E402
from raysys.agent.rl.policy import RLPolicy  # noqa: E402
from raysys.agent.rl.prior import ADVISOR, collect, fit  # noqa: E402
from raysys.agent.rl.train import TrainConfig, check_prior  # noqa: E402
from raysys.agent.scenarios import load_scenario  # noqa: E402

# Trace-free scenarios where goodput acts (stragglers, failures), so following it is not Noop.
SCENARIO = str(SHIPPED_SCENARIOS / "worker_failures.yaml")


def advised_env(**extra) -> HistoryEnv:
    return HistoryEnv(scenarios=SCENARIO, randomize=False, advisor=True, **extra)


def goodput_episode(seed: int):
    scenario = load_scenario(SCENARIO)
    lam = scenario.spec.objective.cost_per_worker_second
    goodput = GoodputGreedyPolicy(cost_per_worker_second=lam, **GOODPUT_OPTIONS)
    return run_episode(scenario, goodput, seed)  # which calls learn() after each decision


def test_following_the_advisor_in_the_env_is_goodput() -> None:
    env = advised_env()
    assert env.action_space.n == env.action_vocabulary.n + 1
    obs, _ = env.reset(seed=0)
    assert obs["observations"].shape == env.observation_space["observations"].shape
    assert obs["action_mask"][env.advisor.follow_action] == 1.0
    done, info, moves = False, {}, 0
    while not done:
        obs, _, done, _, info = env.step(env.advisor.follow_action)
        moves += info["applied"]
    assert moves > 0  # goodput acted, so the advisor's proposal was really followed
    assert info["score"] == pytest.approx(goodput_episode(env.sim.seed).score, rel=1e-12)


def cloned_module(smoothing: float, epochs: int) -> tuple[MaskedActorCritic, HistoryEnv, dict]:
    env = advised_env()
    module = MaskedActorCritic(
        observation_space=env.observation_space, action_space=env.action_space,
        model_config={"hidden": [32, 32], "noop_bias": 2.0, "max_workers_per_partner": 8,
                      "history": True, "advisor": True})
    data = collect(env, ADVISOR, episodes=2, seed=0, gamma=0.99)
    assert (data.actions == env.advisor.follow_action).all()
    stats = fit(module, data, epochs=epochs, lr=3e-3, seed=0, smoothing=smoothing)
    return module, env, {"data": data, **stats}


def test_a_clone_of_the_advisor_loaded_as_rl_policy_decides_as_goodput(tmp_path) -> None:
    module, _, stats = cloned_module(smoothing=0.0, epochs=30)
    assert stats["accuracy"] == 1.0
    module.save_to_path(str(tmp_path / "module"))
    scenario = load_scenario(SCENARIO)
    lam = scenario.spec.objective.cost_per_worker_second
    policy = RLPolicy(tmp_path / "module", cost_per_worker_second=lam,
                      guardrails=scenario.spec.guardrails)
    assert policy.advisor is not None and policy.max_partners == 4
    for seed in (1, 2):  # seeds where goodput acts (2 and 5 moves)
        result, goodput = run_episode(scenario, policy, seed), goodput_episode(seed)
        assert result.actions == goodput.actions > 0
        assert result.score == pytest.approx(goodput.score, rel=1e-12)


def test_label_smoothing_leaves_the_clone_room_to_explore() -> None:
    module, _, stats = cloned_module(smoothing=0.1, epochs=30)
    data = stats["data"]
    with torch.no_grad():
        from raysys.agent.rl.module import masked_logits

        x, m = torch.from_numpy(data.features), torch.from_numpy(data.masks)
        p = torch.softmax(masked_logits(module.pi(x), m), dim=-1).numpy()
    follow = p[:, -1]
    assert 0.75 < float(np.median(follow)) < 0.97  # mostly the advisor, not always
    assert (p[data.masks < 0.5] < 1e-6).all()  # never a forbidden action
    assert stats["accuracy"] == 1.0  # its argmax still follows the advisor


def test_a_prior_that_cannot_run_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="prior: 'advisor' needs the advisor"):
        check_prior(TrainConfig(advisor=False, prior="advisor"))
    with pytest.raises(ValueError, match="prior: unknown teacher 'goodptu'"):
        check_prior(TrainConfig(prior="goodptu"))
    check_prior(TrainConfig(advisor=True, prior="advisor"))
    check_prior(TrainConfig(prior="goodput"))
    check_prior(TrainConfig(prior=None))


def test_the_advisors_goodput_refits_after_deciding_not_while() -> None:
    """The refit (tens of ms) stays off the Snapshot -> Decision path: decide() never refits,
    learn() does when decide() saw a new configuration."""
    from raysys.agent.sim import Simulator

    scenario = load_scenario(SCENARIO)
    goodput = GoodputGreedyPolicy(cost_per_worker_second=0.02, **GOODPUT_OPTIONS)
    sim, refits = Simulator(scenario, seed=2), 0
    while not sim.done:
        snap = sim.snapshot()
        fitted = goodput.fit._fitted_keys
        decision = goodput.decide(snap)
        assert goodput.fit._fitted_keys == fitted
        goodput.learn()
        refits += goodput.fit._fitted_keys != fitted
        sim.apply(decision)
        sim.advance(sim.interval_s)
    assert refits > 1


def test_the_cli_prior_follows_the_advisor_switch() -> None:
    from raysys.agent.cli import _prior

    assert _prior(None, advisor=True) == "advisor"  # the shipped policy's recipe
    assert _prior(None, advisor=False) == "goodput"  # --no-advisor: imitate goodput instead
    assert _prior("none", advisor=True) is None
    assert _prior("goodput", advisor=True) == "goodput"
