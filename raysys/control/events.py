"""What the controller records about a job: rescale events and progress."""

from __future__ import annotations

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
