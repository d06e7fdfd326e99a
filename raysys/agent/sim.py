"""Cluster simulator: the physics of an elastic synchronous data-parallel job, in closed form.

Between two events the job's configuration is fixed, so its step time is a constant and progress
over any stretch of time is one division: the simulator jumps from event to event (and to the
agent's decision points) instead of stepping through training steps. A step waits for its slowest
worker; each worker's own time is the Pollux model at its local batch, divided by its node's speed
and multiplied by straggler factors and CPU oversubscription (docs/agent.md).

The simulator produces the same Snapshot the live system does and executes the same Decisions, so
a policy cannot tell which of the two it steers (ARCHITECTURE.md invariant 4).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque

import numpy as np

from raysys.agent.scenarios import LoadedScenario, NodeSpec
from raysys.agent.sim_effects import EventEffects
from raysys.agent.sim_events import Variation, build_timeline
from raysys.agent.sim_state import SimNode, SimPartner, SimWorker, split_batch
from raysys.control.decisions import Decision, Noop, Rebalance, Replace, Scale, kind
from raysys.control.snapshot import NodeView, PartnerView, Snapshot, WorkerView, matches

WINDOW_S = 60.0  # "recent" failures and actions are counted over the last minute


class Simulator(EventEffects):
    def __init__(
        self,
        scenario: LoadedScenario,
        seed: int = 0,
        variation: Variation | None = None,
        initial_workers: dict[str, int] | None = None,
    ) -> None:
        spec = scenario.spec
        variation = variation or Variation()
        events_rng = random.Random(seed)
        # Observation noise has its own stream so that how often a policy looks cannot shift events.
        self._noise = np.random.default_rng([seed, 1])
        self._noise_sigma = spec.episode.observation_noise
        self._noise_pool: list[float] = []
        self.scenario = scenario
        self.seed = seed
        self.model = scenario.model.scaled(
            math.exp(events_rng.gauss(0.0, variation.compute_sigma)),
            math.exp(events_rng.gauss(0.0, variation.sync_sigma)),
        )
        self.samples_total = spec.episode.samples
        self.interval_s = spec.episode.interval_s
        self.cost_per_worker_second = spec.objective.cost_per_worker_second
        self.costs = spec.rescale_costs
        self.global_batch = spec.global_batch

        self.nodes: dict[str, SimNode] = {}
        for node in spec.initial_nodes():
            speed = node.speed * math.exp(events_rng.gauss(0.0, variation.speed_sigma))
            self._add_node(node, speed)
        self.partners = {p.name: SimPartner(p) for p in spec.partners}
        self.workers: dict[str, SimWorker] = {}
        self._cpus_per_worker = {p.name: p.cpus_per_worker for p in spec.partners}
        self._placement = {p.name: dict(p.placement) for p in spec.partners}

        for partner in self.partners.values():
            count = (initial_workers or {}).get(partner.name, partner.spec.workers)
            for _ in range(count):
                node = self._choose_node(partner)
                if node is None:
                    raise ValueError(f"{spec.name}: {count} workers of {partner.name} do not fit")
                self._add_worker(partner, node, 1.0)

        # Progress and accounting.
        self.time_s = 0.0
        self.samples_done = 0.0
        self.steps_done = 0.0
        self.worker_seconds = 0.0
        self.finished = False
        self.truncated = False
        self.unfinished_penalty = 0.0
        self._stall_left = 0.0
        self.last_rescale_time_s: float | None = None
        self.last_rescale_cost_s = 0.0
        self.last_rescale_kind = ""
        self._action_times: deque[float] = deque()
        self._failure_times: deque[float] = deque()
        self._dead_unreported: list[WorkerView] = []
        self._dirty = True
        self._step_time = math.inf
        self._recompute()
        self.initial_workers = len(self.workers)
        self.initial_rate = self.global_batch / self._step_time
        self.max_time_s = (
            spec.episode.max_time_s or 3.0 * self.samples_total / self.initial_rate + 600
        )
        self._events = build_timeline(spec, events_rng, self.max_time_s, variation)
        heapq.heapify(self._events)
        self._next_seq = len(self._events)
        self._last_view_time = 0.0
        self._last_view_samples = 0.0

    # ------------------------------------------------------------------------------ progress --
    @property
    def done(self) -> bool:
        return self.finished or self.truncated

    @property
    def score(self) -> float:
        """Completion time + lambda * worker-seconds (+ the charge for an unfinished job)."""
        return (
            self.time_s
            + self.cost_per_worker_second * self.worker_seconds
            + (self.unfinished_penalty)
        )

    @property
    def pending_events(self) -> int:
        return len(self._events)

    @property
    def step_time_s(self) -> float:
        if self._dirty:
            self._recompute()
        return self._step_time

    def advance(self, seconds: float) -> None:
        """Run the job for `seconds` of simulated time (or until it finishes or times out)."""
        end = min(self.time_s + seconds, self.max_time_s)
        events = self._events
        while not self.finished and self.time_s < end:
            segment_end = min(end, events[0].time) if events else end
            if segment_end > self.time_s:
                self._run_segment(segment_end)
            while events and events[0].time <= self.time_s and not self.finished:
                self._fire(heapq.heappop(events))
        if not self.finished and self.time_s >= self.max_time_s:
            self._truncate()

    def run_to_end(self) -> None:
        """Advance without decisions until the job finishes (the Static policy's whole episode)."""
        self.advance(math.inf)

    def _run_segment(self, until: float) -> None:
        if self._dirty:
            self._recompute()
        span = until - self.time_s
        stall = min(self._stall_left, span)
        self._stall_left -= stall
        productive = span - stall
        held = len(self.workers)
        if productive > 0 and self._step_time < math.inf:
            rate = self.global_batch / self._step_time
            needed = (self.samples_total - self.samples_done) / rate
            if needed <= productive:
                span = stall + needed
                self.samples_done = float(self.samples_total)
                self.steps_done += needed / self._step_time
                self.finished = True
            else:
                self.samples_done += rate * productive
                self.steps_done += productive / self._step_time
        self.worker_seconds += held * span
        self.time_s += span

    def _truncate(self) -> None:
        # The unfinished rest is charged as if it then ran at the initial allocation's nominal
        # speed, so cutting an episode short never looks cheaper than finishing it.
        remaining_s = (self.samples_total - self.samples_done) / self.initial_rate
        lam = self.cost_per_worker_second
        self.unfinished_penalty = remaining_s * (1.0 + lam * self.initial_workers)
        self.truncated = True

    # ------------------------------------------------------------------------------ physics --
    def _recompute(self) -> None:
        """Local batches, each worker's own step time and the job's step time (the slowest)."""
        model = self.model
        hosts = {w.node for w in self.workers.values()}
        sync = model.sync_time(len(self.workers), len(hosts))
        blocked = False
        for partner in self.partners.values():
            members = [self.workers[w] for w in partner.worker_ids]
            if not members:
                blocked = True  # residency: nobody else may process this partner's samples
                continue
            batches = split_batch(partner.spec.batch_share, [w.share for w in members])
            for worker, batch in zip(members, batches, strict=True):
                node = self.nodes[worker.node]
                compute = model.compute_time(batch) * worker.slowdown * node.slowdown_factor()
                worker.local_batch = batch
                worker.own_time = model.combine(compute / node.speed, sync)
        slowest = max((w.own_time for w in self.workers.values()), default=math.inf)
        self._step_time = math.inf if blocked else slowest
        self._dirty = False

    # -------------------------------------------------------------------------- placement --
    def _add_node(self, spec: NodeSpec, speed: float) -> None:
        self.nodes[spec.id] = SimNode(spec.id, dict(spec.labels), spec.cpus, speed)

    def _choose_node(self, partner: SimPartner, exclude: str | None = None) -> SimNode | None:
        """Where the controller would start a worker: fastest matching node with a free slot,
        preferring one that already runs this partner (warm), then the emptiest.
        Stragglers are invisible to placement, as they are to Ray's scheduler."""
        need = partner.spec.cpus_per_worker
        best, best_key = None, None
        for node in self.nodes.values():
            if not node.alive or node.id == exclude or node.free_cpus() + 1e-9 < need:
                continue
            if not matches(node.labels, partner.spec.placement):
                continue
            key = (node.speed, node.id in partner.nodes_used(self.workers), node.free_cpus())
            if best_key is None or key > best_key:
                best, best_key = node, key
        return best

    def _add_worker(self, partner: SimPartner, node: SimNode, share: float) -> float:
        """Start a worker; returns its start-up stall (warm beside a sibling, else cold)."""
        warm = node.id in partner.nodes_used(self.workers)
        worker = SimWorker(partner.next_id(), partner.name, node.id, share)
        self.workers[worker.id] = worker
        partner.worker_ids.append(worker.id)
        node.used_cpus += partner.spec.cpus_per_worker
        self._dirty = True
        return self.costs.scale_up_warm if warm else self.costs.scale_up_cold

    def _remove_worker(self, worker: SimWorker) -> None:
        del self.workers[worker.id]
        partner = self.partners[worker.partner]
        partner.worker_ids.remove(worker.id)
        self.nodes[worker.node].used_cpus -= partner.spec.cpus_per_worker
        self._dirty = True

    def _mean_share(self, partner: SimPartner) -> float:
        shares = [self.workers[w].share for w in partner.worker_ids]
        return sum(shares) / len(shares) if shares else 1.0

    def _restore_minimums(self) -> None:
        """The controller (not the policy) restarts workers of a partner below its minimum."""
        stall = 0.0
        for partner in self.partners.values():
            while len(partner.worker_ids) < partner.spec.min_workers:
                node = self._choose_node(partner)
                if node is None:
                    break  # retried whenever capacity comes back
                stall = max(stall, self._add_worker(partner, node, self._mean_share(partner)))
        if stall > 0:
            self._stall_left += stall
            self.last_rescale_time_s, self.last_rescale_cost_s = self.time_s, stall
            self.last_rescale_kind = "recovery"

    # -------------------------------------------------------------------------- decisions --
    def apply(self, decision: Decision) -> bool:
        """Execute a (guardrail-filtered) decision; False when it changes nothing."""
        if isinstance(decision, Noop):
            return False
        if isinstance(decision, Scale):
            cost = self._scale(decision)
        elif isinstance(decision, Replace):
            cost = self._replace(decision)
        elif isinstance(decision, Rebalance):
            cost = self._rebalance(decision)
        else:
            cost = None
        if cost is None:
            return False
        self._stall_left += cost
        self.last_rescale_time_s, self.last_rescale_cost_s = self.time_s, cost
        self.last_rescale_kind = kind(decision)
        self._action_times.append(self.time_s)
        return True

    def _scale(self, decision: Scale) -> float | None:
        partner = self.partners.get(decision.partner)
        if partner is None:
            return None
        live = len(partner.worker_ids)
        if decision.delta > 0:
            stall = None
            share = self._mean_share(partner)
            for _ in range(min(decision.delta, partner.spec.max_workers - live)):
                node = self._choose_node(partner)
                if node is None:
                    break
                stall = max(stall or 0.0, self._add_worker(partner, node, share))
            return stall
        count = min(-decision.delta, live - partner.spec.min_workers)
        if count <= 0:
            return None
        if self._dirty:
            self._recompute()
        # The controller stops the slowest workers first (newest on ties).
        members = sorted(
            (self.workers[w] for w in partner.worker_ids),
            key=lambda w: (w.own_time, partner.worker_ids.index(w.id)),
        )
        for worker in members[-count:]:
            self._remove_worker(worker)
        return self.costs.scale_down

    def _replace(self, decision: Replace) -> float | None:
        old = self.workers.get(decision.worker)
        if old is None:
            return None
        partner = self.partners[old.partner]
        node = self.nodes.get(decision.node) if decision.node else None
        usable = (
            node is not None
            and node.alive
            and matches(node.labels, partner.spec.placement)
            and node.free_cpus() + 1e-9 >= partner.spec.cpus_per_worker
        )
        if not usable:
            node = self._choose_node(partner, exclude=old.node) or self._choose_node(partner)
        if node is None:
            return None
        self._add_worker(partner, node, old.share)
        self._remove_worker(old)
        return self.costs.replace

    def _rebalance(self, decision: Rebalance) -> float | None:
        partner = self.partners.get(decision.partner)
        if partner is None or len(partner.worker_ids) < 2:
            return None
        for worker_id in partner.worker_ids:
            share = decision.split.get(worker_id, 1.0)
            self.workers[worker_id].share = share if share > 0 and math.isfinite(share) else 1.0
        self._dirty = True
        return self.costs.rebalance

    # --------------------------------------------------------------------------- snapshot --
    def snapshot(self) -> Snapshot:
        """What a policy sees now; also marks the start of the next 'recent' measurement window."""
        if self._dirty:
            self._recompute()
        now = self.time_s
        for times in (self._action_times, self._failure_times):
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
        if len(self._noise_pool) <= len(self.workers):
            self._refill_noise()
        noise = self._noise_pool
        workers = [
            WorkerView(w.id, w.partner, w.node, w.own_time * noise.pop(), w.local_batch, True)
            for w in self.workers.values()
        ]
        if self._dead_unreported:
            workers.extend(self._dead_unreported)
            self._dead_unreported = []
        partners = [
            PartnerView(
                p.name,
                len(p.worker_ids),
                p.spec.min_workers,
                p.spec.max_workers,
                p.spec.batch_share,
            )
            for p in self.partners.values()
        ]
        nodes = [
            NodeView(n.id, n.labels, n.cpus, n.free_cpus(), n.speed)
            for n in self.nodes.values()
            if n.alive
        ]
        elapsed = now - self._last_view_time
        blocked = self._step_time == math.inf
        if elapsed > 0:
            throughput = (self.samples_done - self._last_view_samples) / elapsed
        else:
            throughput = 0.0 if blocked else self.global_batch / self._step_time
        self._last_view_time, self._last_view_samples = now, self.samples_done
        step_time = 0.0 if blocked else self._step_time * noise.pop()
        return Snapshot(
            time_s=now,
            step=int(self.steps_done),
            samples_done=int(self.samples_done),
            samples_total=self.samples_total,
            workers=workers,
            partners=partners,
            nodes=nodes,
            cpus_per_worker=self._cpus_per_worker,
            placement=self._placement,
            last_rescale_time_s=self.last_rescale_time_s,
            last_rescale_cost_s=self.last_rescale_cost_s,
            last_rescale_kind=self.last_rescale_kind,
            recent_failures=len(self._failure_times),
            actions_last_minute=len(self._action_times),
            step_time_s=step_time,
            throughput=throughput,
        )

    def _refill_noise(self) -> None:
        """Multiplicative lognormal timing noise, drawn in blocks (one numpy call per ~1000
        snapshots instead of one Python call per worker) and consumed from the end."""
        draws = (
            self._noise.lognormal(0.0, self._noise_sigma, 4096)
            if self._noise_sigma
            else (np.ones(4096))
        )
        self._noise_pool = draws.tolist()[::-1] + self._noise_pool
