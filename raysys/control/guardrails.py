"""Guardrails: the last check between any policy and the job it steers.

Whatever a policy asks for (a heuristic, TabularQ, an RLlib module that has never seen this job),
the Decision that reaches the simulator or the live controller keeps every partner inside its
worker bounds, fits on free CPUs of nodes matching the partner's placement (residency), waits out
a cooldown after a rescale and stays under an action rate. A decision that cannot be made safe is
turned into Noop; one that can be made safe by clipping (scale by less, drop unknown workers from a
split) is clipped. The same checks give the action mask an RL policy trains with.
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysys.control.decisions import NOOP, Decision, Noop, Rebalance, Replace, Scale
from raysys.control.snapshot import Snapshot, matches

_EPS = 1e-9


class GuardrailConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cooldown_s: float = Field(30.0, ge=0, description="no change until this long after a rescale")
    max_actions_per_minute: int = Field(4, ge=0, description="changes allowed in any 60 s")
    min_share_fraction: float = Field(
        0.1, gt=0, le=1, description="a rebalance gives each worker at least this x an equal share"
    )
    straggler_ratio: float | None = Field(
        None,
        ge=1,
        description="if set, only replace a worker this x slower than the median of its partner's "
        "other workers, or move one to a named node running at least as many of the job's workers "
        "as its own (packing the job)",
    )


class ActionVocabulary(Protocol):
    """What mask() needs of an action space (raysys.agent.actions.ActionSpace is one)."""

    n: int

    def decode(self, index: int, snapshot: Snapshot) -> Decision: ...


class Guardrails:
    def __init__(self, config: GuardrailConfig | None = None) -> None:
        self.config = config or GuardrailConfig()

    def filter(self, decision: Decision, snapshot: Snapshot) -> Decision:
        """The decision itself, a clipped version of it, or Noop; never something unsafe."""
        return self._filter(decision, snapshot, _SlotCounter(snapshot))

    def mask(self, snapshot: Snapshot, action_space: ActionVocabulary) -> np.ndarray:
        """mask[i] is True when action i decodes to a decision the guardrails let through."""
        allowed = np.zeros(action_space.n, dtype=bool)
        allowed[0] = True  # Noop is always allowed, so a mask never forbids everything
        if not self._may_act_now(snapshot):
            return allowed
        slots = _SlotCounter(snapshot)  # shared: every action asks about the same capacity
        for index in range(1, action_space.n):
            decision = action_space.decode(index, snapshot)
            allowed[index] = not isinstance(self._filter(decision, snapshot, slots), Noop)
        return allowed

    def _filter(self, decision: Decision, snapshot: Snapshot, slots: _SlotCounter) -> Decision:
        if isinstance(decision, Noop):
            return decision
        if not self._may_act_now(snapshot):
            return NOOP
        if isinstance(decision, Scale):
            return self._filter_scale(decision, snapshot, slots)
        if isinstance(decision, Replace):
            return self._filter_replace(decision, snapshot, slots)
        if isinstance(decision, Rebalance):
            return self._filter_rebalance(decision, snapshot)
        return NOOP  # an unknown kind of decision is never passed through

    # -- rules -----------------------------------------------------------------------------------
    def _may_act_now(self, snapshot: Snapshot) -> bool:
        last = snapshot.last_rescale_time_s
        if last is not None and snapshot.time_s - last < self.config.cooldown_s:
            return False
        return snapshot.actions_last_minute < self.config.max_actions_per_minute

    def _filter_scale(self, decision: Scale, snapshot: Snapshot, slots: _SlotCounter) -> Decision:
        partner = snapshot.partner(decision.partner)
        if partner is None or decision.delta == 0:
            return NOOP
        if decision.delta > 0:
            room = partner.max_workers - partner.workers
            delta = min(decision.delta, room, slots(partner.name))
            return Scale(partner.name, delta) if delta > 0 else NOOP
        # A partner already below its minimum (after a failure) may not shrink further.
        delta = max(decision.delta, partner.min_workers - partner.workers)
        return Scale(partner.name, delta) if delta < 0 else NOOP

    def _filter_replace(
        self, decision: Replace, snapshot: Snapshot, slots: _SlotCounter
    ) -> Decision:
        worker = snapshot.worker(decision.worker)
        if worker is None or not worker.alive or snapshot.partner(worker.partner) is None:
            return NOOP
        ratio = self.config.straggler_ratio
        packing = _consolidates(decision, worker.node, snapshot)
        if ratio is not None and not packing:
            peers = snapshot.median_step_time(worker.partner, exclude=worker.id)
            if peers <= 0 or worker.step_time_s < ratio * peers:
                return NOOP  # not measurably slower than its peers (or none to compare with)
        need = snapshot.cpus_per_worker.get(worker.partner, 1.0)
        if decision.node is not None:
            node = snapshot.node(decision.node)
            selector = snapshot.placement.get(worker.partner, {})
            if (
                node is not None
                and matches(node.labels, selector)
                and node.free_cpus + _EPS >= need
            ):
                return decision
        if packing:
            return NOOP  # a move that packs the job goes to its node or nowhere
        # The newcomer starts before the old worker stops, so it needs a free slot somewhere.
        return Replace(worker.id) if slots(worker.partner) >= 1 else NOOP

    def _filter_rebalance(self, decision: Rebalance, snapshot: Snapshot) -> Decision:
        partner = snapshot.partner(decision.partner)
        if partner is None:
            return NOOP
        live = snapshot.workers_of(partner.name)
        named = {
            w: s
            for w, s in decision.split.items()
            if isinstance(s, numbers.Real) and math.isfinite(s) and s > 0
        }
        if len(live) < 2 or not any(w.id in named for w in live):
            return NOOP
        shares = {w.id: float(named.get(w.id, 1.0)) for w in live}
        shares = _floor_shares(shares, self.config.min_share_fraction, partner.batch_share)
        return Rebalance(partner.name, shares)


class _SlotCounter:
    """Snapshot.worker_slots_for, remembered per partner for one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.counts: dict[str, int] = {}

    def __call__(self, partner: str) -> int:
        if partner not in self.counts:
            self.counts[partner] = self.snapshot.worker_slots_for(partner)
        return self.counts[partner]


def _floor_shares(shares: dict[str, float], min_fraction: float, batch: int) -> dict[str, float]:
    """Normalise shares to sum 1 with each at least min_fraction of equal and >= 1 sample."""
    n = len(shares)
    floor = max(min_fraction / n, 1.0 / batch if batch > 0 else 0.0)
    floor = min(floor, 1.0 / n)  # an equal split always satisfies the floor
    # Lift shares below the floor to it and scale the rest down; repeat, since scaling down can
    # push another share under the floor (terminates: the floor is at most an equal share).
    fixed: set[str] = set()
    while True:
        budget = 1.0 - floor * len(fixed)
        rest_total = sum(s for w, s in shares.items() if w not in fixed)
        out = {w: floor if w in fixed else s * budget / rest_total for w, s in shares.items()}
        low = {w for w, s in out.items() if w not in fixed and s < floor - _EPS}
        if not low:
            return out
        fixed |= low


def _consolidates(decision: Replace, current_node: str, snapshot: Snapshot) -> bool:
    """A move to another named node that runs at least as many of the job's workers as the
    worker's own node: packing the job (in-node sync), not a replacement of a slow worker."""
    if decision.node is None or decision.node == current_node:
        return False
    live = [w for w in snapshot.workers if w.alive]
    return sum(w.node == decision.node for w in live) >= sum(w.node == current_node for w in live)
