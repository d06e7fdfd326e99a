"""What the RL policy remembers between Snapshots: the measured effect of its own rescales.

featurize() describes one instant in relative terms (a slow job and a fast one look alike),
which is what lets one policy serve jobs of any speed, but it also hides what a policy needs
to size a job: whether the last worker added paid for itself. With throughput normalised away,
a memoryless policy cannot tell a compute-bound job (add workers) from a sync-bound one (remove
them) from the same snapshot; GoodputGreedy answers it with an online model fitted over time.
History gives the network the same evidence, as ratios (so speed-independent as featurize):

    cost_vs_best     best cost per sample seen / cost per sample now (1: as good as ever)
    speed_vs_start   throughput now / the first measured throughput
    last_effect      cost per sample before the last change of allocation / after it
                     (> 1: the change paid), 1 until measured
    effect_known     1 once the allocation after the last change has been measured
    since_change     time since the last change / 300 s (saturates)
    change_<k>_up, change_<k>_down   one-hot: which partner slot changed last and which way
    workers_vs_best  workers now / workers when the best cost was seen

Cost per sample = (1 + lambda * workers) / throughput: the objective's own rate (docs/agent.md).
A measurement counts only once `settle_s` has passed since the last rescale, so a stall does
not pass for a slow allocation. The same object runs in training (HistoryEnv) and in RLPolicy;
it only reads Snapshots, so it is the same live and simulated (invariant 4).
"""

from __future__ import annotations

import numpy as np

from raysys.agent.featurize import FEATURE_MAX
from raysys.control.snapshot import Snapshot

SETTLE_S = 20.0  # as GoodputGreedy: the interval after a rescale still contains its stall
CHANGE_MEMORY_S = 300.0


def history_size(max_partners: int) -> int:
    return 6 + 2 * max_partners


class History:
    def __init__(self, max_partners: int = 4, settle_s: float = SETTLE_S) -> None:
        self.max_partners = max_partners
        self.settle_s = settle_s
        self.size = history_size(max_partners)
        self.reset()

    def reset(self) -> None:
        self._counts: tuple[int, ...] | None = None
        self._first_rate: float | None = None
        self._rate = 0.0
        self._cost: float | None = None  # latest settled cost per sample
        self._best: tuple[float, int] | None = None  # (cost, workers)
        self._change_time: float | None = None
        self._change_slot: tuple[int, int] | None = None  # (slot, +1/-1)
        self._cost_before: float | None = None
        self._effect: float | None = None

    def update(self, snapshot: Snapshot, cost_per_worker_second: float) -> np.ndarray:
        """Take in the next Snapshot (every interval, in order) and return the features."""
        counts = tuple(p.workers for p in snapshot.partners)
        if self._counts is not None and counts != self._counts:
            self._on_change(snapshot, counts)
        self._counts = counts
        last = snapshot.last_rescale_time_s
        settled = last is None or snapshot.time_s - last >= self.settle_s
        workers = snapshot.total_workers
        if settled and snapshot.throughput > 0 and workers > 0:
            cost = (1.0 + cost_per_worker_second * workers) / snapshot.throughput
            self._rate = snapshot.throughput
            if self._first_rate is None:
                self._first_rate = snapshot.throughput
            self._cost = cost
            if self._best is None or cost < self._best[0]:
                self._best = (cost, workers)
            if self._cost_before is not None:
                self._effect = self._cost_before / cost
        return self._features(snapshot)

    def _on_change(self, snapshot: Snapshot, counts: tuple[int, ...]) -> None:
        deltas = [new - old for new, old in zip(counts, self._counts, strict=False)]
        slot = max(range(len(deltas)), key=lambda k: (abs(deltas[k]), -k))
        self._change_slot = (slot, 1 if deltas[slot] > 0 else -1) if deltas[slot] else None
        self._change_time = snapshot.time_s
        self._cost_before = self._cost  # the last settled measurement before the change
        self._effect = None

    def _features(self, snapshot: Snapshot) -> np.ndarray:
        out = np.zeros(self.size, dtype=np.float32)
        cost = self._cost
        out[0] = self._best[0] / cost if cost and self._best else 1.0
        out[1] = self._rate / self._first_rate if self._first_rate else 1.0
        out[2] = self._effect if self._effect is not None else 1.0
        out[3] = 1.0 if self._effect is not None else 0.0
        since = CHANGE_MEMORY_S
        if self._change_time is not None:
            since = min(snapshot.time_s - self._change_time, CHANGE_MEMORY_S)
        out[4] = since / CHANGE_MEMORY_S
        if self._change_slot is not None and self._change_slot[0] < self.max_partners:
            slot, direction = self._change_slot
            out[5 + 2 * slot + (0 if direction > 0 else 1)] = 1.0
        out[-1] = snapshot.total_workers / self._best[1] if self._best else 1.0
        return np.clip(out, 0.0, FEATURE_MAX)
