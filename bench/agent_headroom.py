"""Agent headroom: how much better than a heuristic could a policy do on the shipped suite?

The quality goal asks the RL policy to beat the best heuristic (goodput) by 15% in aggregate.
This estimates what is there to win with one step of *clairvoyant* policy improvement over
goodput. At each decision point (every `--every`-th one), every action the Guardrails allow (the
RL policy's action space: one partner +1 or -1, replace its slowest worker, rebalance it; plus
goodput's own proposal) is tried on a copy of the simulator and goodput plays each copy to the
end; the action with the best final score is taken. The copies share the episode's seed, so
every rollout sees the very future the episode will meet (events, noise).

What the figure is and is not: clairvoyance makes it optimistic (no causal policy knows the
future; part of the gain is rebalancing on noise that is known in advance), while one step at
a time and one worker per move make it conservative (a policy changing several decisions
together, or far from goodput, could find more). It is policy iteration's first step, usually
its largest: a gain of a few percent here says 15% would need a policy unlike any improvement
of goodput, not a better choice now and then.

The gain is given twice: over all decision points, and with the first decision left to
goodput. At the first one goodput has seen a single configuration; what wins there is mostly
knowing the scenario (which workers sit on slow nodes, what is about to fail).

    .venv/bin/python bench/agent_headroom.py [--seeds 0] [--every 4] [--jobs 2]
        [--scenarios a,b] [--base goodput] [--json bench/results/agent_headroom.json]

(3 seeds: ~50 min on 2 cores, most of it long_mixed; one seed of the other 13: ~5 min.)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import shipped_scenarios

from raysys.agent.actions import ActionSpace
from raysys.agent.evaluate import default_builder, oracle_static, play_to_end, run_episode
from raysys.agent.policies import Policy, available_policies
from raysys.agent.scenarios import LoadedScenario
from raysys.agent.sim import Simulator
from raysys.control.decisions import Decision, Noop, describe
from raysys.control.guardrails import Guardrails

REPO = Path(__file__).resolve().parents[1]
GOAL_AGGREGATE = 0.15


@dataclass
class Episode:
    scenario: str
    seed: int
    oracle: float
    base: float
    lookahead: float  # every considered decision point
    lookahead_after_start: float  # the same, the first decision left to the base policy
    deviations: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rollout(sim: Simulator, policy: Policy, guard: Guardrails, first: Decision,
            memo: dict) -> float:
    """Final score of `first` now, then `policy` to the end, on copies (the real ones untouched)."""
    sim, policy = copy.deepcopy(sim, dict(memo)), copy.deepcopy(policy, dict(memo))
    if not isinstance(first, Noop):
        sim.apply(first)
    sim.advance(sim.interval_s)
    play_to_end(sim, policy, guard)
    return sim.score


def improved_episode(scenario: LoadedScenario, seed: int, base: str, every: int,
                     skip_first: bool, deviations: list[str] | None = None) -> tuple[float, bool]:
    """The base policy, except where a clairvoyant rollout finds a better action.

    Returns the final score and whether the first decision was changed."""
    memo = {id(scenario): scenario}  # shared, read-only: not copied into every rollout
    sim = Simulator(scenario, seed=seed)
    policy = default_builder(base)(scenario)
    policy.reset()
    guard = Guardrails(scenario.spec.guardrails)
    space = ActionSpace()
    index = 0
    changed_first = False
    while not sim.done:
        snap = sim.snapshot()
        proposed = guard.filter(policy.decide(snap), snap)
        policy.learn()
        chosen = proposed
        considered = index % every == 0 and not (skip_first and index == 0)
        allowed = guard.mask(snap, space) if considered else None
        if allowed is not None and allowed[1:].any():
            candidates = {describe(proposed): proposed}
            for i in range(space.n):
                if allowed[i]:
                    d = guard.filter(space.decode(i, snap), snap)
                    candidates.setdefault(describe(d), d)
            scores = {k: rollout(sim, policy, guard, d, memo) for k, d in candidates.items()}
            best = min(scores, key=scores.get)
            # Ties go to the base policy's own choice: a deviation must be strictly better.
            if scores[best] < scores[describe(proposed)] - 1e-9:
                chosen = candidates[best]
                changed_first = changed_first or index == 0
                if deviations is not None:
                    deviations.append(f"t={snap.time_s:.0f}s {describe(proposed)} -> {best} "
                                      f"(score -{scores[describe(proposed)] - scores[best]:.0f})")
        index += 1
        if not isinstance(chosen, Noop):
            sim.apply(chosen)
        sim.advance(sim.interval_s)
    return sim.score, changed_first


def measure(args: tuple[LoadedScenario, int, str, int]) -> Episode:
    scenario, seed, base, every = args
    t0 = time.time()
    oracle, _ = oracle_static(scenario, seed)
    plain = run_episode(scenario, default_builder(base)(scenario), seed)
    deviations: list[str] = []
    full, changed_first = improved_episode(scenario, seed, base, every, False, deviations)
    # Episodes are deterministic: where the first decision stood, the run without it is this one.
    later = improved_episode(scenario, seed, base, every, True)[0] if changed_first else full
    return Episode(scenario.name, seed, oracle.score, plain.score, full, later, deviations,
                   time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--every", type=int, default=4,
                        help="consider every N-th decision point (1: all; slower)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scenarios", default="", help="comma-separated names (default: all)")
    parser.add_argument("--base", default="goodput")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "agent_headroom.json"))
    args = parser.parse_args()
    if args.every < 1:
        parser.error("--every must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.base not in available_policies():
        parser.error(f"--base: unknown policy {args.base!r}; known: {available_policies()}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    scenarios = shipped_scenarios(parser, args.scenarios or "")
    # The longest episodes go first so the pool's workers finish together.
    tasks = sorted(((s, seed, args.base, args.every) for s in scenarios for seed in seeds),
                   key=lambda t: -t[0].spec.episode.samples)
    with ProcessPoolExecutor(args.jobs) as pool:
        episodes = list(pool.map(measure, tasks))
    episodes.sort(key=lambda e: (e.scenario, e.seed))

    print(f"one-step clairvoyant improvement over {args.base} at 1 decision point in {args.every}, "
          f"seeds {args.seeds}; ratios to oracle-static (lower is better)\n")
    print(f"{'scenario':<24} {args.base:>8} {'improved':>9} {'gain':>6} {'w/o first':>10} "
          f"{'gain':>6}  deviations")
    by_scenario: dict[str, list[Episode]] = {}
    for e in episodes:
        by_scenario.setdefault(e.scenario, []).append(e)
    means = {"base": [], "full": [], "later": []}
    for name, eps in by_scenario.items():
        base = sum(e.base / e.oracle for e in eps) / len(eps)
        full = sum(e.lookahead / e.oracle for e in eps) / len(eps)
        later = sum(e.lookahead_after_start / e.oracle for e in eps) / len(eps)
        means["base"].append(base)
        means["full"].append(full)
        means["later"].append(later)
        first = next((e.deviations[:2] for e in eps if e.deviations), [])  # examples
        more = sum(len(e.deviations) for e in eps) - len(first)
        print(f"{name:<24} {base:8.3f} {full:9.3f} {100 * (1 - full / base):5.1f}% "
              f"{later:10.3f} {100 * (1 - later / base):5.1f}%  "
              f"{'; '.join(first)}{f' (+{more})' if more > 0 else ''}")
    agg = {k: sum(v) / len(v) for k, v in means.items()}
    gain_full = 1 - agg["full"] / agg["base"]
    gain_later = 1 - agg["later"] / agg["base"]
    print(f"\n{'aggregate':<24} {agg['base']:8.3f} {agg['full']:9.3f} {100 * gain_full:5.1f}% "
          f"{agg['later']:10.3f} {100 * gain_later:5.1f}%")
    print(f"the quality goal asks rl for {100 * GOAL_AGGREGATE:.0f}% over the best heuristic; "
          f"clairvoyant one-step improvement finds {100 * gain_full:.1f}% "
          f"({100 * gain_later:.1f}% after the first decision)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": args.base, "every": args.every, "seeds": seeds,
                               "aggregate": agg, "episodes": [asdict(e) for e in episodes]},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
