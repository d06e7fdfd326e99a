"""DecisionExecutor: turns Decisions into ElasticGroup operations, between two steps.

Decisions (from the agent, a user or a test) only say what should change; this is the one place
that says how: a scale-up takes warm spares first and starts cold newcomers for the rest (they join
when ready), a scale-down retires the slowest workers, a replace takes a spare or starts a
newcomer on a node of the partner's placement, a rebalance changes the split of a partner's samples.
Bounds are enforced here too, whatever the guardrails upstream did.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from raysys.control.decisions import Decision, Noop, Rebalance, Replace, Scale, describe, kind
from raysys.control.events import RescaleEvent
from raysys.spec import JobSpec, node_matches
from raysys.train.group import ElasticGroup, Member, MemberState


class DecisionExecutor:
    def __init__(self, spec: JobSpec, group: ElasticGroup, log: Callable[[str], None]) -> None:
        self.spec = spec
        self.group = group
        self.log = log
        self.pending: dict[str, RescaleEvent] = {}  # cold newcomer id -> its decision's event
        # Partners whose warm spare was used. The new spare is started only once the change
        # has taken effect: starting an actor (importing torch) competes for the CPUs the
        # re-formed group needs for its first steps.
        self.spares_to_refill: list[str] = []

    def refill_spares(self) -> None:
        for name in self.spares_to_refill:
            self.group.start(self.spec.partner(name), MemberState.SPARE)
        self.spares_to_refill.clear()

    def joined(self, m: Member) -> RescaleEvent:
        event = self.pending.pop(m.id, None)
        # No decision asked for this member: it replaces a failed worker (failure policy).
        return event or RescaleEvent("recovery", f"{m.id} joined", time.time())

    def apply(self, submitted: float, d: Decision) -> RescaleEvent | None:
        """Turn one decision into group operations; returns an event when the group changed now.

        `submitted` is when the decision arrived: its event's latency counts from then. Cold
        newcomers return None here: their event is opened when they join.
        """
        now = submitted
        if isinstance(d, Noop):
            return None
        self.log(f"decision: {describe(d)}")
        if isinstance(d, Scale):
            return self.scale(d, now)
        if isinstance(d, Replace):
            return self.replace(d, now)
        if isinstance(d, Rebalance):
            active = self.group.active(d.partner)
            members = {m.id for m in active}
            shares = [float(d.split.get(m.id, 1.0)) for m in active]
            if _same_proportions(shares, [m.share for m in active]):
                return None  # the split already is this one: nothing changes
            for m, share in zip(active, shares, strict=True):
                m.share = share
            unknown = set(d.split) - members
            if unknown:
                self.log(f"rebalance: ignoring workers not active in {d.partner}: {unknown}")
            return RescaleEvent(kind(d), describe(d), now)
        raise TypeError(f"not a decision: {d!r}")

    def scale(self, d: Scale, now: float) -> RescaleEvent | None:
        p = self.spec.partner(d.partner)
        active = self.group.active(p.name)
        starting = self.group.with_state(MemberState.STARTING, p.name)
        if d.delta > 0:
            room = p.workers.max - len(active) - len([m for m in starting
                                                      if m.join_as is MemberState.ACTIVE])
            n = min(d.delta, room)
            spares = self.group.with_state(MemberState.SPARE, p.name)[:n]
            for m in spares:
                m.state = MemberState.ACTIVE
            for _ in range(n - len(spares)):
                m = self.group.start(p, MemberState.ACTIVE)
                self.pending[m.id] = RescaleEvent(kind(d), f"{m.id} (cold)", now)
            self.spares_to_refill += [p.name] * len(spares)
            if n < d.delta:
                self.log(f"{describe(d)}: clipped to +{n} by max {p.workers.max}")
            if spares:
                return RescaleEvent(kind(d), f"{', '.join(m.id for m in spares)} (warm)",
                                    now)
            return None
        n = min(-d.delta, len(active) - p.workers.min)
        if n <= 0:
            self.log(f"{describe(d)}: refused, {p.name} is at its minimum {p.workers.min}")
            return None
        # The slowest workers leave first (as in the simulator); unmeasured ones count as fast.
        leaving = sorted(active, key=lambda m: m.recent_step_s)[-n:]
        for m in leaving:
            self.group.retire(m.id)
        return RescaleEvent(kind(d), ", ".join(m.id for m in leaving), now)

    def replace(self, d: Replace, now: float) -> RescaleEvent | None:
        old = self.group.members.get(d.worker)
        if old is None or old.state is MemberState.GONE:
            self.log(f"replace: no live worker {d.worker}")
            return None
        p = self.spec.partner(old.partner)
        if any(m.replaces == old.id for m in self.group.with_state(MemberState.STARTING)):
            # A cold replacement is already on its way; a second one would grow the partner.
            self.log(f"replace: {old.id} is already being replaced")
            return None
        if d.node is not None:
            node = next((n for n in ray.nodes() if n["NodeID"] == d.node and n["Alive"]), None)
            if node is None or not node_matches(node.get("Labels") or {}, p.placement):
                self.log(f"replace: node {d.node} is not a live node of {p.name}'s placement")
                return None
        spare = next(iter(self.group.with_state(MemberState.SPARE, p.name)), None)
        if spare is not None and d.node in (None, spare.info.node_id):
            spare.state = MemberState.ACTIVE
            spare.share = old.share  # it takes over the old worker's share, as in the simulator
            self.group.retire(old.id)
            self.spares_to_refill.append(p.name)
            return RescaleEvent(kind(d), f"{old.id} -> {spare.id} (warm)", now)
        m = self.group.start(p, MemberState.ACTIVE, node_id=d.node, replaces=old.id)
        self.pending[m.id] = RescaleEvent(kind(d), f"{old.id} -> {m.id} (cold)", now)
        return None


def _same_proportions(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    sa, sb = sum(a), sum(b)
    return len(a) == len(b) and all(abs(x / sa - y / sb) <= tol for x, y in zip(a, b, strict=True))
