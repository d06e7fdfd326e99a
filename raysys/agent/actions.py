"""The discrete action vocabulary shared by the gymnasium env, TabularQ and RLlib policies.

Index 0 is Noop; then, for each partner slot k (partners in Snapshot order), four actions:
scale +1, scale -1, replace the slowest worker, rebalance the partner's split by measured worker
throughput. An index is turned into a concrete Decision against a Snapshot, so the same index
means "scale the first partner up" whatever the partners are called; slots beyond the job's
partners decode to Noop and are masked out by Guardrails.mask.
"""

from __future__ import annotations

from enum import IntEnum

from raysys.control.decisions import NOOP, Decision, Noop, Rebalance, Replace, Scale
from raysys.control.snapshot import Snapshot


class PartnerAction(IntEnum):
    SCALE_UP = 0
    SCALE_DOWN = 1
    REPLACE_SLOWEST = 2
    REBALANCE = 3


def rebalance_by_throughput(snapshot: Snapshot, partner: str) -> Decision:
    """Split a partner's samples in proportion to each worker's measured samples/s.

    A worker's throughput at its current share is local_batch / step_time; giving it a share
    proportional to that equalises step times when compute dominates. Noop until every live
    worker of the partner has been measured, or when there is only one worker.
    """
    workers = snapshot.workers_of(partner)
    if len(workers) < 2 or any(w.step_time_s <= 0 or w.local_batch <= 0 for w in workers):
        return NOOP
    return Rebalance(partner, {w.id: w.local_batch / w.step_time_s for w in workers})


class ActionSpace:
    """Maps action index <-> Decision for jobs of up to `max_partners` partners."""

    ACTIONS_PER_PARTNER = len(PartnerAction)

    def __init__(self, max_partners: int = 4) -> None:
        if max_partners < 1:
            raise ValueError("max_partners must be >= 1")
        self.max_partners = max_partners
        self.n = 1 + self.ACTIONS_PER_PARTNER * max_partners

    def split(self, index: int) -> tuple[int, PartnerAction] | None:
        """(partner slot, action) for an index, None for Noop."""
        if not 0 <= index < self.n:
            raise IndexError(f"action {index} outside 0..{self.n - 1}")
        if index == 0:
            return None
        slot, kind = divmod(index - 1, self.ACTIONS_PER_PARTNER)
        return slot, PartnerAction(kind)

    def index(self, slot: int, kind: PartnerAction) -> int:
        return 1 + slot * self.ACTIONS_PER_PARTNER + int(kind)

    def decode(self, index: int, snapshot: Snapshot) -> Decision:
        parts = self.split(index)
        if parts is None or parts[0] >= len(snapshot.partners):
            return NOOP
        slot, kind = parts
        partner = snapshot.partners[slot].name
        if kind is PartnerAction.SCALE_UP:
            return Scale(partner, +1)
        if kind is PartnerAction.SCALE_DOWN:
            return Scale(partner, -1)
        if kind is PartnerAction.REPLACE_SLOWEST:
            slowest = snapshot.slowest_worker(partner)
            return Replace(slowest.id) if slowest is not None else NOOP
        return rebalance_by_throughput(snapshot, partner)

    def encode(self, decision: Decision, snapshot: Snapshot) -> int:
        """Nearest index for a Decision (Rebalance/Replace map to their partner's action)."""
        if isinstance(decision, Noop):
            return 0
        if isinstance(decision, Replace):
            worker = snapshot.worker(decision.worker)
            partner = worker.partner if worker else decision.worker.split("/")[0]
            kind = PartnerAction.REPLACE_SLOWEST
        elif isinstance(decision, Scale):
            if decision.delta == 0:
                return 0
            partner = decision.partner
            kind = PartnerAction.SCALE_UP if decision.delta > 0 else PartnerAction.SCALE_DOWN
        else:
            partner, kind = decision.partner, PartnerAction.REBALANCE
        names = [p.name for p in snapshot.partners]
        if partner not in names or names.index(partner) >= self.max_partners:
            return 0
        return self.index(names.index(partner), kind)

    def label(self, index: int) -> str:
        parts = self.split(index)
        if parts is None:
            return "noop"
        slot, kind = parts
        return f"partner{slot}:{kind.name.lower()}"
