"""Evaluator: deterministic by seed, oracle-static is a true lower bound of static, CLI output."""

from __future__ import annotations

import copy
import json

import pytest
from test_sim_fixtures import base_scenario, tiny

from raysys.agent.cli import main
from raysys.agent.evaluate import (
    ORACLE,
    default_builder,
    evaluate,
    mean_ci,
    oracle_static,
    play_to_end,
    run_episode,
    static_allocations,
)
from raysys.agent.policies import make_policy
from raysys.agent.scenarios import scenario_from_dict
from raysys.agent.sim import Simulator
from raysys.control.decisions import Noop
from raysys.control.guardrails import Guardrails

EVENTFUL = base_scenario(
    name="eventful",
    episode={"samples": 150_000, "observation_noise": 0.03},
    random_events=[
        {"kind": "stragglers", "rate_per_hour": 60},
        {"kind": "worker_failures", "rate_per_hour": 20},
    ],
)
BUILDERS = {name: default_builder(name) for name in ("static", "threshold", "goodput")}


def test_evaluator_is_deterministic_by_seed() -> None:
    scenarios = [tiny(), scenario_from_dict(EVENTFUL)]
    first = evaluate(scenarios, BUILDERS, seeds=[0, 1])
    second = evaluate(scenarios, BUILDERS, seeds=[0, 1])
    assert first.episodes == second.episodes
    assert first.summary() == second.summary()
    other = evaluate(scenarios, BUILDERS, seeds=[2, 3])
    eventful = [e.score for e in first.episodes if e.scenario == "eventful"]
    assert eventful != [e.score for e in other.episodes if e.scenario == "eventful"]


def test_parallel_evaluation_gives_the_same_results() -> None:
    scenarios = [scenario_from_dict(EVENTFUL)]
    assert (
        evaluate(scenarios, BUILDERS, [0, 1], jobs=2).episodes
        == evaluate(scenarios, BUILDERS, [0, 1], jobs=1).episodes
    )


def test_oracle_static_is_the_best_fixed_allocation() -> None:
    scenario = scenario_from_dict(EVENTFUL)
    allocations = static_allocations(scenario)
    assert len(allocations) == 6 * 4
    for seed in (0, 1):
        best, alloc = oracle_static(scenario, seed)
        static = run_episode(scenario, make_policy("static"), seed)
        assert best.score <= static.score
        for other in ({"alpha": 1, "beta": 1}, {"alpha": 6, "beta": 4}):
            assert best.score <= run_episode(scenario, make_policy("static"), seed, other).score
        assert run_episode(scenario, make_policy("static"), seed, alloc).score == best.score


def test_summary_ratios_are_relative_to_the_oracle() -> None:
    report = evaluate([tiny()], BUILDERS, seeds=[0, 1, 2])
    rows = {r["policy"]: r for r in report.summary()}
    assert rows[ORACLE]["ratio"] == pytest.approx(1.0)
    assert rows["static"]["ratio"] >= 1.0
    assert "mean ratio to oracle" in report.table()


def test_mean_ci() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.4841, rel=1e-3)  # t(0.975, 2) * 1 / sqrt(3)


def test_cli_eval_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    import yaml

    folder = tmp_path / "scn"
    folder.mkdir()
    (folder / "eventful.yaml").write_text(yaml.safe_dump(EVENTFUL))
    out = tmp_path / "eval.json"
    code = main(
        [
            "agent",
            "eval",
            "--scenarios",
            str(folder),
            "--policies",
            "static,threshold,goodput,tabularq",
            "--seeds",
            "2",
            "--json",
            str(out),
            "--tabular-episodes",
            "10",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "eventful" in printed and "oracle-static" in printed and "tabularq" in printed
    data = json.loads(out.read_text())
    assert len(data["episodes"]) == 2 * 5
    assert {r["policy"] for r in data["summary"]} == {
        ORACLE,
        "static",
        "threshold",
        "goodput",
        "tabularq",
    }


def test_cli_eval_reports_a_broken_scenario(tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\nprofile: {parametric: {a: 1, b: 1, c: 1}}\n")
    assert main(["agent", "eval", "--scenarios", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "episode" in err


def test_a_copied_episode_replays_the_same_future() -> None:
    """Lookahead (bench/agent_headroom.py) plays copies of a running episode to the end: a copy
    of the simulator and the policy must meet the very events and noise the original meets, and
    playing it must leave the original untouched."""
    scenario = scenario_from_dict(EVENTFUL)
    plain = run_episode(scenario, make_policy("goodput"), seed=3)
    sim, policy = Simulator(scenario, seed=3), make_policy("goodput")
    guard = Guardrails(scenario.spec.guardrails)
    for _ in range(5):  # part-way in, with some of the policy's state built up
        snap = sim.snapshot()
        decision = guard.filter(policy.decide(snap), snap)
        policy.learn()
        if not isinstance(decision, Noop):
            sim.apply(decision)
        sim.advance(sim.interval_s)
    twin_sim, twin_policy = copy.deepcopy(sim), copy.deepcopy(policy)
    play_to_end(twin_sim, twin_policy, guard)
    play_to_end(sim, policy, guard)
    assert twin_sim.score == sim.score == plain.score
