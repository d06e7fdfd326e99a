"""Policies: Snapshot -> Decision, the same objects in the simulator, the env and the live agent.

`make_policy(name, **kwargs)` builds one by name; `register_policy` is the hook through which more
policies (the RLlib one of the agent issue) join the registry:

    @register_policy("rl")
    class RLPolicy(Policy): ...

Policies never execute anything and never assume they are obeyed: Guardrails filter every
decision, and the next Snapshot shows what really happened.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from raysys.control.decisions import NOOP, Decision, Scale
from raysys.control.snapshot import Snapshot

PolicyFactory = Callable[..., "Policy"]
_REGISTRY: dict[str, PolicyFactory] = {}
# Modules whose import registers built-in policies defined outside this file.
_BUILTIN_MODULES = ("raysys.agent.goodput", "raysys.agent.tabular_q", "raysys.agent.rl.policy")


class Policy(ABC):
    """Decides, every agent interval, what (if anything) should change.

    cost_per_worker_second is the objective's lambda (docs/agent.md); policies that weigh speed
    against workers held use it, the others ignore it.
    """

    name: ClassVar[str] = "policy"
    # True for a policy that never changes anything: the evaluator may then run the episode to
    # its end in one analytic jump instead of asking at every interval (same result).
    never_acts: ClassVar[bool] = False

    def __init__(self, cost_per_worker_second: float = 0.0) -> None:
        self.cost_per_worker_second = cost_per_worker_second

    def reset(self) -> None:  # noqa: B027  (optional hook: stateless policies keep this no-op)
        """Forget everything learned about the current job (called at the start of an episode)."""

    @abstractmethod
    def decide(self, snapshot: Snapshot) -> Decision: ...

    def learn(self) -> None:  # noqa: B027  (optional hook)
        """Called once the decision has been handed on, before the next Snapshot: work that
        can wait (refitting a model on what decide() saw) stays off the Snapshot -> Decision
        path. Every loop that calls decide() calls this after it (evaluator, env, AgentActor)."""


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class (or factory) decorator adding a policy to the registry under `name`."""

    def add(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_policies() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs) -> Policy:
    """A fresh policy by registered name: make_policy("goodput", cost_per_worker_second=0.02)."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


@register_policy("static")
class StaticPolicy(Policy):
    """Keeps the initial allocation; only the controller's own failure recovery changes it."""

    name = "static"
    never_acts = True

    def decide(self, snapshot: Snapshot) -> Decision:
        return NOOP


@register_policy("oracle-static")
class OracleStaticPolicy(Policy):
    """Moves to a given fixed allocation (the best one in hindsight, found by the evaluator's
    search over every static allocation) and then holds it.

    The evaluator scores "oracle-static" by starting the simulator at that allocation, which costs
    no rescale; live, this policy reaches it one Scale at a time.
    """

    name = "oracle-static"

    def __init__(
        self, allocation: dict[str, int] | None = None, cost_per_worker_second: float = 0.0
    ) -> None:
        super().__init__(cost_per_worker_second)
        self.allocation = dict(allocation or {})

    def decide(self, snapshot: Snapshot) -> Decision:
        for partner in snapshot.partners:
            target = self.allocation.get(partner.name)
            if target is not None and target != partner.workers:
                return Scale(partner.name, 1 if target > partner.workers else -1)
        return NOOP


@register_policy("threshold")
class ThresholdPolicy(Policy):
    """HPA-like autoscaler: scale a partner on measured efficiency, with tolerance and cooldown.

    Load of a partner = its slowest worker's step time / the job's step time: near 1 when its
    workers set the pace, low when they wait for others. Efficiency = samples/s per busy worker
    (workers weighted by their load) relative to the best seen on this job, so workers that only
    wait do not count against it. Scale up the pacing partner while efficiency stays above
    `min_efficiency` + tolerance and its nodes have room; scale down a partner whose
    workers mostly wait, or the largest one when efficiency has fallen below the band, but only
    once that has held for `downscale_window_s` (HPA's scale-down stabilisation window: right
    after one partner grows, the others briefly look idle).
    """

    name = "threshold"

    def __init__(
        self,
        min_efficiency: float = 0.6,
        tolerance: float = 0.1,
        idle_load: float = 0.6,
        cooldown_s: float = 60.0,
        settle_s: float = 20.0,
        downscale_window_s: float = 120.0,
        cost_per_worker_second: float = 0.0,
    ) -> None:
        super().__init__(cost_per_worker_second)
        self.downscale_window_s = downscale_window_s
        self.min_efficiency = min_efficiency
        self.tolerance = tolerance
        self.idle_load = idle_load
        self.cooldown_s = cooldown_s
        self.settle_s = settle_s  # measurements just after a rescale include its stall
        self.reset()

    def reset(self) -> None:
        self._best_per_worker = 0.0
        self._last_action_s: float | None = None
        self._wants_down_since: dict[str, float] = {}

    def decide(self, snapshot: Snapshot) -> Decision:
        last = snapshot.last_rescale_time_s
        settled = last is None or snapshot.time_s - last >= self.settle_s
        if not settled or snapshot.throughput <= 0 or snapshot.step_time_s <= 0:
            return NOOP
        loads = {
            p.name: min(self._slowest(snapshot, p.name) / snapshot.step_time_s, 1.0)
            for p in snapshot.partners
        }
        busy = sum(p.workers * loads[p.name] for p in snapshot.partners)
        if busy <= 0:
            return NOOP
        per_worker = snapshot.throughput / busy
        self._best_per_worker = max(self._best_per_worker, per_worker)
        if self._last_action_s is not None and snapshot.time_s - self._last_action_s < (
            self.cooldown_s
        ):
            return NOOP
        decision = self._choose(snapshot, loads, per_worker / self._best_per_worker)
        if decision is not NOOP:
            self._last_action_s = snapshot.time_s
        return decision

    @staticmethod
    def _slowest(snapshot: Snapshot, partner: str) -> float:
        slowest = snapshot.slowest_worker(partner)
        return slowest.step_time_s if slowest is not None else 0.0

    def _choose(self, snapshot: Snapshot, loads: dict[str, float], efficiency: float) -> Decision:
        pacing = max(snapshot.partners, key=lambda p: (loads[p.name], p.name))
        if (
            loads[pacing.name] >= 1.0 - self.tolerance
            and efficiency >= self.min_efficiency + self.tolerance
            and pacing.workers < pacing.max_workers
            and snapshot.worker_slots_for(pacing.name) > 0
        ):
            return Scale(pacing.name, +1)
        shrinkable = [p for p in snapshot.partners if p.workers > p.min_workers]
        idle = [p for p in shrinkable if loads[p.name] < self.idle_load]
        candidate = None
        if idle:
            candidate = min(idle, key=lambda p: (loads[p.name], p.name)).name
        elif efficiency < self.min_efficiency - self.tolerance and shrinkable:
            candidate = max(shrinkable, key=lambda p: (p.workers, p.name)).name
        # Scale down only what has wanted to shrink for the whole stabilisation window.
        self._wants_down_since = {
            name: since for name, since in self._wants_down_since.items() if name == candidate
        }
        if candidate is None:
            return NOOP
        since = self._wants_down_since.setdefault(candidate, snapshot.time_s)
        if snapshot.time_s - since >= self.downscale_window_s:
            del self._wants_down_since[candidate]
            return Scale(candidate, -1)
        return NOOP
