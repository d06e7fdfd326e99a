"""ElasticGroup: the set of PartnerWorker actors of one job, and how it changes between steps.

Rescale never reads disk (invariant 3): survivors keep model and optimizer state in memory; a
newcomer or a survivor that fell behind gets the state of the most advanced survivor through the
object store; then every active worker joins a new generation of the gloo group.

Newcomers start in the background (STARTING) and join at the next step boundary once their data is
loaded and their replica built, so a cold start (~1-2 s for an actor that imports torch) does not
stall training. Warm spares (SPARE) are started, loaded and built ahead of time and join at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from raysys.control import metrics
from raysys.spec import JobSpec, PartnerSpec
from raysys.train.collective import StoreServer
from raysys.train.replica import DPStep, ReplicaConfig
from raysys.train.worker import RemotePartnerWorker, WorkerInfo, WorkerPlan

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"


class MemberState(Enum):
    STARTING = "starting"  # actor created; loading data / building the replica
    SPARE = "spare"  # ready, outside the group
    ACTIVE = "active"  # in the current generation
    GONE = "gone"  # removed on purpose or died

    @property
    def alive(self) -> bool:
        return self is not MemberState.GONE


@dataclass
class Member:
    id: str  # "<partner>/<index>"
    partner: str
    actor: ray.actor.ActorHandle
    state: MemberState
    load_ref: ray.ObjectRef | None = None  # -> WorkerInfo, once the partner's data is loaded
    ready_ref: ray.ObjectRef | None = None  # completes when load + build are done
    info: WorkerInfo | None = None
    share: float = 1.0  # relative share of the partner's per-step samples (Rebalance)
    join_as: MemberState = MemberState.ACTIVE  # what a STARTING member becomes when ready
    replaces: str | None = None  # a member to retire once this one is active
    recent_step_s: float = 0.0  # last measured step time (compute + sync)
    local_batch: int = 0
    died: bool = False
    t_gone: float = 0.0  # when it was retired or found dead


class GroupError(RuntimeError):
    pass


@dataclass
class ElasticGroup:
    spec: JobSpec
    store: StoreServer
    replica_cfg: ReplicaConfig | None = None
    members: dict[str, Member] = field(default_factory=dict)
    generation: int = 0
    # The worker actor class; tests substitute an audited subclass of PartnerWorker.
    worker_class: type | None = None
    _counters: dict[str, itertools.count] = field(default_factory=dict)

    # -- views -------------------------------------------------------------------------------
    def active(self, partner: str | None = None) -> list[Member]:
        """Active members in a stable order: partner order of the spec, then start order."""
        order = {p.name: i for i, p in enumerate(self.spec.partners)}
        found = [m for m in self.members.values() if m.state is MemberState.ACTIVE
                 and (partner is None or m.partner == partner)]
        return sorted(found, key=lambda m: (order[m.partner], int(m.id.split("/")[1])))

    def with_state(self, state: MemberState, partner: str | None = None) -> list[Member]:
        return [m for m in self.members.values()
                if m.state is state and (partner is None or m.partner == partner)]

    def counts(self) -> dict[str, int]:
        return {p.name: len(self.active(p.name)) for p in self.spec.partners}

    def plans(self, batch_sizes: dict[str, int],
              dp: dict[str, tuple[float, float]] | None = None) -> dict[str, WorkerPlan]:
        """Which chunk of its partner's batch each active worker takes (a StepPlan, per worker).

        `dp[p]` = (noise_multiplier, max_grad_norm) of a partner under differential privacy.
        Under secure aggregation (or local SGD, where a partner's workers sum their gradients
        among themselves) its k workers each add 1/k of the noise variance: only the partner's
        sum is ever visible, and it carries the full noise. Without it, a worker's
        bucket can be seen alone on the ring, so each adds the full noise (sqrt(k) times more
        in the sum than accounted for: safe, at some cost in accuracy)."""
        out = {}
        for p in self.spec.partners:
            members = self.active(p.name)
            shares = tuple(m.share for m in members)
            step = None
            if dp and p.name in dp:
                sigma, clip = dp[p.name]
                # Under local SGD a worker's noised gradient is summed inside its partner, and
                # only the partner's fused model change leaves it: the same as secure
                # aggregation for this purpose.
                shared = self.spec.secure_aggregation or \
                    self.spec.aggregation.mode == "local_sgd"
                k = len(members) if shared else 1
                step = DPStep(clip, sigma * clip / math.sqrt(max(k, 1)))
            for pos, m in enumerate(members):
                out[m.id] = WorkerPlan(batch_sizes[p.name], pos, shares, step)
        return out

    # -- starting workers --------------------------------------------------------------------
    def start(self, partner: PartnerSpec, join_as: MemberState, node_id: str | None = None,
              replaces: str | None = None) -> Member:
        """Create a worker actor on a node matching the partner's placement (and `node_id`)."""
        counter = self._counters.setdefault(partner.name, itertools.count())
        index = next(counter)
        member_id = f"{partner.name}/{index}"
        selector = dict(partner.placement)
        if node_id:
            selector[NODE_ID_LABEL] = node_id
        remote = ray.remote(self.worker_class) if self.worker_class else RemotePartnerWorker
        actor = remote.options(
            name=f"raysys:{self.spec.name}:{partner.name}:{index}",
            num_cpus=partner.cpus_per_worker,
            label_selector=selector or None,
            max_restarts=0,
        ).remote(self.spec.name, member_id, partner.name, partner.data.model_dump(),
                 self.spec.seed)
        member = Member(member_id, partner.name, actor, MemberState.STARTING, join_as=join_as,
                        replaces=replaces)
        member.load_ref = member.ready_ref = actor.load.remote(self.spec.secure_aggregation)
        if self.replica_cfg is not None:  # mid-run newcomer: build right after loading
            member.ready_ref = actor.build.remote(self.replica_cfg)
        self.members[member_id] = member
        return member

    def build_pending(self, cfg: ReplicaConfig) -> None:
        """Queue replica construction on every STARTING member (after its load)."""
        for m in self.with_state(MemberState.STARTING):
            if m.ready_ref is m.load_ref:
                # Actor calls run in submission order, so build() starts right after load().
                m.ready_ref = m.actor.build.remote(cfg)

    def poll_starting(self, timeout_s: float = 0.0) -> list[Member]:
        """Move STARTING members whose load and build finished to their target state."""
        starting = [m for m in self.with_state(MemberState.STARTING) if m.ready_ref is not None]
        if not starting:
            return []
        ready, _ = ray.wait([m.ready_ref for m in starting], num_returns=len(starting),
                            timeout=timeout_s)
        ready_set = set(ready)
        promoted = []
        for m in starting:
            if m.ready_ref not in ready_set:
                continue
            try:
                ray.get(m.ready_ref)
                m.info = ray.get(m.load_ref)
            except (RayActorError, RayTaskError) as exc:
                log.warning("worker %s failed to start: %s", m.id, exc)
                self._retire(m, died=True)
                continue
            m.ready_ref = None
            m.state = m.join_as
            promoted.append(m)
        return promoted

    # -- membership changes ------------------------------------------------------------------
    def retire(self, member_id: str) -> None:
        self._retire(self.members[member_id], died=False)

    def _retire(self, m: Member, died: bool) -> None:
        m.state = MemberState.GONE
        m.died = died
        m.t_gone = time.time()
        if died:
            metrics.FAILURES.inc(tags={"job": self.spec.name, "partner": m.partner})
        with contextlib.suppress(Exception):  # already dead: nothing to release
            ray.kill(m.actor, no_restart=True)

    def mark_dead(self, member_id: str) -> None:
        m = self.members[member_id]
        if m.state is not MemberState.GONE:
            self._retire(m, died=True)

    def reform(self, timeout_s: float) -> int:
        """Form a new generation from the ACTIVE members: sync state, then join the new group.

        Returns the step every member is at. A member that dies while we do this is dropped and
        the new generation formed again without it.
        """
        while True:
            members = self.active()
            if not members:
                raise GroupError("no live worker left in any partner")
            try:
                # settle(): under local SGD a worker drops a round it could not finish, so
                # every worker is at a fusion boundary, where all partners hold one model.
                steps = self._get([m.actor.settle.remote() for m in members], timeout_s)
                target = max(steps)
                source = members[steps.index(target)]
                behind = [m for m, s in zip(members, steps, strict=True) if s != target]
                if behind:
                    state_ref = source.actor.export_state.remote()
                    self._get([m.actor.import_state.remote(state_ref) for m in behind], timeout_s)
                self.generation += 1
                host, port = self.store.address
                world = len(members)
                # Every rank knows every rank's partner: secure aggregation masks only between
                # workers of different partners, local SGD groups each partner's workers.
                partners = [m.partner for m in members]
                delay_s = self.spec.runtime.cross_partner_delay_ms / 1000
                self._get([m.actor.join.remote(self.generation, rank, world, host, port,
                                               timeout_s, partners, self.spec.secure_aggregation,
                                               delay_s, self.spec.secure_aggregation_neighbours)
                           for rank, m in enumerate(members)], timeout_s)
                return target
            except _MemberLost as lost:
                self.mark_dead(members[lost.index].id)

    def _get(self, refs: list[ray.ObjectRef], timeout_s: float) -> list:
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except (RayActorError, GetTimeoutError) as exc:
                raise _MemberLost(i) from exc
        return out

    def shutdown(self) -> None:
        for m in self.members.values():
            if m.state.alive:
                self._retire(m, died=False)


class _MemberLost(Exception):
    def __init__(self, index: int) -> None:
        self.index = index
