"""Simulator physics: step time, progress, events, rescale costs, determinism."""

from __future__ import annotations

import math

import pytest
from test_sim_fixtures import base_scenario, tiny

from raysys.agent.scenarios import scenario_from_dict
from raysys.agent.sim import Simulator
from raysys.agent.sim_state import split_batch
from raysys.control.decisions import Rebalance, Replace, Scale


def expected_step(sim: Simulator, local_batches: list[int], slowdowns: list[float]) -> float:
    model = sim.model
    hosts = len({w.node for w in sim.workers.values()})
    sync = model.sync_time(len(sim.workers), hosts)
    return max(
        model.combine(model.compute_time(b) * s, sync)
        for b, s in zip(local_batches, slowdowns, strict=True)
    )


def test_step_time_is_the_slowest_worker_of_the_pollux_model() -> None:
    sim = Simulator(tiny())
    # alpha: 2 workers x 64 samples, beta: 1 x 64; all on speed-1 nodes.
    assert sorted(w.local_batch for w in sim.workers.values()) == [64, 64, 64]
    assert sim.step_time_s == pytest.approx(expected_step(sim, [64, 64, 64], [1, 1, 1]))


def test_progress_without_events_is_analytic() -> None:
    sim = Simulator(tiny())
    step = sim.step_time_s
    sim.run_to_end()
    assert sim.finished
    expected = 200_000 / (192 / step)
    assert sim.time_s == pytest.approx(expected, rel=1e-12)
    assert sim.worker_seconds == pytest.approx(3 * expected, rel=1e-12)
    assert sim.score == pytest.approx(expected + 0.02 * 3 * expected, rel=1e-12)


def test_advancing_in_intervals_equals_one_jump() -> None:
    jump, steps = Simulator(tiny(), seed=3), Simulator(tiny(), seed=3)
    jump.run_to_end()
    while not steps.done:
        steps.snapshot()
        steps.advance(7.5)
    assert steps.time_s == pytest.approx(jump.time_s, rel=1e-9)
    assert steps.score == pytest.approx(jump.score, rel=1e-9)


def test_a_straggler_slows_every_step() -> None:
    events = [{"kind": "straggler", "at": 100, "worker": "alpha/0", "factor": 3.0}]
    sim = Simulator(tiny(events=events))
    before = sim.step_time_s
    sim.advance(50)
    samples_first_50 = sim.samples_done
    sim.advance(100)  # straggler starts at 100
    after = sim.step_time_s
    assert after == pytest.approx(expected_step(sim, [64, 64, 64], [3, 1, 1]))
    assert after > 2 * before
    start = sim.samples_done
    sim.advance(50)
    assert sim.samples_done - start == pytest.approx(samples_first_50 * before / after)
    slow = {w.id: w.step_time_s for w in sim.snapshot().workers}
    assert slow["alpha/0"] == pytest.approx(after)
    assert slow["alpha/1"] < after / 2


def test_a_transient_node_straggler_ends() -> None:
    events = [{"kind": "straggler", "at": 10, "node": "b-0", "factor": 2.0, "duration_s": 30}]
    sim = Simulator(tiny(events=events))
    before = sim.step_time_s
    sim.advance(20)
    assert sim.step_time_s > before
    sim.advance(30)
    assert sim.step_time_s == pytest.approx(before)


def test_a_failure_removes_a_worker() -> None:
    events = [{"kind": "worker_failure", "at": 30, "worker": "alpha/1"}]
    sim = Simulator(tiny(events=events))
    sim.snapshot()
    sim.advance(40)
    snap = sim.snapshot()
    dead = [w for w in snap.workers if not w.alive]
    assert [w.id for w in dead] == ["alpha/1"]
    assert snap.partner("alpha").workers == 1
    assert snap.recent_failures == 1
    # Reported once: the next snapshot no longer lists the dead worker.
    sim.advance(10)
    assert "alpha/1" not in {w.id for w in sim.snapshot().workers}
    # Survivor now processes the whole share of alpha.
    assert sim.workers["alpha/0"].local_batch == 128


def test_failure_below_minimum_is_restored_by_the_controller() -> None:
    data = base_scenario(events=[{"kind": "node_failure", "at": 30, "node": "b-0"}])
    sim = Simulator(scenario_from_dict(data))
    assert sim.workers["beta/0"].node == "b-0"
    sim.advance(40)
    beta = [w for w in sim.workers.values() if w.partner == "beta"]
    assert len(beta) == 1 and beta[0].node == "b-1" and beta[0].id == "beta/1"
    assert sim.last_rescale_cost_s == sim.costs.scale_up_cold
    assert sim.snapshot().last_rescale_kind == "recovery"


def test_job_blocks_without_capacity_and_is_charged_when_cut() -> None:
    data = base_scenario(
        nodes=[
            {"id": "a", "cpus": 4, "labels": {"site": "a"}},
            {"id": "b", "cpus": 4, "labels": {"site": "b"}},
        ],
        events=[{"kind": "node_failure", "at": 30, "node": "b"}],
        episode={"samples": 200_000, "max_time_s": 600, "observation_noise": 0.0},
    )
    sim = Simulator(scenario_from_dict(data))
    sim.advance(100)
    assert math.isinf(sim.step_time_s)  # residency: only beta may process beta's samples
    done_at_100 = sim.samples_done
    sim.run_to_end()
    assert sim.samples_done == done_at_100 and sim.truncated and not sim.finished
    remaining = (200_000 - done_at_100) / sim.initial_rate
    assert sim.unfinished_penalty == pytest.approx(remaining * (1 + 0.02 * 3))
    assert sim.score > 600 + remaining


def test_node_join_adds_capacity() -> None:
    data = base_scenario(
        nodes=[
            {"id": "a", "cpus": 2, "labels": {"site": "a"}},
            {"id": "b", "cpus": 1, "labels": {"site": "b"}},
        ],
        events=[
            {
                "kind": "node_join",
                "at": 50,
                "node": {"id": "b-new", "cpus": 4, "labels": {"site": "b"}},
            }
        ],
    )
    sim = Simulator(scenario_from_dict(data))
    assert not sim.apply(Scale("beta", +1))  # no free CPU on b
    sim.advance(60)
    assert sim.apply(Scale("beta", +2))
    assert len(sim.partners["beta"].worker_ids) == 3


def test_contention_oversubscribes_and_gives_back() -> None:
    events = [{"kind": "contention", "at": 10, "node": "b-0", "cpus": 6, "duration_s": 100}]
    sim = Simulator(tiny(events=events))
    before = sim.step_time_s
    sim.advance(20)
    assert sim.nodes["b-0"].free_cpus() == 0
    # 1 CPU of ours + 6 of the tenant's on 4 CPUs: beta's worker runs 7/4 slower.
    assert sim.workers["beta/0"].own_time > 1.5 * before
    sim.advance(100)
    assert sim.step_time_s == pytest.approx(before)
    assert sim.nodes["b-0"].free_cpus() == 3


def test_rescale_costs_stall_the_job_and_count_workers() -> None:
    sim = Simulator(tiny())
    assert sim.snapshot().last_rescale_kind == ""
    assert sim.apply(Scale("alpha", +1))  # a-0 already runs alpha (warm)
    assert sim.last_rescale_cost_s == sim.costs.scale_up_warm
    assert sim.snapshot().last_rescale_kind == "scale_up"
    step = sim.step_time_s
    sim.advance(10)
    productive = 10 - sim.costs.scale_up_warm
    assert sim.samples_done == pytest.approx(productive * 192 / step)
    assert sim.worker_seconds == pytest.approx(4 * 10)
    assert sim.apply(Replace("alpha/0"))
    assert sim.last_rescale_cost_s == sim.costs.replace
    assert sim.snapshot().last_rescale_kind == "replace"
    assert sim.apply(Rebalance("alpha", {"alpha/1": 2.0, "alpha/2": 1.0, "alpha/3": 1.0}))
    assert sim.snapshot().last_rescale_kind == "rebalance"
    assert "alpha/0" not in sim.workers and sim.workers["alpha/3"].node == "a-1"


def test_scaling_never_exceeds_capacity_or_bounds() -> None:
    sim = Simulator(tiny())
    assert sim.apply(Scale("beta", +10))
    assert len(sim.partners["beta"].worker_ids) == 4  # max_workers
    assert sim.apply(Scale("alpha", +10))
    assert len(sim.partners["alpha"].worker_ids) == 6
    assert all(n.used_cpus <= n.cpus for n in sim.nodes.values())
    assert sim.apply(Scale("alpha", -10))
    assert len(sim.partners["alpha"].worker_ids) == 1  # min_workers


def test_rebalance_moves_samples_to_fast_workers() -> None:
    data = base_scenario(
        nodes=[
            {"id": "a-fast", "cpus": 1, "speed": 2.0, "labels": {"site": "a"}},
            {"id": "a-slow", "cpus": 1, "speed": 1.0, "labels": {"site": "a"}},
            {"id": "b", "cpus": 4, "labels": {"site": "b"}},
        ]
    )
    data["partners"][1]["batch_share"] = 16  # so that alpha's slow worker sets the pace
    sim = Simulator(scenario_from_dict(data))
    before = sim.step_time_s
    fast = next(w for w in sim.workers.values() if w.node == "a-fast")
    slow = next(w for w in sim.workers.values() if w.node == "a-slow")
    assert sim.apply(Rebalance("alpha", {fast.id: 2.0, slow.id: 1.0}))
    assert sim.step_time_s < before
    assert (fast.local_batch, slow.local_batch) == (85, 43)


def test_same_seed_same_episode_other_seed_other_events() -> None:
    data = base_scenario(
        random_events=[
            {"kind": "stragglers", "rate_per_hour": 40},
            {"kind": "worker_failures", "rate_per_hour": 4},
        ],
        episode={"samples": 200_000, "observation_noise": 0.05},
    )

    def run(seed: int) -> tuple:
        sim = Simulator(scenario_from_dict(data), seed=seed)
        views = []
        while not sim.done:
            snap = sim.snapshot()
            views.append((snap.step_time_s, tuple(w.id for w in snap.workers)))
            if len(views) % 7 == 0:
                sim.apply(Scale("alpha", 1 if len(views) % 14 else -1))
            sim.advance(10)
        return sim.score, views

    assert run(5) == run(5)
    assert run(5)[0] != run(6)[0]


def test_split_batch_is_whole_samples_in_proportion() -> None:
    assert split_batch(10, [1, 1, 1]) == [4, 3, 3]
    assert split_batch(100, [3, 1]) == [75, 25]
    assert split_batch(5, [1000, 1, 1]) == [3, 1, 1]  # everyone gets at least one
    assert sum(split_batch(97, [0.3, 0.2, 0.5])) == 97
