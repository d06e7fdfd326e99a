"""A lower bound on the simulator's score that holds for every policy, however much it knows.

score_lower_bound(scenario, seed) solves a relaxation of the episode whose optimum no sequence
of decisions can beat (score = completion time + lambda * worker-seconds, as Simulator.score):

* the policy knows the whole future and may change the allocation at any instant, for free (no
  rescale stall, no start-up, no guardrail, no decision interval), and may start anywhere;
* worker stragglers and worker failures cost nothing (a free replacement cures them), and so do
  node stragglers aimed at "whichever node hosts a worker" (a free move avoids them); failures'
  stalls are left out;
* a placement either spans nodes or puts the whole job on one node. Spanning nodes, sync takes
  the profile's cross-node time, and a partner's k workers sit in the k best worker slots its
  placement matches at that moment, slot j of a node costing what the node's j-th worker would
  (speed, scripted straggler factors, CPU oversubscription by other tenants and our own j
  workers), counted for that slot alone and without competition from other partners (the
  simulator slows every worker of a node by its total load). On one node, sync takes the
  in-node time and every worker carries that node's whole load. The better of the two counts;
* each partner's batch is split in continuous amounts that make its workers finish together
  (the best Rebalance), and any partner may run as few as one worker.

Each relaxation can only lower the optimum, so the result is a valid bound; it is not tight
(free, instant switching alone is worth a lot in scenarios with many events). Where nothing
happens it meets the best static allocation (tests/test_bound.py).

How it is solved. Node-level events are replayed on the simulator's own timeline with no
workers of ours (the seed draws the same events, jitter and random targets, and none of them
can depend on a policy), which makes the cluster piecewise constant. In a piece, N workers reach
at best a rate r(N) (samples/s, the best allocation of N). For a deadline T, the least
worker-seconds that process the job's W samples by T is a linear program over how long each N
runs in each piece (time-sharing inside a piece is allowed, and so is stopping); its dual
max_mu [mu * W + sum_pieces length * min(0, min_N (N - mu * r(N)))] is concave and piecewise
linear in mu, so it is evaluated exactly at its kinks. A job that ends in (T_k, T_k+1] scores
at least T_k + lambda * WS(T_k+1), WS non-increasing in the deadline; the bound is the least of
these over a fine grid of deadlines. An episode the simulator cuts short scores at least its
max_time_s, 3 * W / (its initial rate) + 600 s unless the scenario fixes it, and no initial
allocation runs faster than the relaxation's best rate before any event: the bound is the lower
of the two.

Which episodes it covers: every start and every sequence of decisions, for the evaluator's
episodes (no Variation). A scenario's random events are drawn up to a horizon that depends on the
initial allocation, but each generator from its own stream (sim_events.build_timeline), so
episodes of one seed share every event before the earlier of their horizons, and an episode never
runs past its own.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np

from raysys.agent.profile_fit import StepTimeModel
from raysys.agent.scenarios import LoadedScenario, Scenario
from raysys.agent.sim import Simulator
from raysys.control.snapshot import matches

DEADLINE_STEP = 1.002  # deadlines grid: each 0.2% after the previous one


@dataclass
class Piece:
    """A stretch of time in which the cluster does not change. `slots`: per partner, the
    inverse slowdown (speed / (straggler factors * oversubscription)) of its best worker slots,
    best first. `hosts`: for every live node that every partner's placement matches (one that
    could host the whole job), (speed / straggler factors, CPUs taken by other tenants, CPUs)."""

    start: float
    end: float
    slots: dict[str, np.ndarray]
    hosts: list[tuple[float, float, float]]

    def same_cluster(self, other: Piece) -> bool:
        return self.hosts == other.hosts and all(
            np.array_equal(v, other.slots[k]) for k, v in self.slots.items())


def node_pieces(scenario: LoadedScenario, seed: int) -> list[Piece]:
    """The cluster's node-level history for this seed, replayed on the simulator's own timeline
    with no workers of ours (so no event can depend on a policy)."""
    sim = Simulator(scenario, seed=seed)
    for worker in list(sim.workers.values()):
        sim._remove_worker(worker)
    sim._restore_minimums = lambda: None  # the bound places workers itself
    spec = scenario.spec
    heap = sim._events  # a heap already: the simulator's own timeline for this seed
    pieces: list[Piece] = []
    now = 0.0
    while True:
        nxt = heap[0].time if heap else math.inf
        if nxt > now:
            piece = _piece(sim, spec, now, nxt)
            if pieces and piece.same_cluster(pieces[-1]):
                pieces[-1].end = nxt  # nothing that matters here changed (a worker's event)
            else:
                pieces.append(piece)
            now = nxt
        if not heap:
            break
        event = heapq.heappop(heap)
        sim.time_s = event.time
        sim._fire(event)
    return pieces


def _piece(sim: Simulator, spec: Scenario, start: float, end: float) -> Piece:
    slots, hosts = {}, []
    speed = {n.id: n.speed / (math.prod(n.factors.values()) if n.factors else 1.0)
             for n in sim.nodes.values() if n.alive}
    for p in spec.partners:
        inv = []
        for node in sim.nodes.values():
            if node.id in speed and matches(node.labels, p.placement):
                for j in range(1, p.max_workers + 1):
                    load = max(1.0, (node.tenant_cpus + j * p.cpus_per_worker) / node.cpus)
                    inv.append(speed[node.id] / load)
        slots[p.name] = np.sort(np.array(inv))[::-1][: p.max_workers]
    for node in sim.nodes.values():
        if node.id in speed and all(matches(node.labels, p.placement) for p in spec.partners):
            hosts.append((speed[node.id], node.tenant_cpus, node.cpus))
    return Piece(start, end, slots, hosts)


def best_rates(scenario: LoadedScenario, seed: int, pieces: list[Piece]) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Per piece and total worker count N, the highest rate any allocation of N workers could
    reach (0 where none fits). Returns (counts N, rates[piece, N index]).

    A placement either spans nodes (then sync takes the cross-node time, and each partner's
    compute is bounded by its best slots) or puts every worker on one node (then sync takes the
    in-node time, and every worker carries that node's whole load); the better case counts."""
    spec = scenario.spec
    model = Simulator(scenario, seed=seed).model
    partners = spec.partners
    combos = np.array(list(itertools.product(
        # From one worker, not min_workers: a failure with no room to restart leaves a partner
        # below its minimum for a while.
        *[range(1, p.max_workers + 1) for p in partners])))
    totals = combos.sum(axis=1)
    cpus_used = combos @ np.array([p.cpus_per_worker for p in partners])
    # Per partner and combo: seconds of compute per unit of speed at a balanced split.
    work = np.stack([(model.beta_c * p.batch_share + combos[:, i] * model.alpha_c)
                     for i, p in enumerate(partners)], axis=1)
    spread_sync = np.array([model.sync_time(int(n), 2) for n in totals])
    packed_sync = np.array([model.sync_time(int(n), 1) for n in totals])
    counts = np.arange(totals.min(), totals.max() + 1)
    rates = np.zeros((len(pieces), len(counts)))
    for s, piece in enumerate(pieces):
        compute = np.zeros(len(combos))
        for i, p in enumerate(partners):
            inv = piece.slots[p.name]
            k = combos[:, i]
            prefix = np.concatenate([[0.0], np.cumsum(inv)])
            with np.errstate(divide="ignore"):
                t = work[:, i] / prefix[np.minimum(k, len(inv))]
            compute = np.maximum(compute, np.where(k <= len(inv), t, np.inf))
        step = _combine(model, compute, spread_sync)
        for speed, tenant, cpus in piece.hosts:
            load = np.maximum(1.0, (tenant + cpus_used) / cpus)
            packed = (work / combos).max(axis=1) * load / speed
            step = np.minimum(step, _combine(model, packed, packed_sync))
        rate = spec.global_batch / step
        for j, n in enumerate(counts):
            sel = totals == n
            rates[s, j] = rate[sel].max() if sel.any() else 0.0
    return counts, rates


def _combine(model: StepTimeModel, compute: np.ndarray, sync: np.ndarray) -> np.ndarray:
    """StepTimeModel.combine over arrays (inf compute: no such placement)."""
    g = model.gamma
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(sync > 0, (compute**g + sync**g) ** (1.0 / g), compute)


class WorkerSecondsBound:
    """Lower bounds on the worker-seconds of any schedule that processes `work` samples by a
    deadline: the LP's value, from its dual (any price mu >= 0 gives a valid bound)."""

    def __init__(self, pieces: list[Piece], counts: np.ndarray, rates: np.ndarray,
                 work: float) -> None:
        self.starts = np.array([p.start for p in pieces])
        self.ends = np.array([p.end for p in pieces])
        self.best = rates.max(axis=1)
        self.work = work
        # The dual is concave and piecewise linear in mu: its maximum lies at a kink, and every
        # kink is a slope of some piece's lower hull of (rate, workers) points. All of them are
        # tried, so the dual's value is the LP's exactly.
        self.mus = np.unique(np.concatenate([[0.0], *(_hull_slopes(r, counts) for r in rates)]))
        # Per price and piece: the best of running N workers (N - mu r) or stopping (0).
        value = counts[None, None, :] - self.mus[:, None, None] * rates[None, :, :]
        self.per_piece = np.minimum(value.min(axis=2), 0.0)

    def __call__(self, deadline: float) -> float:
        lengths = np.clip(np.minimum(self.ends, deadline) - self.starts, 0.0, None)
        if float(lengths @ self.best) < self.work:
            return math.inf  # not even the best rates all along get the job done by then
        duals = self.mus * self.work + self.per_piece @ lengths
        return float(max(duals.max(), 0.0))


def _least_truncated_score(scenario: LoadedScenario, seed: int) -> float:
    """What an episode cut short at its max_time_s scores at least, from any start."""
    fixed = scenario.spec.episode.max_time_s
    if fixed:
        return fixed
    sim = Simulator(scenario, seed=seed)  # the cluster before any event, as a start sees it
    _, rates = best_rates(scenario, seed, [_piece(sim, scenario.spec, 0.0, 0.0)])
    return 3.0 * scenario.spec.episode.samples / float(rates.max()) + 600


def _hull_slopes(rates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Slopes (extra workers per extra sample/s) along the lower convex hull of the points
    (0, 0) (stopped) and (rate, N) of one piece: the prices at which its best choice changes."""
    points = sorted({(0.0, 0.0), *((float(r), float(n)) for r, n in zip(rates, counts,
                                                                         strict=True) if r > 0)})
    hull: list[tuple[float, float]] = []
    for point in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(hull)
              if b[0] > a[0]]
    return np.array([x for x in slopes if x > 0])


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def score_lower_bound(scenario: LoadedScenario, seed: int) -> float:
    """The lower bound on the score of any policy for this scenario and seed."""
    spec = scenario.spec
    pieces = node_pieces(scenario, seed)
    counts, rates = best_rates(scenario, seed, pieces)
    lam = spec.objective.cost_per_worker_second
    work = float(spec.episode.samples)
    # The earliest finish: all the best rates, back to back.
    done, earliest = 0.0, math.inf
    for piece, best in zip(pieces, rates.max(axis=1), strict=True):
        span = piece.end - piece.start
        if best > 0 and done + best * span >= work:
            earliest = piece.start + (work - done) / best
            break
        done += best * span
    worker_seconds = WorkerSecondsBound(pieces, counts, rates, work)
    best_score = _least_truncated_score(scenario, seed)
    t = earliest
    while t < best_score:  # a job ending after the best bound so far cannot go below it
        nxt = t * DEADLINE_STEP
        best_score = min(best_score, t + lam * worker_seconds(nxt))
        t = nxt
    return best_score
