"""The decision vocabulary shared by the simulator, the gymnasium env, the evaluator and the live
controller (ARCHITECTURE.md invariant 4).

A Decision says *what* should change; it never executes anything. The simulator applies it to its
model of the cluster, the live JobController applies it to the ElasticGroup. Keeping the two apart
(as Ray Train v2 keeps NoopDecision/ResizeDecision apart from its controller) is what lets a
policy trained in simulation steer a live job unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Noop:
    """Leave the job as it is."""


@dataclass(frozen=True)
class Scale:
    """Add (delta > 0) or remove (delta < 0) workers of one partner."""

    partner: str
    delta: int


@dataclass(frozen=True)
class Replace:
    """Start a new worker in place of `worker` (a worker id such as ``alpha/1``).

    `node` optionally names the node id to put the newcomer on; it must still match the partner's
    placement. None lets the controller pick any matching node with free capacity.
    """

    worker: str
    node: str | None = None


@dataclass(frozen=True)
class Rebalance:
    """Change how a partner's per-step samples are split among its live workers.

    `split` maps worker id -> relative share (any positive numbers; they are normalised). Workers
    of the partner that are not named keep a share of 1.0.
    """

    partner: str
    split: dict[str, float] = field(default_factory=dict)

    def __hash__(self) -> int:  # dict fields are unhashable; decisions are compared by value
        return hash((self.partner, tuple(sorted(self.split.items()))))


Decision = Noop | Scale | Replace | Rebalance

NOOP = Noop()


def kind(decision: Decision) -> str:
    """The change's kind as RescaleEvent and Snapshot.last_rescale_kind name it."""
    if isinstance(decision, Scale) and decision.delta != 0:
        return "scale_up" if decision.delta > 0 else "scale_down"
    if isinstance(decision, Replace):
        return "replace"
    if isinstance(decision, Rebalance):
        return "rebalance"
    return "noop"


def describe(decision: Decision) -> str:
    """One short human-readable line, for logs and progress output."""
    if isinstance(decision, Scale):
        return f"scale {decision.partner} {decision.delta:+d}"
    if isinstance(decision, Replace):
        where = f" onto {decision.node}" if decision.node else ""
        return f"replace {decision.worker}{where}"
    if isinstance(decision, Rebalance):
        shares = ", ".join(f"{w}={s:.2f}" for w, s in sorted(decision.split.items()))
        return f"rebalance {decision.partner} ({shares})"
    return "noop"
