"""RLPolicy: the shipped default loads and every decision it makes passes the Guardrails on every
shipped scenario; a missing or corrupt checkpoint fails with an error naming the path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("ray.rllib")

from raysys.agent.env import SHIPPED_SCENARIOS, resolve_scenarios  # noqa: E402
from raysys.agent.policies import make_policy  # noqa: E402
from raysys.agent.rl.policy import DEFAULT_CHECKPOINT, CheckpointError, RLPolicy  # noqa: E402
from raysys.agent.sim import Simulator  # noqa: E402
from raysys.control.decisions import Noop, Rebalance  # noqa: E402
from raysys.control.guardrails import Guardrails  # noqa: E402

DECISIONS_PER_SCENARIO = 400  # most of each episode; the whole suite stays under ~10 s


def test_shipped_default_is_in_the_package() -> None:
    assert (DEFAULT_CHECKPOINT / "class_and_ctor_args.pkl").is_file()
    assert (DEFAULT_CHECKPOINT / "MODEL_CARD.md").is_file()
    import raysys.agent.policies as policies_module

    assert Path(policies_module.__file__).name == "policies.py"  # the data folder shadows nothing


def test_registered_as_rl_and_defaults_to_the_shipped_policy() -> None:
    policy = make_policy("rl", cost_per_worker_second=0.05)
    assert isinstance(policy, RLPolicy)
    assert policy.checkpoint == DEFAULT_CHECKPOINT


@pytest.mark.parametrize("scenario", resolve_scenarios(SHIPPED_SCENARIOS), ids=lambda s: s.name)
def test_every_decision_passes_the_guardrails(scenario) -> None:
    lam = scenario.spec.objective.cost_per_worker_second
    policy = RLPolicy(cost_per_worker_second=lam, guardrails=scenario.spec.guardrails)
    guard = Guardrails(scenario.spec.guardrails)
    sim = Simulator(scenario, seed=0)
    acted = 0
    for _ in range(DECISIONS_PER_SCENARIO):
        if sim.done:
            break
        snap = sim.snapshot()
        decision = policy.decide(snap)
        policy.learn()
        safe = guard.filter(decision, snap)
        if not isinstance(decision, Noop):
            acted += 1
            assert not isinstance(safe, Noop), f"{decision} was refused at t={snap.time_s}"
            if not isinstance(decision, Rebalance):  # a rebalance's shares get floored
                assert safe == decision
        sim.apply(safe)
        sim.advance(sim.interval_s)
    assert acted <= DECISIONS_PER_SCENARIO


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=str(missing)):
        RLPolicy(checkpoint=missing)


def test_folder_without_a_module_names_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="holds no RLModule"):
        RLPolicy(checkpoint=tmp_path)


@pytest.mark.parametrize("damaged", ["class_and_ctor_args.pkl", "module_state.pt"])
def test_corrupt_checkpoint_names_the_path(tmp_path, damaged) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, copy)
    target = copy / damaged
    if not target.exists():  # state file name of this RLlib version
        target = next(p for p in copy.iterdir() if p.name.startswith("module_state"))
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(copy)):
        RLPolicy(checkpoint=copy)
