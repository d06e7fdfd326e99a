"""GoodputGreedy: a Pollux-like policy that fits the step-time model online and scales greedily.

Every interval it adds the workers' measured step times to a small data set keyed by
(local batch, workers, nodes crossed, node speed), refits the Pollux step-time model when the data
set gained a new configuration, and compares the current allocation with its neighbours (one
partner +1 or -1 worker). The objective per sample is (1 + lambda * workers) * step_time / batch
(seconds plus lambda-weighted worker-seconds per sample, docs/agent.md); it moves when the
predicted saving over the remaining samples outweighs the rescale stall several times over.
Like Pollux, parameters it has no data for are pinned to optimistic priors, so it explores by
scaling up and learns from what it sees. It also replaces a worker slower than `straggler_ratio`
times the median of its partner's other workers and rebalances partners whose workers' step
times are uneven. Where one node could run the whole job (it matches every partner's placement
and has the CPUs; not the autoscaler's stand-in node, nor one where a worker straggles), it
weighs that packed placement too (in-node sync) and, when it pays, moves the job's workers there
one Replace at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from raysys.agent.actions import rebalance_by_throughput
from raysys.agent.policies import Policy, register_policy
from raysys.agent.profile_fit import StepTimeModel
from raysys.control.autoscale import VIRTUAL_NODE_PREFIX
from raysys.control.decisions import NOOP, Decision, Replace, Scale
from raysys.control.snapshot import NodeView, Snapshot, matches

_MIN = 1e-6
# After a rebalance, the wait before trusting step times again. A rebalance stalls nothing, so
# it needs only fresh measurements (the next interval in the simulator, a few chunks live), not
# settle_s. Proportional shares reach equal step times only by repetition when a step has a fixed
# cost, so this is how soon a rebalance can be corrected (measured live: a 3x straggler's share
# went 0.50 -> 0.34 -> 0.28 of its partner's rows, settle_s = 20 s apart; equal times needed
# less).
REBALANCE_SETTLE_S = 5.0
# Until a job has run on one node, its in-node sync is predicted this many times faster than its
# measured cross-node sync: the ratio in all three Pollux traces (alpha_n / alpha_r of the
# shipped profiles: 4.2 for cifar10, 4.6 for imagenet, 5.0 for bert). It is what lets goodput
# see that packing a spread, communication-bound job onto one node pays (bench/agent_bound.py
# found that move worth 44% of the score on bert_comm_bound).
LOCAL_SYNC_SPEEDUP = 4.0


@dataclass
class _Point:
    local_batch: float
    workers: int
    nodes: int
    speed: float
    log_time_sum: float = 0.0
    count: int = 0


class OnlineStepTimeFit:
    """Least-squares fit of StepTimeModel to per-worker step times, with Pollux's priors."""

    def __init__(self, growth: float = 0.0) -> None:
        # Refit when a new (workers, nodes) configuration was seen, or when the points grew by
        # more than `growth` since the last fit (0: at every new point). Rebalances make a new
        # point per local batch: hundreds per episode, at ~50 ms per refit.
        self.growth = growth
        self.points: dict[tuple, _Point] = {}
        self.model: StepTimeModel | None = None
        self._fitted_keys = 0
        self._configs: set[tuple[int, int]] = set()  # (workers, nodes) in the last fit
        self._last_x: np.ndarray | None = None  # warm start: each refit adds only a few points

    def observe(
        self, local_batch: int, workers: int, nodes: int, speed: float, time: float
    ) -> None:
        key = (local_batch, workers, nodes, round(speed, 2))
        point = self.points.get(key)
        if point is None:
            point = self.points[key] = _Point(local_batch, workers, nodes, speed)
        point.log_time_sum += math.log(time)
        point.count += 1

    def refit_if_new(self) -> StepTimeModel | None:
        n = len(self.points)
        if n == self._fitted_keys:
            return self.model
        configs = {(p.workers, p.nodes) for p in self.points.values()}
        if n > self._fitted_keys * (1 + self.growth) or not configs <= self._configs:
            self.model = self._fit()
            self._fitted_keys = n
            self._configs = configs
        return self.model

    def _fit(self) -> StepTimeModel:
        from scipy.optimize import least_squares

        pts = list(self.points.values())
        batch = np.array([p.local_batch for p in pts], dtype=float)
        workers = np.array([p.workers for p in pts], dtype=float)
        nodes = np.array([p.nodes for p in pts], dtype=float)
        speed = np.array([p.speed for p in pts])
        target = np.array([p.log_time_sum / p.count for p in pts])
        weight = np.sqrt([p.count for p in pts])
        # What the data can tell apart decides which parameters are free (as in Pollux): one
        # local batch cannot separate a from b; no run on one node (or across nodes) cannot
        # reveal that sync time; never more than 2 workers cannot reveal retrogression.
        one_batch = len(np.unique(batch)) == 1
        seen_local = bool(np.any((workers > 1) & (nodes == 1)))
        seen_cross = bool(np.any(nodes > 1))
        seen_many = bool(np.any(workers > 2))
        typical = float(np.exp(np.median(target)))

        def build(x: np.ndarray) -> StepTimeModel:
            a, b, c_r, d_r, c_n, d_n, g = np.exp(x)
            if one_batch:
                a = b * batch[0]  # Pollux: half the compute is fixed cost
            if not seen_local:
                c_r, d_r = c_n / 1.1, d_n / 1.1  # tied for the fit; see the return below
            if not seen_cross:
                c_n, d_n = c_r * 1.1, d_r * 1.1
            if not seen_many:
                d_r = d_n = _MIN
            return StepTimeModel(a, b, c_r, d_r, c_n, d_n, 1.0 + g)

        def residuals(x: np.ndarray) -> np.ndarray:
            m = build(x)
            compute = (m.alpha_c + m.beta_c * batch) / speed
            extra = np.maximum(workers - 2, 0)
            sync = np.where(nodes > 1, m.alpha_n + m.beta_n * extra, m.alpha_r + m.beta_r * extra)
            sync = np.where(workers > 1, sync, 0.0)
            g = m.gamma
            pred = np.log((compute**g + sync**g) ** (1 / g))
            # Weak priors: gamma near 1 and little retrogression keep predictions optimistic.
            prior = [0.03 * (g - 1), 0.1 * m.beta_r / m.alpha_r, 0.1 * m.beta_n / m.alpha_n]
            return np.concatenate([weight * (pred - target), prior])

        bounds = (np.full(7, np.log(_MIN)), np.array([np.log(1e4)] * 6 + [np.log(9.0)]))
        start = self._last_x
        if start is None:
            start = np.log(
                [
                    typical / 4,
                    typical / (2 * max(batch.mean(), 1)),
                    typical / 4,
                    typical / 100,
                    typical / 4,
                    typical / 100,
                    0.2,
                ]
            )
        start = np.clip(start, bounds[0] + 1e-6, bounds[1] - 1e-6)
        result = least_squares(
            residuals, start, bounds=bounds, method="trf", max_nfev=60, ftol=1e-6, xtol=1e-6
        )
        self._last_x = result.x
        model = build(result.x)
        if not seen_local:
            # Predictions of a packed placement take the traces' in-node speed-up. The fit
            # itself keeps the tie above: its prior term on beta_r / alpha_r stays what it was,
            # so jobs that can never be packed fit exactly as before.
            model = dataclasses.replace(model, alpha_r=model.alpha_n / LOCAL_SYNC_SPEEDUP,
                                        beta_r=model.beta_n / LOCAL_SYNC_SPEEDUP)
        return model


@register_policy("goodput")
class GoodputGreedyPolicy(Policy):
    name = "goodput"

    def __init__(
        self,
        cost_per_worker_second: float = 0.0,
        straggler_ratio: float = 1.5,
        imbalance_ratio: float = 1.15,
        min_gain: float = 0.03,
        settle_s: float = 20.0,
        rescale_cost_s: float = 2.0,
        refit_after_deciding: bool = False,
        refit_growth: float = 0.0,
    ) -> None:
        super().__init__(cost_per_worker_second)
        self.straggler_ratio = straggler_ratio
        self.imbalance_ratio = imbalance_ratio
        self.min_gain = min_gain  # relative improvement needed before moving
        self.settle_s = settle_s  # measurements just after a rescale include its stall
        self.rescale_cost_s = rescale_cost_s  # assumed stall of a scale, until one is observed
        # True: decide with the model fitted so far and refit in learn(), off the decision path
        # (a refit costs tens of ms, docs/benchmarks.md section 4); decisions lag one interval.
        self.refit_after_deciding = refit_after_deciding
        self.refit_growth = refit_growth
        self.reset()

    def reset(self) -> None:
        self.fit = OnlineStepTimeFit(growth=self.refit_growth)
        self._looked_at_step: int | None = None

    def decide(self, snapshot: Snapshot) -> Decision:
        last = snapshot.last_rescale_time_s
        rebalanced = snapshot.last_rescale_kind == "rebalance"
        settle = min(self.settle_s, REBALANCE_SETTLE_S) if rebalanced else self.settle_s
        if last is not None and snapshot.time_s - last < settle:
            return NOOP
        if self._looked_at_step is not None and snapshot.step <= self._looked_at_step:
            # No step since the last look (live: a collective hung on a lost node): the step
            # times are the same stale ones. Fitting them again would weigh them twice, paired
            # with the local batches of a rebalance that has not run yet, and they would ask
            # for that same rebalance again. (The simulator always makes progress.)
            return NOOP
        self._looked_at_step = snapshot.step
        if snapshot.last_rescale_cost_s > 0 and not rebalanced:
            self.rescale_cost_s = snapshot.last_rescale_cost_s  # a stall, not a rebalance's wait
        self._observe(snapshot)
        fixed = self._fix_stragglers(snapshot)
        if fixed is not NOOP:
            return fixed
        model = self.fit.model if self.refit_after_deciding else self.fit.refit_if_new()
        return self._best_scale(snapshot, model) if model is not None else NOOP

    def learn(self) -> None:
        if self.refit_after_deciding:
            self.fit.refit_if_new()

    def _observe(self, snapshot: Snapshot) -> None:
        live = [w for w in snapshot.workers if w.alive and w.step_time_s > 0]
        hosts = len({w.node for w in live})
        for w in live:
            median = snapshot.median_step_time(w.partner, exclude=w.id)
            if median > 0 and w.step_time_s > 1.3 * median:
                continue  # a straggler says nothing about the job's model
            node = snapshot.node(w.node)
            speed = node.speed if node is not None else 1.0
            self.fit.observe(w.local_batch, len(live), hosts, speed, w.step_time_s)

    def _fix_stragglers(self, snapshot: Snapshot) -> Decision:
        for partner in snapshot.partners:
            slowest = snapshot.slowest_worker(partner.name)
            if slowest is None or partner.workers < 2:
                continue
            median = snapshot.median_step_time(partner.name, exclude=slowest.id)
            if median <= 0:
                continue
            if slowest.step_time_s > self.straggler_ratio * median:
                if snapshot.worker_slots_for(partner.name, exclude_node=slowest.node) > 0:
                    return Replace(slowest.id)
                return rebalance_by_throughput(snapshot, partner.name)
            # Uneven step times, not uneven speeds: the step waits for the slowest worker, and
            # where a step has a fixed cost, equal times need unequal speeds.
            times = [w.step_time_s for w in snapshot.workers_of(partner.name)
                     if w.step_time_s > 0]
            if times and max(times) > self.imbalance_ratio * min(times):
                return rebalance_by_throughput(snapshot, partner.name)
        return NOOP

    @staticmethod
    def _slowness(snapshot: Snapshot, model: StepTimeModel, hosts: int) -> dict[str, float]:
        """How much slower than the model each partner's workers run now (node speed, lingering
        slowdowns), measured at the current allocation and carried over to the options."""
        total = snapshot.total_workers
        out = {}
        for partner in snapshot.partners:
            ratios = [
                w.step_time_s / model.step_time(w.local_batch, total, hosts)
                for w in snapshot.workers_of(partner.name)
                if w.step_time_s > 0
            ]
            out[partner.name] = float(np.median(ratios)) if ratios else 1.0
        return out

    @staticmethod
    def _predict_step(
        snapshot: Snapshot,
        model: StepTimeModel,
        slowness: dict[str, float],
        counts: dict[str, int],
        hosts: int,
    ) -> float:
        sync = model.sync_time(sum(counts.values()), hosts)
        step = 0.0
        for partner in snapshot.partners:
            batch = partner.batch_share / counts[partner.name]
            compute = model.compute_time(batch) * slowness[partner.name]
            step = max(step, model.combine(compute, sync))
        return step

    def _best_scale(self, snapshot: Snapshot, model: StepTimeModel) -> Decision:
        counts = {p.name: p.workers for p in snapshot.partners}
        if any(c == 0 for c in counts.values()):
            return NOOP  # the controller is restoring a partner; measurements are incomplete
        hosts = len({w.node for w in snapshot.workers if w.alive})
        slowness = self._slowness(snapshot, model, hosts)
        current = self._per_sample(snapshot, model, slowness, counts, hosts)
        target, best = self._target_allocation(snapshot, model, slowness, hosts)
        remaining = snapshot.samples_total - snapshot.samples_done
        stall = self.rescale_cost_s * (1.0 + self.cost_per_worker_second * sum(counts.values()))
        if target == counts:
            return self._consolidate(snapshot, model, slowness, counts, hosts, current, stall)
        if best > current * (1 - self.min_gain):
            return NOOP
        if (current - best) * remaining < 3 * stall:
            return NOOP  # not worth the stall this close to the end
        # One partner per decision, the one furthest from its target (growth first).
        name = max(counts, key=lambda n: (target[n] - counts[n], -counts[n], n))
        if target[name] <= counts[name]:
            name = min(counts, key=lambda n: (target[n] - counts[n], n))
        return Scale(name, target[name] - counts[name])

    def _slow_nodes(self, snapshot: Snapshot) -> frozenset[str]:
        """Nodes of workers slower than `straggler_ratio` times their partner's other workers:
        never a place to pack the job onto (the straggler rule would move a worker off again)."""
        slow = set()
        for w in snapshot.workers:
            median = snapshot.median_step_time(w.partner, exclude=w.id) if w.alive else 0.0
            if median > 0 and w.step_time_s > self.straggler_ratio * median:
                slow.add(w.node)
        return frozenset(slow)

    def _consolidate(
        self,
        snapshot: Snapshot,
        model: StepTimeModel,
        slowness: dict[str, float],
        counts: dict[str, int],
        hosts: int,
        current: float,
        stall: float,
    ) -> Decision:
        """At the target worker counts but spread over nodes: if one node could run them all and
        in-node sync pays for the moves, move one worker there (the next decision moves the
        next). Workers leave the nodes that hold fewest of the job first."""
        if hosts < 2:
            return NOOP
        node = pack_node(snapshot, counts, self._slow_nodes(snapshot))
        if node is None:
            return NOOP
        live = [w for w in snapshot.workers if w.alive]
        per_node = {n: sum(w.node == n for w in live) for n in {w.node for w in live}}
        movers = sorted((w for w in live if w.node != node.id),
                        key=lambda w: (per_node[w.node], w.id))
        packed = self._per_sample(snapshot, model, slowness, counts, 1)
        remaining = snapshot.samples_total - snapshot.samples_done
        if packed > current * (1 - self.min_gain):
            return NOOP
        if (current - packed) * remaining < 3 * stall * len(movers):
            return NOOP  # not worth the moves this close to the end
        return Replace(movers[0].id, node=node.id)

    def _per_sample(
        self,
        snapshot: Snapshot,
        model: StepTimeModel,
        slowness: dict[str, float],
        counts: dict[str, int],
        hosts: int,
    ) -> float:
        """Seconds plus lambda-weighted worker-seconds per sample for an allocation."""
        step = self._predict_step(snapshot, model, slowness, counts, hosts)
        lam = self.cost_per_worker_second
        return (1.0 + lam * sum(counts.values())) * step / snapshot.global_batch

    def _target_allocation(
        self, snapshot: Snapshot, model: StepTimeModel, slowness: dict[str, float], hosts: int
    ) -> tuple[dict[str, int], float]:
        """Best allocation by water-filling: from every partner at its minimum, keep adding a
        worker to the partner whose compute sets the pace; the best point on that path wins.
        (A step is the max over partners, so growing any other partner cannot help.)"""
        room = {
            p.name: min(p.max_workers, p.workers + snapshot.worker_slots_for(p.name))
            for p in snapshot.partners
        }
        counts = {p.name: min(p.min_workers, room[p.name]) for p in snapshot.partners}
        if any(c <= 0 for c in counts.values()):
            return {p.name: p.workers for p in snapshot.partners}, math.inf

        avoid = self._slow_nodes(snapshot)

        def option_hosts(option: dict[str, int]) -> int:
            # Sync only distinguishes "one node" from "several". An allocation one node could
            # run alone is judged packed there (_consolidate gets it there); otherwise, assume
            # growth past the free CPUs of a single shared host leaves it.
            if pack_node(snapshot, option, avoid) is not None:
                return 1
            if hosts > 1 or sum(option.values()) <= snapshot.total_workers:
                return hosts
            return hosts if self._fits_on_host(snapshot, snapshot.partners[0].name) else 2

        best_counts, best = (
            dict(counts),
            self._per_sample(snapshot, model, slowness, counts, option_hosts(counts)),
        )
        while True:
            pacing = max(
                counts,
                key=lambda n: (
                    model.compute_time(snapshot.partner(n).batch_share / counts[n]) * slowness[n],
                    n,
                ),
            )
            if counts[pacing] >= room[pacing]:
                break
            counts[pacing] += 1
            value = self._per_sample(snapshot, model, slowness, counts, option_hosts(counts))
            if value < best:
                best_counts, best = dict(counts), value
        return best_counts, best

    @staticmethod
    def _fits_on_host(snapshot: Snapshot, partner: str) -> bool:
        """Would a new worker land on a node already running one of the job's workers?"""
        hosts = {w.node for w in snapshot.workers if w.alive}
        need = snapshot.cpus_per_worker.get(partner, 1.0)
        return any(n.id in hosts and n.free_cpus >= need for n in snapshot.nodes_for(partner))


def pack_node(snapshot: Snapshot, counts: dict[str, int],
              avoid: frozenset[str] = frozenset()) -> NodeView | None:
    """A node that could run the whole job at `counts` workers per partner alone: a real node
    (not the autoscaler's stand-in for capacity to come), not in `avoid`, matching every
    partner's placement, with the CPUs (counting those the job's workers there already use).
    Prefers the node already running most of the job's workers, then the fastest; None if no
    node can."""
    live = [w for w in snapshot.workers if w.alive]
    need = sum(n * snapshot.cpus_per_worker.get(p, 1.0) for p, n in counts.items())
    best, best_key = None, None
    for node in snapshot.nodes:
        if node.id in avoid or node.id.startswith(VIRTUAL_NODE_PREFIX):
            continue
        if not all(matches(node.labels, snapshot.placement.get(p.name, {}))
                   for p in snapshot.partners):
            continue
        ours = [w for w in live if w.node == node.id]
        room = max(node.free_cpus, 0.0) + sum(
            snapshot.cpus_per_worker.get(w.partner, 1.0) for w in ours)
        if room + _MIN < need:
            continue
        key = (len(ours), node.speed, node.id)
        if best_key is None or key > best_key:
            best, best_key = node, key
    return best
