"""Simulator speed: agent decisions simulated per second on one core.

One decision = one agent interval (10 s of simulated time in the shipped scenarios): snapshot ->
policy.decide -> guardrails.filter -> simulator.apply -> simulator.advance. Prints decisions/s
for the shipped scenarios and two ratios measured in this run:
  * the full loop against the goal of 20,000 decisions/s (issue 3), with the Static policy
    (simulator cost) and with the Threshold policy (simulator plus a cheap heuristic);
  * the physics alone against a naive simulator that advances the same job one training step
    at a time (the peer an analytic, event-to-event simulator replaces), on the event-free
    scenarios, with completion times compared to show the two simulate the same job.

Usage: python bench/sim_speed.py [--scenarios DIR] [--seconds S]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from raysys.agent.env import resolve_scenarios
from raysys.agent.policies import make_policy
from raysys.agent.scenarios import LoadedScenario
from raysys.agent.sim import Simulator
from raysys.control.guardrails import Guardrails

GOAL = 20_000
REPO = Path(__file__).resolve().parents[1]


def analytic_rate(
    scenarios: list[LoadedScenario], policy_name: str | None, seconds: float
) -> float:
    """Decisions/s of the full loop; policy_name None times the physics alone (advance only)."""
    decisions, seed, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for scenario in scenarios:
            sim = Simulator(scenario, seed=seed)
            guard = Guardrails(scenario.spec.guardrails)
            if policy_name is None:
                while not sim.done:
                    sim.advance(sim.interval_s)
                    decisions += 1
                continue
            policy = make_policy(policy_name, cost_per_worker_second=sim.cost_per_worker_second)
            while not sim.done:
                snap = sim.snapshot()
                sim.apply(guard.filter(policy.decide(snap), snap))
                policy.learn()
                sim.advance(sim.interval_s)
                decisions += 1
        seed += 1
    return decisions / (time.perf_counter() - start)


def naive_episode(scenario: LoadedScenario, max_decisions: int | None = None) -> tuple[float, int]:
    """Step-by-step simulation of an event-free scenario at its initial allocation.

    Returns (completion time, decisions simulated). Every training step recomputes every
    worker's time, as a discrete-event simulator of the training loop would.
    """
    sim = Simulator(scenario, seed=0)  # only for the initial placement and batch split
    model, workers = sim.model, list(sim.workers.values())
    hosts = len({w.node for w in workers})
    batch, total, interval = sim.global_batch, sim.samples_total, sim.interval_s
    t, samples, decisions = 0.0, 0, 0
    while samples < total and (max_decisions is None or decisions < max_decisions):
        boundary = t + interval
        while t < boundary and samples < total:
            sync = model.sync_time(len(workers), hosts)
            step = 0.0
            for w in workers:
                node = sim.nodes[w.node]
                compute = model.compute_time(w.local_batch) / node.speed
                step = max(step, model.combine(compute, sync))
            t += step
            samples += batch
        decisions += 1
    return t, decisions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=str(REPO / "scenarios"))
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    scenarios = resolve_scenarios(args.scenarios)
    print(f"{len(scenarios)} scenarios from {args.scenarios}")

    static_rate = analytic_rate(scenarios, "static", args.seconds)
    threshold_rate = analytic_rate(scenarios, "threshold", args.seconds)
    print(
        f"analytic simulator, static policy:    {static_rate:10,.0f} decisions/s "
        f"(ratio to the {GOAL:,} goal: {static_rate / GOAL:.2f})"
    )
    print(
        f"analytic simulator, threshold policy: {threshold_rate:10,.0f} decisions/s "
        f"(ratio to the {GOAL:,} goal: {threshold_rate / GOAL:.2f})"
    )

    quiet = [s for s in scenarios if not s.spec.events and not s.spec.random_events]
    decisions, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for scenario in quiet:
            decisions += naive_episode(scenario, max_decisions=200)[1]
    naive_rate = decisions / (time.perf_counter() - start)
    quiet_rate = analytic_rate(quiet, None, args.seconds)
    print(f"physics alone (no snapshot, no policy) on the {len(quiet)} event-free scenarios:")
    print(f"  naive step-by-step simulator:       {naive_rate:10,.0f} decisions/s")
    print(
        f"  analytic simulator:                 {quiet_rate:10,.0f} decisions/s "
        f"(ratio to naive {quiet_rate / naive_rate:.1f}x)"
    )
    worst = 0.0
    for scenario in quiet:
        sim = Simulator(scenario, seed=0)
        sim.run_to_end()
        naive_time, _ = naive_episode(scenario)
        worst = max(worst, abs(naive_time - sim.time_s) / sim.time_s)
    print(
        f"completion time, analytic vs naive: max relative difference {worst:.2e} "
        f"(whole steps vs fractional last step)"
    )
    return 0 if static_rate >= GOAL and math.isfinite(static_rate) else 1


if __name__ == "__main__":
    raise SystemExit(main())
