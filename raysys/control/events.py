"""What the controller records about a job: rescale events, per-partner counters, progress."""

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
class PartnerCounters:
    samples: int = 0
    skipped_steps: int = 0
    failures: int = 0


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
    events: list[str] = field(default_factory=list)
    next_event: int = 0  # pass as `since` to get only lines not seen yet
