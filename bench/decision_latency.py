"""Decision latency: Snapshot -> Decision for the rl, goodput and threshold policies, one CPU.

What the live AgentActor does every interval once it holds a Snapshot: policy.decide(snapshot)
then Guardrails.filter. For rl that is featurize, Guardrails.mask, the RLModule's forward pass
and the masked argmax. Snapshots come from simulated episodes of the shipped scenarios (the same
Snapshot type the live controller builds), so every policy is timed on the states it really
meets. torch runs on one thread, as on one CPU. Goal: rl p99 <= 5 ms.

Usage: python bench/decision_latency.py [--decisions N] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from raysys.agent.env import resolve_scenarios
from raysys.agent.policies import make_policy
from raysys.agent.sim import Simulator
from raysys.control.guardrails import Guardrails

REPO = Path(__file__).resolve().parents[1]
GOAL_P99_MS = 5.0


def latencies(policy_name: str, decisions: int, checkpoint: str | None) -> list[float]:
    """Seconds per Snapshot -> Decision over `decisions` decisions, cycling the scenarios."""
    import raysys.agent.rl.policy  # noqa: F401  (registers "rl")

    scenarios = resolve_scenarios(REPO / "scenarios")
    out: list[float] = []
    seed = 0
    while len(out) < decisions:
        for scenario in scenarios:
            lam = scenario.spec.objective.cost_per_worker_second
            kwargs = {"checkpoint": checkpoint} if policy_name == "rl" and checkpoint else {}
            policy = make_policy(policy_name, cost_per_worker_second=lam, **kwargs)
            guard = Guardrails(scenario.spec.guardrails)
            sim = Simulator(scenario, seed=seed)
            # A slice of each episode, so every scenario's states are represented.
            for _ in range(min(300, decisions - len(out))):
                if sim.done:
                    break
                snap = sim.snapshot()
                start = time.perf_counter()
                decision = guard.filter(policy.decide(snap), snap)
                out.append(time.perf_counter() - start)
                policy.learn()  # after the decision is out (the AgentActor's order)
                sim.apply(decision)
                sim.advance(sim.interval_s)
            if len(out) >= decisions:
                break
        seed += 1
    return out


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=1000, method="inclusive")[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--checkpoint", help="RLModule checkpoint (default: the shipped one)")
    parser.add_argument("--policies", default="rl,goodput,threshold")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'policy':<10} {'decisions':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in args.policies.split(","):
        xs = latencies(name, args.decisions, args.checkpoint)
        p50, p99 = percentile(xs, 0.5) * 1e3, percentile(xs, 0.99) * 1e3
        print(f"{name:<10} {len(xs):>9} {p50:>8.3f} {p99:>8.3f} {max(xs) * 1e3:>8.2f}")
        if name == "rl":
            verdict = "met" if p99 <= GOAL_P99_MS else "NOT met"
            print(f"{'':<10} rl p99 / goal {GOAL_P99_MS} ms = {p99 / GOAL_P99_MS:.2f} ({verdict})")


if __name__ == "__main__":
    main()
