"""The training distribution: the shipped scenarios, with profiles and lambda varied.

ClusterEnv already varies every episode's compute and sync times (lognormal), node speeds and
event times (sim_events.DEFAULT_VARIATION). On top of that the RL policy trains on variants of
each scenario:

* profile swaps: the scenario's step-time model replaced by another one from the pool (the
  Pollux traces, the parametric live-like profiles of the suite, profile CSVs measured by
  `raysys profile`), rescaled so that the initial allocation's step time is unchanged. What
  changes is the shape (compute vs sync, retrogression), so the policy cannot learn "this
  cluster layout means that many workers"; what stays is the scale of steps against the
  rescale stalls, which are absolute seconds.
* lambda: cost_per_worker_second multiplied by each of `lambda_scales`.

Scenarios as written make up `original_weight` of the draws (ClusterEnv draws uniformly from a
list, so they are repeated). A held-out trace (`exclude_traces`) never appears: not as a swap, and
its scenarios are dropped, or, with `keep_excluded_layouts`, kept only with their profile swapped
for one of the remaining ones (so an evaluation on them measures the unseen trace alone, not
also unseen cluster layouts and events).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raysys.agent.profile_fit import StepTimeModel, fit_profile
from raysys.agent.scenarios import LoadedScenario, ObjectiveSpec
from raysys.agent.sim import Simulator


def profile_name(scenario: LoadedScenario) -> str:
    """The trace name, 'csv:<file>' or 'parametric:<scenario>' of a scenario's profile."""
    p = scenario.spec.profile
    if p.trace is not None:
        return Path(p.trace).name
    if p.csv is not None:
        return f"csv:{Path(p.csv).name}"
    return f"parametric:{scenario.name}"


def profile_pool(
    scenarios: Sequence[LoadedScenario], extra_csvs: Sequence[str | Path] = ()
) -> dict[str, StepTimeModel]:
    """Every distinct profile of the scenarios plus measured profile CSVs. A trace is taken from
    a scenario that does not scale it (compute_scale/sync_scale change its shape)."""
    pool: dict[str, StepTimeModel] = {}
    unscaled_first = sorted(
        scenarios, key=lambda s: (s.spec.profile.compute_scale, s.spec.profile.sync_scale) != (1, 1)
    )
    for s in unscaled_first:
        pool.setdefault(profile_name(s), s.model)
    for csv in extra_csvs:
        pool[f"csv:{Path(csv).name}"] = fit_profile(csv)
    return pool


def _initial_step_time(scenario: LoadedScenario) -> float:
    return Simulator(scenario, seed=0).step_time_s


def with_profile(scenario: LoadedScenario, model: StepTimeModel, label: str) -> LoadedScenario:
    """The scenario with another step-time model, scaled to the same initial step time."""
    probe = LoadedScenario(scenario.spec, model, scenario.source)
    k = _initial_step_time(scenario) / _initial_step_time(probe)
    spec = scenario.spec.model_copy(update={"name": f"{scenario.name}~{label}"})
    return LoadedScenario(spec, model.scaled(k, k), scenario.source)


def with_lambda(scenario: LoadedScenario, scale: float) -> LoadedScenario:
    if scale == 1.0:
        return scenario
    lam = scenario.spec.objective.cost_per_worker_second * scale
    spec = scenario.spec.model_copy(
        update={
            "name": f"{scenario.name}~lambda{scale:g}",
            "objective": ObjectiveSpec(cost_per_worker_second=lam),
        }
    )
    return LoadedScenario(spec, scenario.model, scenario.source)


def training_distribution(
    scenarios: Sequence[LoadedScenario],
    exclude_traces: Sequence[str] = (),
    swap_profiles: bool = True,
    lambda_scales: Sequence[float] = (0.5, 1.0, 2.0),
    original_weight: float = 0.75,
    extra_csvs: Sequence[str | Path] = (),
    keep_excluded_layouts: bool = False,
) -> list[LoadedScenario]:
    """A list to draw episodes from uniformly (ClusterEnv's `scenarios`)."""
    excluded = set(exclude_traces)
    kept = [s for s in scenarios if profile_name(s) not in excluded]
    if not kept:
        raise ValueError(f"every scenario uses an excluded trace {sorted(excluded)}")
    pool = {k: m for k, m in profile_pool(scenarios, extra_csvs).items() if k not in excluded}
    variants: list[LoadedScenario] = []
    if keep_excluded_layouts:
        for s in scenarios:
            if profile_name(s) in excluded:
                variants += [
                    with_lambda(with_profile(s, m, k), scale)
                    for k, m in pool.items()
                    for scale in lambda_scales
                ]
    for s in kept:
        own = profile_name(s)
        profiles = [(own, s)]
        if swap_profiles:
            profiles += [(k, with_profile(s, m, k)) for k, m in pool.items() if k != own]
        for label, base in profiles:
            for scale in lambda_scales:
                if label == own and scale == 1.0:
                    continue  # the scenario as written: added below with its own weight
                variants.append(with_lambda(base, scale))
    if not variants or original_weight >= 1.0:
        return list(kept)
    # Repeat originals (and variants) so originals are ~original_weight of uniform draws.
    copies = max(1, round(original_weight / (1 - original_weight) * len(variants) / len(kept)))
    return [s for s in kept for _ in range(copies)] + variants
