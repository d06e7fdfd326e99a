"""Snapshot -> fixed-size float32 vector, the same in the simulator, the env and the live agent.

Every feature is a fraction or a ratio of two times (never an absolute time or sample count), so a
policy trained on a fast simulated job reads a slow live job the same way. Values are clipped to
[0, FEATURE_MAX]. Workers of a partner are listed slowest first, so "the first worker slot" always
means "this partner's slowest worker" whatever the workers are called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysys.control.snapshot import Snapshot

FEATURE_MAX = 5.0
RESCALE_MEMORY_S = 300.0  # "time since the last rescale" saturates after this long

GLOBAL_FEATURES = (
    "progress",  # samples done / total
    "since_rescale",  # min(time since last rescale, RESCALE_MEMORY_S) / RESCALE_MEMORY_S
    "rescale_cost_steps",  # last rescale's stall in steps, / 100
    "recent_failures",  # failures in the last minute, / 3
    "actions_last_minute",  # / 10
    "cluster_free",  # free CPUs / total CPUs over all nodes
    "straggle",  # global step time / median worker step time (>1: someone waits)
    "workers_fraction",  # live workers / sum of max_workers
    "cost_rate",  # lambda * live workers: cost-seconds charged per second of progress
)
PARTNER_FEATURES = (
    "present",
    "workers_of_max",  # workers / max_workers
    "headroom_bounds",  # (workers - min) / (max - min)
    "batch_fraction",  # batch_share / global batch
    "free_slots",  # workers that still fit on its nodes / max_workers
    "relative_time",  # partner median step time / global median (>1: this partner is the slow one)
    "slowest_vs_median",  # slowest worker / partner median
    "imbalance",  # max / min worker throughput (local_batch / step_time)
    "below_min",  # 1 when a failure left it below min_workers
)
WORKER_FEATURES = (
    "alive",
    "relative_time",  # worker step time / partner median
    "relative_batch",  # local batch / equal share
)


@dataclass(frozen=True)
class FeatureLayout:
    max_partners: int = 4
    max_workers_per_partner: int = 8

    @property
    def size(self) -> int:
        return len(GLOBAL_FEATURES) + self.max_partners * self.per_partner

    @property
    def per_partner(self) -> int:
        return len(PARTNER_FEATURES) + self.max_workers_per_partner * len(WORKER_FEATURES)

    def global_index(self, name: str) -> int:
        return _GLOBAL_OFFSET[name]

    def partner_index(self, slot: int, name: str) -> int:
        return len(GLOBAL_FEATURES) + slot * self.per_partner + _PARTNER_OFFSET[name]

    def worker_index(self, slot: int, worker: int, name: str) -> int:
        base = len(GLOBAL_FEATURES) + slot * self.per_partner + len(PARTNER_FEATURES)
        return base + worker * len(WORKER_FEATURES) + _WORKER_OFFSET[name]


_GLOBAL_OFFSET = {name: i for i, name in enumerate(GLOBAL_FEATURES)}
_PARTNER_OFFSET = {name: i for i, name in enumerate(PARTNER_FEATURES)}
_WORKER_OFFSET = {name: i for i, name in enumerate(WORKER_FEATURES)}


def _ratio(num: float, den: float, default: float = 1.0) -> float:
    return num / den if den > 0 and num > 0 else default


def _median(values: list[float]) -> float:
    """Median of measured (> 0) values, 0 when none; the same rule as Snapshot.median_step_time."""
    xs = sorted(v for v in values if v > 0)
    if not xs:
        return 0.0
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def featurize(
    snapshot: Snapshot,
    max_partners: int = 4,
    max_workers_per_partner: int = 8,
    cost_per_worker_second: float = 0.0,
) -> np.ndarray:
    """Fixed-size float32 features of a snapshot (layout: FeatureLayout and the tuples above).

    Partners beyond max_partners and workers beyond max_workers_per_partner are left out (the
    slowest workers are kept); cost_per_worker_second is the objective's lambda, which a policy
    needs to weigh speed against workers held.
    """
    layout = FeatureLayout(max_partners, max_workers_per_partner)
    out = [0.0] * layout.size
    by_partner: dict[str, list] = {p.name: [] for p in snapshot.partners}
    for w in snapshot.workers:
        if w.alive and w.partner in by_partner:
            by_partner[w.partner].append(w)
    live = sum(len(ws) for ws in by_partner.values())
    median_all = _median([w.step_time_s for ws in by_partner.values() for w in ws])
    total_cpus = sum(n.total_cpus for n in snapshot.nodes)
    max_total = sum(p.max_workers for p in snapshot.partners)
    since = (
        RESCALE_MEMORY_S
        if snapshot.last_rescale_time_s is None
        else min(snapshot.time_s - snapshot.last_rescale_time_s, RESCALE_MEMORY_S)
    )
    out[: len(GLOBAL_FEATURES)] = (
        snapshot.progress,
        since / RESCALE_MEMORY_S,
        _ratio(snapshot.last_rescale_cost_s, snapshot.step_time_s, 0.0) / 100.0,
        snapshot.recent_failures / 3.0,
        snapshot.actions_last_minute / 10.0,
        _ratio(sum(n.free_cpus for n in snapshot.nodes), total_cpus, 0.0),
        _ratio(snapshot.step_time_s, median_all),
        _ratio(live, max_total, 0.0),
        cost_per_worker_second * live,
    )
    global_batch = snapshot.global_batch
    per_partner = len(PARTNER_FEATURES) + max_workers_per_partner * len(WORKER_FEATURES)
    for slot, partner in enumerate(snapshot.partners[:max_partners]):
        mine = sorted(by_partner[partner.name], key=lambda w: (-w.step_time_s, w.id))
        median = _median([w.step_time_s for w in mine])
        speeds = [w.local_batch / w.step_time_s for w in mine if w.step_time_s > 0]
        span = partner.max_workers - partner.min_workers
        base = len(GLOBAL_FEATURES) + slot * per_partner
        out[base : base + len(PARTNER_FEATURES)] = (
            1.0,
            _ratio(partner.workers, partner.max_workers, 0.0),
            (partner.workers - partner.min_workers) / span if span > 0 else 0.0,
            _ratio(partner.batch_share, global_batch, 0.0),
            _ratio(snapshot.worker_slots_for(partner.name), partner.max_workers, 0.0),
            _ratio(median, median_all),
            _ratio(mine[0].step_time_s, median) if mine else 1.0,
            _ratio(max(speeds), min(speeds)) if speeds else 1.0,
            1.0 if partner.workers < partner.min_workers else 0.0,
        )
        equal_share = partner.batch_share / max(len(mine), 1)
        i = base + len(PARTNER_FEATURES)
        for worker in mine[:max_workers_per_partner]:
            out[i : i + len(WORKER_FEATURES)] = (
                1.0,
                _ratio(worker.step_time_s, median),
                worker.local_batch / equal_share,
            )
            i += len(WORKER_FEATURES)
    return np.clip(np.array(out, dtype=np.float32), 0.0, FEATURE_MAX)
