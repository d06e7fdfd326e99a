"""Agent quality: the RL policy against the heuristic baselines on the shipped scenario suite.

Runs the evaluator (oracle-static, static, threshold, goodput, rl) over seeds 0..N-1 of every
shipped scenario and prints, measured in this run:

* the evaluator's table (score and ratio to oracle-static per scenario and policy);
* aggregate: mean over scenarios of the ratio to oracle-static, for each policy, and the RL
  policy's improvement over the best heuristic by that measure (goal: >= 15%);
* per scenario: rl score / the better of threshold and goodput on that scenario (goal: <= 1.02);
* with --heldout-checkpoint: the same for a policy trained without one Pollux trace
  (`raysys agent train --exclude-trace imagenet`), on the scenarios built from that trace.

Usage: python bench/agent_quality.py [--seeds 10] [--checkpoint PATH]
           [--heldout-checkpoint PATH --heldout-trace imagenet] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raysys.agent.env import resolve_scenarios
from raysys.agent.evaluate import EvalReport, default_builder, evaluate
from raysys.agent.rl.distribution import profile_name

REPO = Path(__file__).resolve().parents[1]
HEURISTICS = ("threshold", "goodput")
GOAL_AGGREGATE = 0.15
GOAL_PER_SCENARIO = 1.02


def run(scenarios: list, checkpoint: str | None, seeds: int) -> EvalReport:
    import raysys.agent.rl.policy  # noqa: F401  (registers "rl")

    builders = {name: default_builder(name) for name in ("static", *HEURISTICS)}
    rl_kwargs = {"checkpoint": str(Path(checkpoint).resolve())} if checkpoint else {}
    builders["rl"] = default_builder("rl", **rl_kwargs)
    return evaluate(scenarios, builders, list(range(seeds)))


def compare(report: EvalReport, title: str) -> dict:
    """Aggregate and per-scenario comparison of rl with the heuristics; prints and returns it."""
    rows = report.summary()
    cell = {(r["scenario"], r["policy"]): r for r in rows}
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    policies = ["static", *HEURISTICS, "rl"]
    mean_ratio = {
        p: sum(cell[(s, p)]["ratio"] for s in scenarios) / len(scenarios) for p in policies
    }
    best = min(HEURISTICS, key=lambda p: mean_ratio[p])
    improvement = 1.0 - mean_ratio["rl"] / mean_ratio[best]
    print(f"\n== {title}")
    print(report.table())
    print(f"\n{'scenario':<24} {'rl':>9} {'best heuristic':>20} {'rl / best':>10}")
    per = {}
    for s in scenarios:
        h = min(HEURISTICS, key=lambda p: cell[(s, p)]["score"])
        ratio = cell[(s, "rl")]["score"] / cell[(s, h)]["score"]
        per[s] = {"rl": cell[(s, "rl")]["score"], "best": h, "best_score": cell[(s, h)]["score"],
                  "ratio": ratio}
        flag = "" if ratio <= GOAL_PER_SCENARIO else "  > 1.02"
        print(f"{s:<24} {per[s]['rl']:>9.0f} {h:>9} {per[s]['best_score']:>10.0f} "
              f"{ratio:>10.3f}{flag}")
    worst = max(per.values(), key=lambda v: v["ratio"])["ratio"]
    print(
        "\nmean ratio to oracle-static: "
        + ", ".join(f"{p} {mean_ratio[p]:.3f}" for p in policies)
        + f"\nrl improvement over the best heuristic ({best}) in aggregate: {improvement:+.1%} "
        f"(goal >= {GOAL_AGGREGATE:.0%}: {'met' if improvement >= GOAL_AGGREGATE else 'NOT met'})"
        f"\nworst scenario rl / best heuristic: {worst:.3f} "
        f"(goal <= {GOAL_PER_SCENARIO}: {'met' if worst <= GOAL_PER_SCENARIO else 'NOT met'}); "
        f"scenarios over: {sum(v['ratio'] > GOAL_PER_SCENARIO for v in per.values())}/{len(per)}"
    )
    return {"mean_ratio": mean_ratio, "best_heuristic": best, "improvement": improvement,
            "per_scenario": per, "worst_ratio": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--scenarios", default=str(REPO / "scenarios"))
    parser.add_argument("--checkpoint", help="RLModule checkpoint (default: the shipped one)")
    parser.add_argument("--heldout-checkpoint", help="policy trained without --heldout-trace")
    parser.add_argument("--heldout-trace", default="imagenet")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = resolve_scenarios(args.scenarios)
    start = time.perf_counter()
    results = {"suite": compare(run(scenarios, args.checkpoint, args.seeds),
                                f"shipped suite, {args.seeds} seeds")}
    if args.heldout_checkpoint:
        held = [s for s in scenarios if profile_name(s) == args.heldout_trace]
        report = run(held, args.heldout_checkpoint, args.seeds)
        results["heldout"] = compare(
            report, f"held-out trace {args.heldout_trace}: policy trained without it"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
