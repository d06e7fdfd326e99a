"""The timeline of one simulated episode: scripted and random events made concrete for a seed.

Every random draw an event needs (its time, its factor, which worker it hits) is made here, up
front, from the episode's seed. A policy therefore cannot change which events happen or when: two
policies run with one seed face the same cluster, which is what makes "best static allocation in
hindsight" a fair yardstick. Random events run up to a horizon that depends on the initial
allocation (Simulator.max_time_s), each generator from a stream of its own, so episodes that
start from different allocations share every event before the earlier of their horizons.
Targets chosen at random are stored as a uniform number and resolved against the workers alive
when the event fires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from raysys.agent.scenarios import (
    ContentionEvent,
    NodeFailureEvent,
    NodeJoinEvent,
    NodeSpec,
    RandomContention,
    RandomFailures,
    RandomStragglers,
    Scenario,
    StragglerEvent,
    WorkerFailureEvent,
)


@dataclass(frozen=True)
class Variation:
    """Randomisation of a scenario across episodes (the env's distribution of scenarios)."""

    compute_sigma: float = 0.0  # lognormal sigma on the profile's compute times
    sync_sigma: float = 0.0  # lognormal sigma on the profile's sync times
    time_jitter: float = 0.0  # scripted event times move by up to +-this fraction
    speed_sigma: float = 0.0  # lognormal sigma on each node's speed


DEFAULT_VARIATION = Variation(compute_sigma=0.3, sync_sigma=0.4, time_jitter=0.25, speed_sigma=0.05)


@dataclass(order=True)
class TimedEvent:
    time: float
    seq: int
    kind: str = field(compare=False)
    node: str | None = field(default=None, compare=False)
    worker: str | None = field(default=None, compare=False)
    selector: dict[str, str] | None = field(default=None, compare=False)
    cpus: float = field(default=0.0, compare=False)
    factor: float = field(default=1.0, compare=False)
    duration_s: float | None = field(default=None, compare=False)
    pick: float = field(default=0.0, compare=False)  # uniform in [0, 1): which random target
    join: NodeSpec | None = field(default=None, compare=False)
    token: int = field(default=0, compare=False)  # pairs a start with its end


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return lo if hi <= lo else rng.uniform(lo, hi)


def build_timeline(
    scenario: Scenario, rng: random.Random, horizon_s: float, variation: Variation
) -> list[TimedEvent]:
    """All events of an episode, sorted by time (ties keep file order)."""
    events: list[TimedEvent] = []

    def add(time: float, kind: str, **fields) -> None:
        events.append(TimedEvent(max(time, 0.0), len(events), kind, **fields))

    for e in scenario.events:
        shift = rng.uniform(-1.0, 1.0) * (e.jitter_s + variation.time_jitter * e.at)
        at = e.at + shift
        pick = rng.random()
        if isinstance(e, ContentionEvent):
            add(
                at,
                "contention",
                node=e.node,
                selector=e.selector,
                cpus=e.cpus,
                duration_s=e.duration_s,
                pick=pick,
            )
        elif isinstance(e, StragglerEvent):
            add(
                at,
                "straggler",
                node=e.node,
                worker=e.worker,
                factor=e.factor,
                duration_s=e.duration_s,
                pick=pick,
            )
        elif isinstance(e, WorkerFailureEvent):
            add(at, "worker_failure", worker=e.worker, pick=pick)
        elif isinstance(e, NodeFailureEvent):
            add(at, "node_failure", node=e.node, duration_s=e.duration_s)
        elif isinstance(e, NodeJoinEvent):
            for spec in e.node.expand():
                add(at, "node_join", join=spec)

    # Each generator draws from a stream of its own, seeded here in a fixed number of draws: the
    # horizon (which depends on the episode's initial allocation) then only cuts a generator's
    # tail, and episodes of one seed share every event before the earlier of their horizons.
    # (One shared stream let a longer horizon shift every later generator's events, so
    # oracle-static's allocations met other random events than the policies did.)
    streams = [random.Random(rng.getrandbits(64)) for _ in scenario.random_events]
    for gen, stream in zip(scenario.random_events, streams, strict=True):
        rate = gen.rate_per_hour / 3600.0
        t = stream.expovariate(rate)
        while t < horizon_s:
            pick = stream.random()
            if isinstance(gen, RandomStragglers):
                duration = None if gen.duration_s is None else _uniform(stream, gen.duration_s)
                target = {"worker": "*"} if gen.target == "worker" else {"node": "*"}
                add(
                    t,
                    "straggler",
                    factor=_uniform(stream, gen.factor),
                    duration_s=duration,
                    pick=pick,
                    **target,
                )
            elif isinstance(gen, RandomContention):
                # "*": one node matching the selector, chosen when the event fires.
                add(
                    t,
                    "contention",
                    node="*",
                    selector=dict(gen.selector),
                    cpus=_uniform(stream, gen.cpus),
                    duration_s=_uniform(stream, gen.duration_s),
                    pick=pick,
                )
            elif isinstance(gen, RandomFailures):
                add(t, "worker_failure", pick=pick)
            t += stream.expovariate(rate)

    events.sort()
    for seq, event in enumerate(events):
        event.seq = seq
    return events
