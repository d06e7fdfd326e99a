"""Evaluator: every policy on every scenario over seeds, scored against the best static allocation.

For a scenario and a seed the events are fixed (sim_events), so all policies face the same
cluster. The yardstick is oracle-static: every feasible fixed allocation run to the end with that
seed, the best one kept (hindsight). Scores are per scenario and policy: mean and 95% interval
over seeds of the score and of score / oracle-static score (docs/agent.md).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from raysys.agent.policies import Policy, make_policy
from raysys.agent.scenarios import LoadedScenario
from raysys.agent.sim import Simulator
from raysys.control.decisions import Noop
from raysys.control.guardrails import Guardrails

ORACLE = "oracle-static"
MAX_ENUMERATED = 4096  # beyond this many allocations, search coordinate-wise instead


@dataclass(frozen=True)
class EpisodeResult:
    scenario: str
    policy: str
    seed: int
    score: float
    completion_time_s: float
    worker_seconds: float
    finished: bool
    decisions: int
    actions: int


def run_episode(
    scenario: LoadedScenario,
    policy: Policy,
    seed: int,
    initial_workers: dict[str, int] | None = None,
    label: str | None = None,
) -> EpisodeResult:
    """One episode: every interval, snapshot -> policy -> guardrails -> simulator."""
    sim = Simulator(scenario, seed=seed, initial_workers=initial_workers)
    guard = Guardrails(scenario.spec.guardrails)
    policy.reset()
    if policy.never_acts:
        sim.run_to_end()
        decisions = actions = 0
    else:
        decisions, actions = play_to_end(sim, policy, guard)
    return EpisodeResult(
        scenario.name,
        label or policy.name,
        seed,
        sim.score,
        sim.time_s,
        sim.worker_seconds,
        sim.finished,
        decisions,
        actions,
    )


def play_to_end(sim: Simulator, policy: Policy, guard: Guardrails) -> tuple[int, int]:
    """Every interval until the job ends: snapshot -> policy -> guardrails -> simulator.

    Returns (decisions taken, decisions that changed the cluster)."""
    decisions = actions = 0
    while not sim.done:
        snap = sim.snapshot()
        decision = guard.filter(policy.decide(snap), snap)
        policy.learn()
        decisions += 1
        if not isinstance(decision, Noop) and sim.apply(decision):
            actions += 1
        sim.advance(sim.interval_s)
    return decisions, actions


def static_allocations(scenario: LoadedScenario) -> list[dict[str, int]]:
    ranges = [range(p.min_workers, p.max_workers + 1) for p in scenario.spec.partners]
    names = [p.name for p in scenario.spec.partners]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*ranges)]


def oracle_static(scenario: LoadedScenario, seed: int) -> tuple[EpisodeResult, dict[str, int]]:
    """Best fixed allocation in hindsight for this seed (exhaustive when small enough)."""
    static = make_policy("static")
    cache: dict[tuple, EpisodeResult | None] = {}

    def score(alloc: dict[str, int]) -> EpisodeResult | None:
        key = tuple(sorted(alloc.items()))
        if key not in cache:
            try:
                cache[key] = run_episode(scenario, static, seed, alloc, label=ORACLE)
            except ValueError:  # this allocation does not fit on the initial nodes
                cache[key] = None
        return cache[key]

    allocations = static_allocations(scenario)
    if len(allocations) <= MAX_ENUMERATED:
        results = [(score(a), a) for a in allocations]
    else:
        results = _coordinate_search(scenario, score)
    feasible = [(r, a) for r, a in results if r is not None]
    best, alloc = min(feasible, key=lambda ra: (ra[0].score, sorted(ra[1].items())))
    return best, alloc


def _coordinate_search(scenario: LoadedScenario, score: Callable) -> list:
    current = {p.name: p.workers for p in scenario.spec.partners}
    seen = [(score(current), dict(current))]
    improved = True
    while improved:
        improved = False
        for p in scenario.spec.partners:
            for n in range(p.min_workers, p.max_workers + 1):
                option = {**current, p.name: n}
                result = score(option)
                seen.append((result, option))
                best = score(current)
                if result is not None and (best is None or result.score < best.score):
                    current, improved = option, True
    return seen


def _t95(n: int) -> float:
    if n < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _t95(n) * sd / math.sqrt(n)


@dataclass
class EvalReport:
    episodes: list[EpisodeResult]
    oracle_allocations: dict[str, dict[int, dict[str, int]]]

    def summary(self) -> list[dict]:
        oracle = {(e.scenario, e.seed): e.score for e in self.episodes if e.policy == ORACLE}
        groups: dict[tuple[str, str], list[EpisodeResult]] = {}
        for e in self.episodes:
            groups.setdefault((e.scenario, e.policy), []).append(e)
        rows = []
        for (scenario, policy), eps in groups.items():
            score, score_ci = mean_ci([e.score for e in eps])
            ratio, ratio_ci = mean_ci([e.score / oracle[(e.scenario, e.seed)] for e in eps])
            rows.append(
                {
                    "scenario": scenario,
                    "policy": policy,
                    "seeds": len(eps),
                    "score": score,
                    "score_ci95": score_ci,
                    "ratio": ratio,
                    "ratio_ci95": ratio_ci,
                    "finished": sum(e.finished for e in eps),
                    "actions": sum(e.actions for e in eps) / len(eps),
                }
            )
        return rows

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "summary": self.summary(),
            "episodes": [asdict(e) for e in self.episodes],
            "oracle_allocations": self.oracle_allocations,
        }
        path.write_text(json.dumps(payload, indent=1, default=str))
        return path

    def table(self) -> str:
        rows = self.summary()
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
        cell = {(r["scenario"], r["policy"]): r for r in rows}

        def fmt(r: dict) -> str:
            ci = "" if math.isnan(r["ratio_ci95"]) else f"±{r['ratio_ci95']:.3f}"
            return f"{r['score']:9.0f} ({r['ratio']:.3f}{ci})"

        width = max(24, max(len(fmt(r)) for r in rows))
        head = f"{'scenario':<24}" + "".join(f"{p:>{width + 2}}" for p in policies)
        lines = [head, "-" * len(head)]
        for s in scenarios:
            lines.append(
                f"{s:<24}"
                + "".join(
                    f"{fmt(cell[(s, p)]) if (s, p) in cell else '-':>{width + 2}}" for p in policies
                )
            )
        means = []
        for p in policies:
            ratios = [cell[(s, p)]["ratio"] for s in scenarios if (s, p) in cell]
            means.append(f"{sum(ratios) / len(ratios):.3f}")
        lines.append(f"{'mean ratio to oracle':<24}" + "".join(f"{m:>{width + 2}}" for m in means))
        lines.append(
            "score = completion time + lambda * worker-seconds (mean over seeds); "
            "(ratio to oracle-static ±95% CI)"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class PolicyBuilder:
    """Builds policy `name` for a scenario with that scenario's lambda (and guardrails, for
    policies that mask actions themselves). A plain object, so it can cross process bounds."""

    name: str
    kwargs: tuple[tuple[str, object], ...] = ()

    def __call__(self, scenario: LoadedScenario) -> Policy:
        extra = dict(self.kwargs)
        extra["cost_per_worker_second"] = scenario.spec.objective.cost_per_worker_second
        if self.name == "tabularq":
            extra.setdefault("guardrails", scenario.spec.guardrails)
        return make_policy(self.name, **extra)


def default_builder(name: str, **kwargs) -> PolicyBuilder:
    return PolicyBuilder(name, tuple(sorted(kwargs.items())))


def _evaluate_one(args: tuple) -> tuple[list[EpisodeResult], dict[str, int]]:
    scenario, builders, seed = args
    oracle, alloc = oracle_static(scenario, seed)
    results = [oracle]
    for name, build in builders.items():
        if name != ORACLE:
            results.append(run_episode(scenario, build(scenario), seed, label=name))
    return results, alloc


def evaluate(
    scenarios: Sequence[LoadedScenario],
    builders: dict[str, PolicyBuilder],
    seeds: Sequence[int],
    jobs: int = 1,
) -> EvalReport:
    """Run every (scenario, seed) with oracle-static and each policy; results are the same
    whatever `jobs` (processes) is."""
    tasks = [(s, builders, seed) for s in scenarios for seed in seeds]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            outputs = list(pool.map(_evaluate_one, tasks))
    else:
        outputs = [_evaluate_one(t) for t in tasks]
    episodes: list[EpisodeResult] = []
    allocations: dict[str, dict[int, dict[str, int]]] = {}
    for (scenario, _, seed), (results, alloc) in zip(tasks, outputs, strict=True):
        episodes.extend(results)
        allocations.setdefault(scenario.name, {})[seed] = alloc
    return EvalReport(episodes, allocations)
