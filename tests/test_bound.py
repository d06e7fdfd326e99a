"""The score lower bound (raysys/agent/bound.py): no policy beats it, and where nothing happens it
meets the best static allocation."""

from __future__ import annotations

import random

import pytest
from test_sim_fixtures import SHIPPED, base_scenario, tiny

from raysys.agent.bound import node_pieces, score_lower_bound
from raysys.agent.env import resolve_scenarios
from raysys.agent.evaluate import default_builder, oracle_static, run_episode
from raysys.agent.scenarios import LoadedScenario, scenario_from_dict
from raysys.agent.sim import Simulator
from raysys.control.decisions import Rebalance, Replace, Scale

# Every kind of node-level event the bound replays, and the worker-level ones it relaxes away.
# One node matches both partners, so packing the whole job on one node is possible too.
EVENTFUL = base_scenario(
    name="eventful_nodes",
    episode={"samples": 300_000, "interval_s": 10, "observation_noise": 0.05},
    nodes=[
        {"id": "a", "count": 2, "cpus": 4, "labels": {"site": "a"}},
        {"id": "b", "count": 2, "cpus": 4, "labels": {"site": "b"}, "speed": 0.7},
        {"id": "both", "cpus": 4, "labels": {"site": "a"}, "speed": 1.3},
    ],
    partners=[
        {"name": "alpha", "batch_share": 128, "workers": 2, "max_workers": 6,
         "placement": {"site": "a"}},
        {"name": "beta", "batch_share": 64, "workers": 1, "max_workers": 4},
    ],
    events=[
        {"kind": "contention", "at": 100, "jitter_s": 30, "selector": {"site": "a"}, "cpus": 4,
         "duration_s": 200},
        {"kind": "straggler", "at": 150, "node": "b-0", "factor": 2.0, "duration_s": 300},
        {"kind": "straggler", "at": 50, "worker": "alpha/0", "factor": 3.0},
        {"kind": "node_failure", "at": 250, "node": "a-1", "duration_s": 200},
        {"kind": "node_join", "at": 300, "node": {"id": "late", "cpus": 4,
                                                   "labels": {"site": "b"}, "speed": 1.5}},
    ],
    random_events=[
        {"kind": "stragglers", "rate_per_hour": 30, "target": "node"},
        {"kind": "stragglers", "rate_per_hour": 30, "target": "worker"},
        {"kind": "worker_failures", "rate_per_hour": 6},
        {"kind": "contention", "rate_per_hour": 10, "cpus": [1, 3], "duration_s": [30, 120]},
    ],
)


def random_episode(scenario: LoadedScenario, seed: int) -> float:
    """An adversarial policy for the bound: random scale, replace (to a random node, so it
    packs and moves workers in ways no heuristic does) and rebalance decisions, unfiltered."""
    sim = Simulator(scenario, seed=seed)
    rng = random.Random(seed)
    partners = [p.name for p in scenario.spec.partners]
    while not sim.done:
        roll = rng.random()
        if roll < 0.3:
            sim.apply(Scale(rng.choice(partners), rng.choice([-2, -1, 1, 2])))
        elif roll < 0.5 and sim.workers:
            sim.apply(Replace(rng.choice(sorted(sim.workers)), rng.choice(sorted(sim.nodes))))
        elif roll < 0.7:
            partner = rng.choice(partners)
            split = {w: rng.uniform(0.2, 2.0) for w in sim.partners[partner].worker_ids}
            sim.apply(Rebalance(partner, split))
        sim.advance(sim.interval_s)
    return sim.score


def test_node_events_become_pieces() -> None:
    pieces = node_pieces(scenario_from_dict(EVENTFUL), seed=0)
    assert pieces[0].start == 0.0 and pieces[-1].end == float("inf")
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))
    # beta may run anywhere: its best slot is node "both" (1.3) until "late" (1.5) joins.
    assert pieces[0].slots["beta"][0] == pytest.approx(1.3)
    assert pieces[-1].slots["beta"][0] == pytest.approx(1.5)
    # Contention on site a slows even the best slot there; a-1's failure takes a host away.
    assert min(p.slots["alpha"][0] for p in pieces) < 1.3
    assert {len(p.hosts) for p in pieces} == {2, 3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_policy_beats_the_bound(seed: int) -> None:
    scenario = scenario_from_dict(EVENTFUL)
    bound = score_lower_bound(scenario, seed)
    scores = [run_episode(scenario, default_builder(name)(scenario), seed).score
              for name in ("static", "threshold", "goodput")]
    scores += [random_episode(scenario, seed * 100 + k) for k in range(4)]
    oracle, _ = oracle_static(scenario, seed)
    scores.append(oracle.score)
    assert bound > 0.3 * min(scores)  # a bound, but not a trivial one
    assert all(bound <= s for s in scores), (bound, scores)


def test_random_placements_never_beat_the_bound_on_the_shipped_suite() -> None:
    """Random decisions include moves to arbitrary nodes (packing, oversubscribing), which is
    where a relaxation of placement would be wrong if it were."""
    for scenario in resolve_scenarios(SHIPPED):
        bound = score_lower_bound(scenario, 0)
        for k in range(2):
            assert bound <= random_episode(scenario, k), scenario.name
        goodput = run_episode(scenario, default_builder("goodput")(scenario), 0).score
        assert bound <= goodput, scenario.name


def test_where_nothing_happens_the_bound_meets_the_best_static_allocation() -> None:
    scenario = tiny()
    oracle, _ = oracle_static(scenario, 0)
    bound = score_lower_bound(scenario, 0)
    assert 0.99 * oracle.score <= bound <= oracle.score


def test_the_bound_finds_a_packed_job() -> None:
    """Both partners may use the one node 'both' (4 CPUs): two workers each packed there sync
    in-node. The bound sees it; the score of that very allocation, packed by hand, sits just
    above it."""
    data = base_scenario(
        name="packable",
        profile={"parametric": {"a": 0.02, "b": 0.0005, "c": 0.4, "d": 0.02, "gamma": 1.0,
                                "c_local": 0.02, "d_local": 0.002}},
        nodes=[{"id": "n", "count": 3, "cpus": 4, "labels": {"site": "a"}}],
    )
    for p in data["partners"]:
        p["placement"] = {"site": "a"}
    scenario = scenario_from_dict(data)
    sim = Simulator(scenario, seed=0, initial_workers={"alpha": 2, "beta": 2})
    for worker in sim.workers.values():  # what Replace(worker, "n-0") would do, without stalls
        sim.nodes[worker.node].used_cpus -= 1
        worker.node = "n-0"
        sim.nodes["n-0"].used_cpus += 1
    sim._dirty = True
    sim.run_to_end()
    spread, _ = oracle_static(scenario, 0)
    bound = score_lower_bound(scenario, 0)
    assert bound <= sim.score < 0.8 * spread.score
    assert bound >= 0.9 * sim.score


def test_cli_bound_prints_the_bound_against_oracle_static(tmp_path, capsys) -> None:
    import yaml

    from raysys.agent.cli import main

    folder = tmp_path / "scn"
    folder.mkdir()
    (folder / "eventful.yaml").write_text(yaml.safe_dump(EVENTFUL))
    assert main(["agent", "bound", "--scenarios", str(folder), "--seeds", "2"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("eventful_nodes"))
    oracle, lower, ratio = (float(x) for x in row.split()[1:])
    assert 0.3 < ratio <= 1.0 and lower <= oracle
    assert main(["agent", "bound", "--scenarios", str(folder), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_the_bound_holds_from_any_start_even_for_a_truncated_episode() -> None:
    """Starting allocations change the simulator's horizon (3x the initial nominal time): with
    random events drawn on one shared stream, a faster start met other events, and an episode
    cut short at its earlier max_time_s scored below a bound capped at the default start's."""
    data = base_scenario(
        name="overrun",
        partners=[{"name": "alpha", "batch_share": 64, "workers": 1, "max_workers": 4}],
        nodes=[{"id": "n", "cpus": 4}],
        random_events=[
            {"kind": "stragglers", "rate_per_hour": 3600, "factor": [1.0001, 1.0001],
             "duration_s": [1, 1], "target": "worker"},
            {"kind": "contention", "rate_per_hour": 6, "cpus": [36, 36],
             "duration_s": [10000, 10000]},
        ],
    )
    scenario = scenario_from_dict(data)
    for seed in range(6):
        bound = score_lower_bound(scenario, seed)
        for workers in range(1, 5):
            sim = Simulator(scenario, seed=seed, initial_workers={"alpha": workers})
            sim.run_to_end()
            assert bound <= sim.score, (seed, workers, bound, sim.score, sim.finished)


def test_episodes_of_a_seed_share_every_event_before_the_earlier_horizon() -> None:
    scenario = scenario_from_dict(EVENTFUL)
    slow, fast = (Simulator(scenario, seed=4, initial_workers={"alpha": n, "beta": 1})
                  for n in (1, 6))
    assert slow.max_time_s != fast.max_time_s
    horizon = min(slow.max_time_s, fast.max_time_s)

    def before(sim: Simulator) -> list[tuple]:
        return sorted((e.time, e.kind, e.factor, e.cpus, e.pick) for e in sim._events
                      if e.time < horizon)

    assert before(slow) == before(fast) and len(before(slow)) > 20
