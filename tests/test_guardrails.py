"""Guardrails: no decision that passes them breaks bounds, capacity, cooldown or the action rate."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sim_fixtures import base_scenario

from raysys.agent.actions import ActionSpace
from raysys.agent.scenarios import scenario_from_dict
from raysys.agent.sim import Simulator
from raysys.control.decisions import NOOP, Noop, Rebalance, Replace, Scale
from raysys.control.guardrails import GuardrailConfig, Guardrails
from raysys.control.snapshot import NodeView, PartnerView, Snapshot, WorkerView, matches

SITES = ["a", "b", "c"]
CONFIG = GuardrailConfig(cooldown_s=30, max_actions_per_minute=4, min_share_fraction=0.2)


@st.composite
def snapshots(draw) -> Snapshot:
    nodes = []
    for i in range(draw(st.integers(1, 6))):
        total = float(draw(st.integers(1, 8)))
        free = draw(st.floats(0, total, allow_nan=False))
        nodes.append(NodeView(f"n{i}", {"site": draw(st.sampled_from(SITES))}, total, free))
    partners, workers, cpus, placement = [], [], {}, {}
    for i in range(draw(st.integers(1, 4))):
        name = f"p{i}"
        low = draw(st.integers(1, 3))
        high = draw(st.integers(low, 8))
        live = draw(st.integers(0, high + 1))  # may be outside bounds after failures
        partners.append(PartnerView(name, live, low, high, draw(st.integers(16, 256))))
        cpus[name] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        placement[name] = draw(st.sampled_from([{}, *({"site": s} for s in SITES)]))
        for k in range(live + draw(st.integers(0, 1))):
            workers.append(
                WorkerView(
                    f"{name}/{k}",
                    name,
                    draw(st.sampled_from(nodes)).id,
                    draw(st.floats(0, 5)),
                    draw(st.integers(1, 64)),
                    k < live,
                )
            )
    time_s = draw(st.floats(0, 1000))
    last = draw(st.one_of(st.none(), st.floats(0, time_s)))
    return Snapshot(
        time_s,
        0,
        0,
        1000,
        workers,
        partners,
        nodes,
        cpus,
        placement,
        last,
        0.0,
        0,
        draw(st.integers(0, 6)),
        1.0,
        1.0,
    )


@st.composite
def decisions(draw, snap: Snapshot):
    partner = st.sampled_from([p.name for p in snap.partners] + ["ghost"])
    worker = st.sampled_from([w.id for w in snap.workers] + ["ghost/9"])
    node = st.sampled_from([None, "ghost", *(n.id for n in snap.nodes)])
    share = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 50))
    return draw(
        st.one_of(
            st.just(NOOP),
            st.builds(Scale, partner, st.integers(-10, 10)),
            st.builds(Replace, worker, node),
            st.builds(Rebalance, partner, st.dictionaries(worker, share, max_size=6)),
        )
    )


@st.composite
def snapshot_and_decision(draw):
    snap = draw(snapshots())
    return snap, draw(decisions(snap))


def check_safe(decision, snap: Snapshot, config: GuardrailConfig = CONFIG) -> None:
    """Every property a filtered decision must have."""
    if isinstance(decision, Noop):
        return
    assert snap.last_rescale_time_s is None or (
        snap.time_s - snap.last_rescale_time_s >= config.cooldown_s
    )
    assert snap.actions_last_minute < config.max_actions_per_minute
    if isinstance(decision, Scale):
        p = snap.partner(decision.partner)
        assert p is not None and decision.delta != 0
        if decision.delta > 0:
            assert p.workers + decision.delta <= p.max_workers
            assert decision.delta <= snap.worker_slots_for(p.name)
        else:
            assert p.workers + decision.delta >= p.min_workers
    elif isinstance(decision, Replace):
        w = snap.worker(decision.worker)
        assert w is not None and w.alive
        need = snap.cpus_per_worker[w.partner]
        if decision.node is None:
            assert snap.worker_slots_for(w.partner) >= 1
        else:
            node = snap.node(decision.node)
            assert matches(node.labels, snap.placement[w.partner]) and node.free_cpus >= need
    else:
        p = snap.partner(decision.partner)
        live = {w.id for w in snap.workers_of(p.name)}
        assert set(decision.split) == live and len(live) >= 2
        shares = list(decision.split.values())
        assert all(math.isfinite(s) and s > 0 for s in shares)
        assert math.isclose(sum(shares), 1.0)
        floor = min(max(config.min_share_fraction / len(live), 1 / p.batch_share), 1 / len(live))
        assert min(shares) >= floor - 1e-9


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_and_decision())
def test_filtered_decisions_respect_bounds_capacity_and_rate(case) -> None:
    snap, decision = case
    guard = Guardrails(CONFIG)
    filtered = guard.filter(decision, snap)
    check_safe(filtered, snap)
    assert isinstance(filtered, Noop) or type(filtered) is type(decision)
    again = guard.filter(filtered, snap)
    if isinstance(filtered, Scale | Replace | Noop):
        assert again == filtered  # filtering is idempotent
    if isinstance(decision, Scale) and not isinstance(filtered, Noop):
        assert abs(filtered.delta) <= abs(decision.delta)


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_mask_allows_exactly_what_filter_lets_through(snap: Snapshot) -> None:
    guard, space = Guardrails(CONFIG), ActionSpace(max_partners=4)
    mask = guard.mask(snap, space)
    assert mask.shape == (space.n,) and mask[0]
    for index in range(1, space.n):
        filtered = guard.filter(space.decode(index, snap), snap)
        assert mask[index] == (not isinstance(filtered, Noop))
        check_safe(filtered, snap)


def test_cooldown_and_rate_limit_turn_decisions_into_noop() -> None:
    snap = Snapshot(
        100.0,
        0,
        0,
        10,
        [],
        [PartnerView("a", 1, 1, 4, 8)],
        [NodeView("n", {}, 8, 8)],
        {"a": 1.0},
        {"a": {}},
        80.0,
        1.0,
        0,
        0,
        1.0,
        1.0,
    )
    guard = Guardrails(GuardrailConfig(cooldown_s=30, max_actions_per_minute=2))
    assert guard.filter(Scale("a", 1), snap) == NOOP  # 20 s after a rescale
    snap.last_rescale_time_s = 60.0
    assert guard.filter(Scale("a", 5), snap) == Scale("a", 3)  # clipped to max_workers
    snap.actions_last_minute = 2
    assert guard.filter(Scale("a", 1), snap) == NOOP


def test_straggler_ratio_only_lets_slow_workers_be_replaced() -> None:
    workers = [WorkerView(f"a/{i}", "a", "n", t, 8, True) for i, t in enumerate([1.0, 1.1, 3.0])]
    snap = Snapshot(
        100.0,
        0,
        0,
        10,
        workers,
        [PartnerView("a", 3, 1, 4, 24)],
        [NodeView("n", {}, 8, 4)],
        {"a": 1.0},
        {"a": {}},
        None,
        0,
        0,
        0,
        3.0,
        1.0,
    )
    guard = Guardrails(GuardrailConfig(straggler_ratio=2.0))
    assert guard.filter(Replace("a/2"), snap) == Replace("a/2")
    assert guard.filter(Replace("a/1"), snap) == NOOP


def test_straggler_ratio_still_lets_a_job_be_packed_onto_one_node() -> None:
    """A healthy worker may move to a named node that runs more of the job than its own node
    (goodput packing a communication-bound job), never to one that runs fewer."""
    workers = [WorkerView("a/0", "a", "big", 1.0, 8, True),
               WorkerView("a/1", "a", "big", 1.0, 8, True),
               WorkerView("a/2", "a", "small", 1.1, 8, True)]
    snap = Snapshot(100.0, 0, 0, 10, workers, [PartnerView("a", 3, 1, 4, 24)],
                    [NodeView("big", {}, 4, 2), NodeView("small", {}, 4, 3)],
                    {"a": 1.0}, {"a": {}}, None, 0, 0, 0, 1.1, 1.0)
    for guard in (Guardrails(GuardrailConfig(straggler_ratio=2.0)), Guardrails()):
        assert guard.filter(Replace("a/2", node="big"), snap) == Replace("a/2", node="big")
        # A packing move whose node has no room is dropped, not turned into a move elsewhere.
        full = dataclasses.replace(snap, nodes=[NodeView("big", {}, 4, 0),
                                                NodeView("small", {}, 4, 3)])
        assert guard.filter(Replace("a/2", node="big"), full) == NOOP
    guard = Guardrails(GuardrailConfig(straggler_ratio=2.0))
    assert guard.filter(Replace("a/0", node="small"), snap) == NOOP
    assert guard.filter(Replace("a/2"), snap) == NOOP
    # Between two nodes running as many of the job each, either may become the packed one.
    even = dataclasses.replace(snap, workers=[*workers, WorkerView("a/3", "a", "small", 1.0, 8,
                                                                   True)])
    assert guard.filter(Replace("a/3", node="big"), even) == Replace("a/3", node="big")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 16), min_size=40, max_size=120))
def test_random_policy_through_guardrails_keeps_the_simulated_job_in_bounds(seed, actions):
    data = base_scenario(
        random_events=[
            {"kind": "worker_failures", "rate_per_hour": 30},
            {"kind": "contention", "rate_per_hour": 30, "cpus": [1, 4], "duration_s": [30, 200]},
        ]
    )
    data["guardrails"] = {"cooldown_s": 0, "max_actions_per_minute": 60}
    sim = Simulator(scenario_from_dict(data), seed=seed)
    guard, space = Guardrails(sim.scenario.spec.guardrails), ActionSpace(4)
    for action in actions:
        if sim.done:
            break
        snap = sim.snapshot()
        before = {p.name: p.workers for p in snap.partners}
        sim.apply(guard.filter(space.decode(action, snap), snap))
        for name, partner in sim.partners.items():
            count, spec = len(partner.worker_ids), partner.spec
            assert count <= spec.max_workers
            assert count >= min(before[name], spec.min_workers)
        for node in sim.nodes.values():
            assert node.used_cpus <= node.cpus + 1e-9
        sim.advance(sim.interval_s)
