"""Agent bound: how much better than goodput could any policy be on the shipped suite?

The quality goal asks the RL policy to beat the best heuristic (goodput) by 15% in aggregate.
bench/agent_headroom.py measures what one step of clairvoyant improvement over goodput finds;
this script bounds what *any* policy could find: for every scenario and seed it computes
raysys.agent.bound.score_lower_bound (a relaxation no sequence of decisions can beat: a
policy that knows the future and rescales, replaces and moves workers instantly and for free;
the module docstring says exactly what is relaxed), and compares it with goodput's score, both
as ratios to oracle-static as bench/agent_quality.py does. "Most any policy gains" is
1 - bound / goodput: no policy, causal or clairvoyant, RL or not, can do better than that.

    .venv/bin/python bench/agent_bound.py [--seeds 10] [--scenarios a,b] [--jobs 2]
        [--json bench/results/agent_bound.json]

(10 seeds: ~25 s on 2 cores, nearly all of it oracle-static's search.)
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from common import shipped_scenarios

from raysys.agent.bound import score_lower_bound
from raysys.agent.evaluate import default_builder, oracle_static, run_episode
from raysys.agent.scenarios import LoadedScenario

REPO = Path(__file__).resolve().parents[1]
GOAL_AGGREGATE = 0.15


@dataclass
class Row:
    scenario: str
    seed: int
    oracle: float
    goodput: float
    bound: float
    seconds: float


def measure(args: tuple[LoadedScenario, int]) -> Row:
    scenario, seed = args
    start = time.time()
    oracle, _ = oracle_static(scenario, seed)
    goodput = run_episode(scenario, default_builder("goodput")(scenario), seed)
    return Row(scenario.name, seed, oracle.score, goodput.score, score_lower_bound(scenario, seed),
               time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--scenarios", default=None, help="comma-separated names (default all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "bench/results/agent_bound.json"))
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    scenarios = shipped_scenarios(parser, args.scenarios or "")
    tasks = [(s, seed) for s in scenarios for seed in range(args.seeds)]
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(measure, tasks))
    print(f"\n{'scenario':<24} {'goodput':>8} {'bound':>8} {'most any policy gains':>22}")
    per: dict[str, dict[str, float]] = {}
    for s in scenarios:
        mine = [r for r in rows if r.scenario == s.name]
        g = sum(r.goodput / r.oracle for r in mine) / len(mine)
        b = sum(r.bound / r.oracle for r in mine) / len(mine)
        per[s.name] = {"goodput": g, "bound": b, "gain": 1 - b / g}
        print(f"{s.name:<24} {g:>8.3f} {b:>8.3f} {1 - b / g:>22.1%}")
    g = sum(v["goodput"] for v in per.values()) / len(per)
    b = sum(v["bound"] for v in per.values()) / len(per)
    print(f"{'mean ratio to oracle-static':<24} {g:>8.3f} {b:>8.3f} {1 - b / g:>22.1%}")
    print(f"\nno policy can beat goodput by more than {1 - b / g:.1%} in aggregate "
          f"(goal {GOAL_AGGREGATE:.0%}); {time.time() - start:.0f} s")
    Path(args.json).write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "per_scenario": per,
         "aggregate": {"goodput": g, "bound": b, "gain": 1 - b / g}}, indent=1))


if __name__ == "__main__":
    main()
