"""Mutable state of the simulated cluster: nodes, partners, workers, and how a batch is split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raysys.agent.scenarios import PartnerSpec


@dataclass
class SimNode:
    id: str
    labels: dict[str, str]
    cpus: float
    speed: float
    alive: bool = True
    used_cpus: float = 0.0  # by our workers
    tenant_cpus: float = 0.0  # taken by other tenants (contention events)
    factors: dict[int, float] = field(default_factory=dict)  # active node stragglers by event

    def free_cpus(self) -> float:
        return max(self.cpus - self.used_cpus - self.tenant_cpus, 0.0)

    def slowdown_factor(self) -> float:
        """Straggler factors times CPU oversubscription (tenants + us beyond the node's CPUs)."""
        oversubscribed = max(1.0, (self.used_cpus + self.tenant_cpus) / self.cpus)
        return (math.prod(self.factors.values()) if self.factors else 1.0) * oversubscribed


@dataclass
class SimWorker:
    id: str
    partner: str
    node: str
    share: float  # relative share of its partner's batch (Rebalance sets it)
    factors: dict[int, float] = field(default_factory=dict)  # active worker stragglers by event
    local_batch: int = 0
    own_time: float = 0.0  # this worker's step time if it never waited for the others

    @property
    def slowdown(self) -> float:
        return math.prod(self.factors.values()) if self.factors else 1.0


class SimPartner:
    def __init__(self, spec: PartnerSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.worker_ids: list[str] = []
        self._next_index = 0

    def next_id(self) -> str:
        """Worker ids are never reused, so a replaced worker's id cannot be confused with its
        successor's (the live controller numbers workers the same way)."""
        worker_id = f"{self.name}/{self._next_index}"
        self._next_index += 1
        return worker_id

    def nodes_used(self, workers: dict[str, SimWorker]) -> set[str]:
        return {workers[w].node for w in self.worker_ids}


def split_batch(batch: int, shares: list[float]) -> list[int]:
    """Whole samples per worker in proportion to shares (largest remainder), each at least 1."""
    total = sum(shares)
    exact = [batch * s / total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: batch - sum(counts)]:
        counts[i] += 1
    for i, count in enumerate(counts):
        if count == 0:  # take one sample from the largest so that every worker does work
            largest = max(range(len(counts)), key=lambda j: counts[j])
            counts[largest] -= 1
            counts[i] = 1
    return counts
