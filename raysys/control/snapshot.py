"""One instant of a training job, as a policy sees it (ARCHITECTURE.md invariant 4).

The live AgentActor builds a Snapshot from Ray's metrics and worker timings; the simulator builds
the same Snapshot from its model. Plain dataclasses with no Ray or torch imports, so policies,
guardrails and featurize() run identically in both places. Policies treat a Snapshot as read-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-9  # CPU amounts are floats; a worker "fits" when free >= need up to rounding


@dataclass
class WorkerView:
    id: str  # "<partner>/<index>", e.g. "alpha/0"
    partner: str
    node: str
    step_time_s: float  # recent mean of this worker's own step time (0 if not yet measured)
    local_batch: int  # samples this worker processes per step
    alive: bool


@dataclass
class PartnerView:
    name: str
    workers: int  # live workers
    min_workers: int
    max_workers: int
    batch_share: int  # samples per step that this partner's workers process together


@dataclass
class NodeView:
    id: str
    labels: dict[str, str]
    total_cpus: float
    free_cpus: float
    speed: float = 1.0  # relative compute speed (simulator only; live nodes report 1.0)
    # Live only (scraped from the node's /metrics); the simulator leaves them at 0.
    cpu_utilization: float = 0.0  # 0..1
    memory_used_fraction: float = 0.0  # 0..1


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """A node matches a placement selector when it carries every label with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


@dataclass
class Snapshot:
    time_s: float
    step: int
    samples_done: int
    samples_total: int
    workers: list[WorkerView]
    partners: list[PartnerView]
    nodes: list[NodeView]
    cpus_per_worker: dict[str, float]  # by partner
    placement: dict[str, dict[str, str]]  # partner -> label selector its workers must run on
    last_rescale_time_s: float | None
    last_rescale_cost_s: float
    recent_failures: int
    actions_last_minute: int
    step_time_s: float  # recent mean global step time (the slowest worker's)
    throughput: float  # samples/s, recent
    # What the last change was: scale_up, scale_down, replace, rebalance or recovery (several
    # applied together are joined by '+'); '' before the first. A rebalance stalls nothing, so
    # policies need not wait for its stall to leave the measurements, nor learn its cost as a
    # rescale's.
    last_rescale_kind: str = ""

    # -- lookups -------------------------------------------------------------------------------
    def partner(self, name: str) -> PartnerView | None:
        for p in self.partners:
            if p.name == name:
                return p
        return None

    def worker(self, worker_id: str) -> WorkerView | None:
        for w in self.workers:
            if w.id == worker_id:
                return w
        return None

    def node(self, node_id: str) -> NodeView | None:
        for n in self.nodes:
            if n.id == node_id:
                return n
        return None

    def workers_of(self, partner: str, alive_only: bool = True) -> list[WorkerView]:
        return [w for w in self.workers if w.partner == partner and (w.alive or not alive_only)]

    def nodes_for(self, partner: str) -> list[NodeView]:
        """Nodes the partner's workers may run on (residency: only those matching its selector)."""
        selector = self.placement.get(partner, {})
        return [n for n in self.nodes if matches(n.labels, selector)]

    # -- capacity ------------------------------------------------------------------------------
    def free_cpus_for(self, partner: str) -> float:
        """Free CPUs summed over nodes matching the partner's placement."""
        return sum(max(n.free_cpus, 0.0) for n in self.nodes_for(partner))

    def worker_slots_for(self, partner: str, exclude_node: str | None = None) -> int:
        """How many more workers of `partner` fit, node by node (a worker cannot span nodes)."""
        need = self.cpus_per_worker.get(partner, 1.0)
        if need <= 0:
            return 10**6
        return sum(
            int(math.floor(max(n.free_cpus, 0.0) / need + _EPS))
            for n in self.nodes_for(partner)
            if n.id != exclude_node
        )

    # -- progress ------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return sum(p.batch_share for p in self.partners)

    @property
    def progress(self) -> float:
        return self.samples_done / self.samples_total if self.samples_total > 0 else 1.0

    @property
    def total_workers(self) -> int:
        return sum(p.workers for p in self.partners)

    def median_step_time(self, partner: str | None = None, exclude: str | None = None) -> float:
        """Median own step time of live measured workers (of one partner, or of all), leaving
        out worker `exclude`; 0 if none. Whether a worker straggles is asked against the median
        of its peers, without it: in a partner of two, a median with the straggler in it would
        call it slow only if it were more than 3 times slower than its peer at ratio 1.5."""
        times = sorted(
            w.step_time_s
            for w in self.workers
            if w.alive and w.step_time_s > 0 and (partner is None or w.partner == partner)
            and w.id != exclude
        )
        if not times:
            return 0.0
        mid = len(times) // 2
        return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])

    def slowest_worker(self, partner: str) -> WorkerView | None:
        measured = [w for w in self.workers_of(partner) if w.step_time_s > 0]
        return max(measured, key=lambda w: (w.step_time_s, w.id)) if measured else None
