"""Policies, the policy registry, the action vocabulary and featurize()."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_sim_fixtures import base_scenario, tiny

from raysys.agent import policies
from raysys.agent.actions import ActionSpace, PartnerAction
from raysys.agent.evaluate import run_episode
from raysys.agent.featurize import FEATURE_MAX, FeatureLayout, featurize
from raysys.agent.policies import Policy, available_policies, make_policy, register_policy
from raysys.agent.scenarios import scenario_from_dict
from raysys.agent.sim import Simulator
from raysys.agent.tabular_q import QTable, TabularQConfig, TabularQPolicy, train_tabular_q
from raysys.control.decisions import NOOP, Decision, Noop, Rebalance, Replace, Scale
from raysys.control.guardrails import Guardrails
from raysys.control.snapshot import Snapshot

STRAGGLER = base_scenario(
    name="straggler",
    episode={"samples": 300_000, "observation_noise": 0.02},
    events=[{"kind": "straggler", "at": 60, "worker": "alpha/0", "factor": 4.0}],
)


def test_registry_has_the_baselines_and_a_hook_for_more() -> None:
    assert {"static", "threshold", "goodput", "oracle-static", "tabularq"} <= set(
        available_policies()
    )
    with pytest.raises(KeyError, match="unknown policy"):
        make_policy("nope")

    @register_policy("always-up-test")
    class AlwaysUp(Policy):
        def decide(self, snapshot: Snapshot) -> Decision:
            return Scale(snapshot.partners[0].name, 1)

    try:
        assert isinstance(make_policy("always-up-test"), AlwaysUp)
        with pytest.raises(ValueError, match="already registered"):
            register_policy("always-up-test")(Policy)
    finally:
        del policies._REGISTRY["always-up-test"]


def test_static_never_acts_and_oracle_static_walks_to_its_allocation() -> None:
    snap = Simulator(tiny()).snapshot()
    assert make_policy("static").decide(snap) == NOOP
    oracle = make_policy("oracle-static", allocation={"alpha": 4, "beta": 1})
    assert oracle.decide(snap) == Scale("alpha", 1)
    assert make_policy("oracle-static", allocation={"alpha": 2, "beta": 1}).decide(snap) == NOOP


def test_threshold_scales_up_an_efficient_compute_bound_job() -> None:
    data = base_scenario(
        partners=[
            {
                "name": "alpha",
                "batch_share": 512,
                "workers": 1,
                "max_workers": 6,
                "placement": {"site": "a"},
            },
            {
                "name": "beta",
                "batch_share": 512,
                "workers": 1,
                "max_workers": 6,
                "placement": {"site": "b"},
            },
        ]
    )
    scenario = scenario_from_dict(data)
    static = run_episode(scenario, make_policy("static"), seed=0)
    threshold = run_episode(scenario, make_policy("threshold"), seed=0)
    assert threshold.actions >= 2
    assert threshold.completion_time_s < 0.7 * static.completion_time_s


def test_goodput_replaces_a_persistent_straggler() -> None:
    scenario = scenario_from_dict(STRAGGLER)
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    sim, guard = Simulator(scenario, seed=0), Guardrails(scenario.spec.guardrails)
    replaced = False
    while not sim.done and sim.time_s < 300:
        snap = sim.snapshot()
        decision = guard.filter(policy.decide(snap), snap)
        replaced |= decision == Replace("alpha/0")
        sim.apply(decision)
        sim.advance(10)
    assert replaced and "alpha/0" not in sim.workers
    static = run_episode(scenario, make_policy("static"), seed=0)
    goodput = run_episode(scenario, make_policy("goodput", cost_per_worker_second=0.02), seed=0)
    assert goodput.score < 0.8 * static.score


def _shared_pool(sync_cross: float, sync_local: float) -> dict:
    """Both partners may run on any of three 4-CPU nodes; the simulator spreads them at start."""
    data = base_scenario(
        name="shared_pool",
        profile={"parametric": {"a": 0.02, "b": 0.0005, "c": sync_cross, "d": 0.02,
                                "gamma": 1.0, "c_local": sync_local, "d_local": 0.002}},
        nodes=[{"id": "n", "count": 3, "cpus": 4, "labels": {"site": "a"}}],
    )
    for p in data["partners"]:
        p["placement"] = {"site": "a"}
    return data


def _moves(scenario, seed: int = 0) -> tuple[Simulator, list[Decision]]:
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    sim, guard = Simulator(scenario, seed=seed), Guardrails(scenario.spec.guardrails)
    moves = []
    while not sim.done:
        snap = sim.snapshot()
        decision = guard.filter(policy.decide(snap), snap)
        if isinstance(decision, Replace) and decision.node is not None:
            moves.append(decision)
        sim.apply(decision)
        sim.advance(sim.interval_s)
    return sim, moves


def test_goodput_packs_a_communication_bound_job_onto_one_node() -> None:
    scenario = scenario_from_dict(_shared_pool(sync_cross=0.4, sync_local=0.02))
    assert len({w.node for w in Simulator(scenario, seed=0).workers.values()}) == 2
    sim, moves = _moves(scenario)
    assert moves and len({w.node for w in sim.workers.values()}) == 1
    static = run_episode(scenario, make_policy("static"), seed=0)
    goodput = run_episode(scenario, make_policy("goodput", cost_per_worker_second=0.02), seed=0)
    assert goodput.score < 0.6 * static.score


def test_goodput_packs_onto_real_nodes_only() -> None:
    """The autoscaler's stand-in node for capacity to come is no place to pack onto, and
    neither is a node where a worker straggles."""
    from raysys.agent.goodput import pack_node
    from raysys.control.autoscale import VIRTUAL_NODE_PREFIX
    from raysys.control.snapshot import NodeView

    scenario = scenario_from_dict(_shared_pool(sync_cross=0.4, sync_local=0.02))
    snap = Simulator(scenario, seed=0).snapshot()
    counts = {"alpha": 2, "beta": 1}
    assert pack_node(snap, counts).id == "n-0"  # alpha's two workers are there already
    assert pack_node(snap, counts, frozenset({"n-0"})).id != "n-0"
    virtual = NodeView(f"{VIRTUAL_NODE_PREFIX}alpha", {"site": "a"}, 100, 100)
    only_virtual = dataclasses.replace(snap, nodes=[virtual])
    assert pack_node(only_virtual, counts) is None


def test_goodput_trying_a_pack_costs_a_compute_bound_job_little() -> None:
    """From one configuration goodput cannot tell compute from sync, and its prior (in-node sync
    4x faster) may make it try a pack where sync hardly matters. That try must stay cheap: at
    most the job's spread workers move, and the job still scores no worse than never acting."""
    data = _shared_pool(sync_cross=0.004, sync_local=0.003)
    data["profile"]["parametric"].update(a=0.2, b=0.01)
    scenario = scenario_from_dict(data)
    _, moves = _moves(scenario)
    assert len(moves) <= 1  # beta/0 is the only worker off alpha's node
    static = run_episode(scenario, make_policy("static"), seed=0)
    goodput = run_episode(scenario, make_policy("goodput", cost_per_worker_second=0.02), seed=0)
    assert goodput.score <= static.score


def _alpha_times(snap: Snapshot, slow: float, fast: float, batches: tuple[int, int] | None = None,
                 **changes) -> Snapshot:
    """`snap` with alpha/0's and alpha/1's step times (and local batches) set (tiny(): alpha
    has two workers)."""
    times = {"alpha/0": slow, "alpha/1": fast}
    rows = dict(zip(times, batches, strict=True)) if batches else {}
    workers = [dataclasses.replace(w, step_time_s=times.get(w.id, w.step_time_s),
                                   local_batch=rows.get(w.id, w.local_batch))
               for w in snap.workers]
    return dataclasses.replace(snap, workers=workers, **changes)


def test_a_straggler_of_two_is_judged_against_its_peer() -> None:
    """2.5x slower than its one peer: a straggler at ratio 1.5. Against a median that included
    it ((2.5 + 1) / 2 = 1.75) it was only 1.43x, so neither goodput nor the Guardrails would
    replace it; only a 3x straggler ever counted in a partner of two."""
    scenario = tiny()
    snap = _alpha_times(Simulator(scenario, seed=0).snapshot(), slow=0.25, fast=0.1)
    assert snap.median_step_time("alpha", exclude="alpha/0") == pytest.approx(0.1)
    assert snap.median_step_time("alpha") == pytest.approx(0.175)
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    guard = Guardrails(scenario.spec.guardrails.model_copy(update={"straggler_ratio": 1.5}))
    assert guard.filter(policy.decide(snap), snap) == Replace("alpha/0")
    unmeasured_peer = _alpha_times(snap, slow=0.25, fast=0.0)
    assert guard.filter(Replace("alpha/0"), unmeasured_peer) == NOOP  # nothing to compare with


def test_goodput_corrects_a_rebalance_soon_but_waits_out_a_scale() -> None:
    """A rebalance stalls nothing: its result can be corrected at the next look (5 s). A scale's
    stall must leave the measurements first (settle_s), and only its stall is learned as the
    cost of a rescale."""
    snap = Simulator(tiny(), seed=0).snapshot()
    uneven = {"slow": 0.13, "fast": 0.1, "time_s": 106.0, "last_rescale_time_s": 100.0,
              "last_rescale_cost_s": 0.05}  # 1.3x: a rebalance, not a replace
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    after_scale = _alpha_times(snap, **uneven, last_rescale_kind="scale_up")
    assert policy.decide(after_scale) == NOOP
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    cost = policy.rescale_cost_s
    after_rebalance = _alpha_times(snap, **uneven, last_rescale_kind="rebalance")
    decision = policy.decide(after_rebalance)
    assert isinstance(decision, Rebalance) and decision.partner == "alpha"
    assert decision.split["alpha/1"] > decision.split["alpha/0"]
    assert policy.rescale_cost_s == cost  # not the rebalance's 0.05 s


def test_goodput_rebalances_uneven_step_times_not_uneven_speeds() -> None:
    """Where a step has a fixed cost, equal step times need unequal shares, hence unequal
    speeds: a split that already evens the times out is left alone."""
    snap = Simulator(tiny(), seed=0).snapshot()
    even_times = _alpha_times(snap, slow=0.1, fast=0.1, batches=(20, 108))
    assert make_policy("goodput", cost_per_worker_second=0.02).decide(even_times) == NOOP
    uneven = _alpha_times(snap, slow=0.13, fast=0.1, batches=(64, 64))
    decision = make_policy("goodput", cost_per_worker_second=0.02).decide(uneven)
    assert isinstance(decision, Rebalance) and decision.partner == "alpha"


def test_goodput_neither_refits_nor_acts_on_a_snapshot_without_a_new_step() -> None:
    """Live, a collective hung on a lost node shows the same step times until it times out:
    goodput must not count them again, nor ask again for a move that has not run yet."""
    scenario = scenario_from_dict(STRAGGLER)
    policy = make_policy("goodput", cost_per_worker_second=0.02)
    sim = Simulator(scenario, seed=0)
    decision = NOOP
    while decision == NOOP and sim.time_s < 300:
        sim.advance(10)
        snap = sim.snapshot()
        decision = policy.decide(snap)
    assert decision != NOOP  # a move it wants (not applied: as if the job stalled first)
    seen = sum(p.count for p in policy.fit.points.values())
    assert policy.decide(snap) == NOOP  # the same step again: the job is stalled
    assert sum(p.count for p in policy.fit.points.values()) == seen
    sim.advance(10)
    assert policy.decide(sim.snapshot()) != NOOP  # progress: it looks, and asks, again
    assert sum(p.count for p in policy.fit.points.values()) > seen


def test_goodput_fits_the_model_it_observes() -> None:
    scenario = tiny()
    policy = make_policy("goodput", cost_per_worker_second=0.0)
    sim = Simulator(scenario)
    for alloc in ({"alpha": 1, "beta": 1}, {"alpha": 3, "beta": 2}, {"alpha": 5, "beta": 4}):
        sim = Simulator(scenario, initial_workers=alloc)
        policy._observe(sim.snapshot())
    model = policy.fit.refit_if_new()
    true = sim.model
    for batch, n, k in [(32, 4, 2), (100, 8, 2), (64, 2, 2)]:
        assert model.step_time(batch, n, k) == pytest.approx(true.step_time(batch, n, k), rel=0.05)


def test_action_space_decodes_and_encodes() -> None:
    sim = Simulator(scenario_from_dict(STRAGGLER))
    sim.advance(100)
    snap = sim.snapshot()
    space = ActionSpace(max_partners=4)
    assert space.n == 17
    assert space.decode(0, snap) == NOOP
    assert space.decode(space.index(0, PartnerAction.SCALE_UP), snap) == Scale("alpha", 1)
    assert space.decode(space.index(1, PartnerAction.SCALE_DOWN), snap) == Scale("beta", -1)
    assert space.decode(space.index(0, PartnerAction.REPLACE_SLOWEST), snap) == Replace("alpha/0")
    rebalance = space.decode(space.index(0, PartnerAction.REBALANCE), snap)
    assert (
        isinstance(rebalance, Rebalance)
        and rebalance.split["alpha/1"] > 3 * rebalance.split["alpha/0"]
    )
    assert space.decode(space.index(3, PartnerAction.SCALE_UP), snap) == NOOP  # no 4th partner
    for index in range(space.n):
        decision = space.decode(index, snap)
        if not isinstance(decision, Noop):
            assert space.encode(decision, snap) == index


def scaled_snapshot(snap: Snapshot, factor: float) -> Snapshot:
    """The same job running `factor` times slower (all durations x factor)."""
    workers = [dataclasses.replace(w, step_time_s=w.step_time_s * factor) for w in snap.workers]
    return dataclasses.replace(
        snap,
        workers=workers,
        step_time_s=snap.step_time_s * factor,
        throughput=snap.throughput / factor,
        last_rescale_cost_s=snap.last_rescale_cost_s * factor,
    )


def test_featurize_is_fixed_size_bounded_and_speed_invariant() -> None:
    sim = Simulator(scenario_from_dict(STRAGGLER))
    sim.apply(Scale("alpha", 1))
    sim.advance(120)
    snap = sim.snapshot()
    features = featurize(snap, cost_per_worker_second=0.02)
    layout = FeatureLayout()
    assert features.shape == (layout.size,) and features.dtype == np.float32
    assert features.min() >= 0 and features.max() <= FEATURE_MAX
    np.testing.assert_allclose(
        featurize(scaled_snapshot(snap, 10.0), cost_per_worker_second=0.02), features, rtol=1e-5
    )
    # The straggler is alpha's slowest worker: first worker slot, 4x its partner's median.
    slowest = features[layout.worker_index(0, 0, "relative_time")]
    assert slowest > 2.5
    assert features[layout.partner_index(0, "workers_of_max")] == pytest.approx(3 / 6)
    assert features[layout.partner_index(2, "present")] == 0


def test_tabular_q_trains_saves_loads_and_decides_safely(tmp_path) -> None:
    scenario = scenario_from_dict(STRAGGLER)
    scores: list[float] = []
    table = train_tabular_q(
        [scenario], TabularQConfig(episodes=20, seed=1), on_episode=lambda _, s: scores.append(s)
    )
    assert len(scores) == 20 and len(table.values) > 3
    path = table.save(tmp_path / "q.json")
    loaded = QTable.load(path)
    assert set(loaded.values) == set(table.values)
    policy = TabularQPolicy(path, guardrails=scenario.spec.guardrails, cost_per_worker_second=0.02)
    # It only ever picks actions the guardrails allow, so none is turned into Noop.
    sim, guard = Simulator(scenario, seed=3), Guardrails(scenario.spec.guardrails)
    while not sim.done:
        snap = sim.snapshot()
        decision = policy.decide(snap)
        filtered = guard.filter(decision, snap)
        assert type(filtered) is type(decision)
        sim.apply(filtered)
        sim.advance(10)
    result = run_episode(scenario, policy, seed=3)
    assert result.score == pytest.approx(sim.score)
    again = run_episode(scenario, TabularQPolicy(loaded, scenario.spec.guardrails, 0.02), seed=3)
    assert again == result
