"""What the controller records about a job: rescale events and progress."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class RescaleEvent:
    kind: str  # scale_up | scale_down | replace | rebalance | recovery
    detail: str
    t_decision: float
    t_ready: float | None = None  # group re-formed at its new size
    t_first_step: float | None = None  # first step at the new size completed
    step: int | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.t_first_step is None else self.t_first_step - self.t_decision


@dataclass
class Progress:
    state: str
    step: int
    steps: int
    loss: float | None
    samples_per_s: float
    step_time_s: float
    workers: dict[str, int]
    generation: int
    elapsed_s: float
    ledger: dict[str, dict] = field(default_factory=dict)  # per partner: see control/ledger.py
    events: list[str] = field(default_factory=list)
    next_event: int = 0  # pass as `since` to get only lines not seen yet


class RunRecord:
    """The machine-readable story of a run, one dict per event; the driver writes them to
    `events.jsonl` in the run directory as they happen, and `raysys report` draws from them.

    Every event has `type`, `t` (seconds since the controller started) and `step` (steps done
    when it happened). Types and their other fields:
      start       job, steps, partners {name: workers}, batch_per_step {name: b}, aggregation
      progress    after every call of steps: workers {partner: n}, samples_per_s, loss (mean
                  training loss of the call's steps, NaN -> null), epsilon {partner: eps} (DP
                  partners only)
      evaluation  loss, accuracy, rows, seconds (the evaluation's own duration)
      decision    decision (text), as the controller received it (agent or `raysys` user)
      rescale     kind, detail, latency_s (decision to first step at the new size)
      chaos       worker, fault ("slow 3x" | "kill")
      failure     worker
      checkpoint  path
      finish      summary (the job's final summary, ledger included)
    """

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.items: list[dict] = []

    def add(self, event_type: str, step: int, /, **fields) -> None:
        self.items.append({"type": event_type, "t": round(time.time() - self.t0, 3), "step": step,
                           **{k: _plain(v) for k, v in fields.items()}})

    def since(self, n: int) -> list[dict]:
        return self.items[n:]


def _plain(value):
    """JSON-safe: NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
