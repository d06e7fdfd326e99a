"""`raysys agent ...`: evaluate policies, bound what any policy could score, fit step-time
profiles, train TabularQ and the RL policy, check scenarios.

raysys/cli.py mounts `app` as `raysys agent`; `main(["agent", ...])` and
`python -m raysys.agent.cli agent ...` run the same commands, with the same exit statuses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from raysys.yamlio import ConfigError

DEFAULT_POLICIES = "static,threshold,goodput"

app = typer.Typer(help="simulator, baselines and evaluation")

def fail(message: object, status: int = 2) -> NoReturn:
    """Print `error: message` to stderr and exit with `status` (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(status)


def _load(folder: str):
    from raysys.agent.scenarios import load_scenarios

    return load_scenarios(folder)


@app.command("eval")
def evaluate_policies(
    scenarios: Annotated[str, typer.Option(help="folder of scenario YAML files")] = "scenarios",
    policies: Annotated[str, typer.Option(
        help="comma list: static,threshold,goodput,tabularq,rl,oracle-static,...")
    ] = DEFAULT_POLICIES,
    rl_checkpoint: Annotated[str | None, typer.Option(
        help="RLModule checkpoint for rl (default: the shipped one)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 per scenario")] = 3,
    jobs: Annotated[int, typer.Option(help="worker processes")] = 1,
    json_path: Annotated[str, typer.Option("--json", help="where to write all results")
                         ] = "eval.json",
    tabular_table: Annotated[str | None, typer.Option(
        help="QTable JSON for tabularq (default: train one now)")] = None,
    tabular_episodes: int = 300,
) -> None:
    """score policies on scenarios against oracle-static"""
    from raysys.agent.evaluate import ORACLE, default_builder, evaluate

    try:
        loaded = _load(scenarios)
    except ConfigError as exc:
        fail(exc)
    names = [n.strip() for n in policies.split(",") if n.strip()]
    builders = {}
    for name in names:
        if name == ORACLE:
            continue  # always computed: it is the yardstick
        kwargs = {}
        if name == "tabularq":
            kwargs["table"] = _tabular_table(tabular_table, tabular_episodes, loaded)
        if name == "rl" and rl_checkpoint:
            kwargs["checkpoint"] = str(Path(rl_checkpoint).resolve())
        builders[name] = default_builder(name, **kwargs)
    if "rl" in builders:
        from raysys.agent.rl.policy import CheckpointError, RLPolicy

        try:  # fail here, with the path, rather than inside the first episode
            RLPolicy(checkpoint=dict(builders["rl"].kwargs).get("checkpoint"))
        except CheckpointError as exc:
            fail(exc)
    from raysys.agent.policies import available_policies

    unknown = [n for n in builders if n not in available_policies()]
    if unknown:
        fail(f"unknown policies {unknown}; known: {available_policies()}")
    start = time.perf_counter()
    report = evaluate(loaded, builders, list(range(seeds)), jobs=jobs)
    elapsed = time.perf_counter() - start
    print(report.table())
    path = report.to_json(json_path)
    print(f"\n{len(report.episodes)} episodes in {elapsed:.1f} s; results written to {path}")


@app.command()
def bound(
    scenarios: Annotated[str, typer.Option(help="folder of scenario YAML files")] = "scenarios",
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 per scenario")] = 3,
) -> None:
    """a score no policy can beat on each scenario, against oracle-static (raysys/agent/bound.py)"""
    from raysys.agent.bound import score_lower_bound
    from raysys.agent.evaluate import oracle_static

    if seeds < 1:
        fail("--seeds must be at least 1")
    try:
        loaded = _load(scenarios)
    except ConfigError as exc:
        fail(exc)
    print(f"{'scenario':<28} {'oracle-static':>13} {'bound':>9} {'bound / oracle':>15}")
    ratios = []
    for scenario in loaded:
        pairs = [(oracle_static(scenario, seed)[0].score, score_lower_bound(scenario, seed))
                 for seed in range(seeds)]
        oracle = sum(o for o, _ in pairs) / seeds
        lower = sum(b for _, b in pairs) / seeds
        ratio = sum(b / o for o, b in pairs) / seeds
        ratios.append(ratio)
        print(f"{scenario.name:<28} {oracle:>13.0f} {lower:>9.0f} {ratio:>15.3f}")
    print(f"{'mean':<28} {'':>13} {'':>9} {sum(ratios) / len(ratios):>15.3f}")
    print("\nno policy can score below the bound (the future known, every change free and "
          "instant;\nsee raysys/agent/bound.py); a policy's ratio to oracle-static minus the "
          "bound's is its most room")


def _tabular_table(table_path: str | None, episodes: int, scenarios):
    from raysys.agent.tabular_q import QTable, TabularQConfig, train_tabular_q

    if table_path:
        return QTable.load(table_path)
    start = time.perf_counter()
    # Training seeds are offset far from evaluation seeds 0..N-1 (see train_tabular_q).
    table = train_tabular_q(scenarios, TabularQConfig(episodes=episodes))
    print(
        f"trained tabularq: {episodes} episodes, {len(table.values)} states, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return table


@app.command()
def fit(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATHS",
        help="placements.csv files, trace folders, or trace names (cifar10, bert...)")],
    holdout_every: Annotated[int, typer.Option(help="hold out every N-th row")] = 5,
) -> None:
    """fit the step-time model to profiles, report held-out error"""
    from raysys.agent.profile_fit import fit_report, trace_profile

    status = 0
    print(f"{'profile':<48} {'train':>6} {'test':>5} {'median':>8} {'p90':>8} {'mean':>8}  params")
    for raw in paths:
        path = Path(raw)
        try:
            if not path.exists() and len(path.parts) == 1:
                path = trace_profile(raw)
            report = fit_report(path, holdout_every)
        except (OSError, ValueError) as exc:
            print(f"{raw:<48} error: {exc}")
            status = 1
            continue
        m = report.model
        params = (
            f"a={m.alpha_c:.3g} b={m.beta_c:.3g} c_local={m.alpha_r:.3g} "
            f"d_local={m.beta_r:.3g} c={m.alpha_n:.3g} d={m.beta_n:.3g} gamma={m.gamma:.3g}"
        )
        shown = "/".join(path.parts[-2:])
        print(
            f"{shown:<48} {report.train_rows:>6} {report.test_rows:>5} "
            f"{report.median_rel_error:>8.1%} {report.p90_rel_error:>8.1%} "
            f"{report.mean_rel_error:>8.1%}  {params}"
        )
    print(
        "relative error |predicted - measured| / measured step time on held-out rows "
        f"(every {holdout_every}th row); goal: median <= 10%"
    )
    raise typer.Exit(status)


@app.command("train-tabular")
def train_tabular(
    scenarios: str = "scenarios",
    episodes: int = 300,
    seed: int = 0,
    out: str = "tabularq.json",
) -> None:
    """train the TabularQ baseline in the simulator"""
    from raysys.agent.tabular_q import TabularQConfig, train_tabular_q

    try:
        loaded = _load(scenarios)
    except ConfigError as exc:
        fail(exc)
    start = time.perf_counter()
    scores: list[float] = []
    table = train_tabular_q(
        loaded,
        TabularQConfig(episodes=episodes, seed=seed),
        on_episode=lambda _, score: scores.append(score),
    )
    path = table.save(out)
    print(
        f"{episodes} episodes in {time.perf_counter() - start:.1f} s, "
        f"{len(table.values)} states; table written to {path}"
    )


@app.command()
def train(
    scenarios: str = "scenarios",
    out: Annotated[str, typer.Option(help="checkpoint, logs, evaluation")] = "runs/agent-train",
    seed: int = 0,
    minutes: Annotated[float, typer.Option(help="wall-clock budget for PPO")] = 25.0,
    iterations: Annotated[int, typer.Option(help="at most this many PPO iters")] = 10_000,
    exclude_trace: Annotated[list[str] | None, typer.Option(
        help="hold a Pollux trace out of training (repeatable), e.g. imagenet")] = None,
    keep_excluded_layouts: Annotated[bool, typer.Option(
        "--keep-excluded-layouts",
        help="keep the held-out trace's scenarios, with the other profiles swapped in")] = False,
    profile_csv: Annotated[list[str] | None, typer.Option(
        help="live profile to swap in")] = None,
    advisor: Annotated[bool, typer.Option(
        help="give the policy goodput's proposal as features and as one action, as the shipped "
             "policy has")] = True,
    prior: Annotated[str | None, typer.Option(
        help="behaviour-cloning start: 'advisor' (follow it everywhere; the default with "
             "--advisor), a heuristic to imitate (goodput; the default with --no-advisor), or "
             "'none' for PPO from a random network")
    ] = None,
    eval_seeds: Annotated[int, typer.Option(help="0: skip the evaluation")] = 10,
    ship: Annotated[bool, typer.Option(
        "--ship",
        help="also copy the trained RLModule to the shipped default policy folder")] = False,
) -> None:
    """train the RL policy (PPO, RLlib) in the simulator and evaluate it"""
    from raysys.agent.rl.card import ship as ship_module
    from raysys.agent.rl.card import training_command
    from raysys.agent.rl.train import TrainConfig
    from raysys.agent.rl.train import train as train_ppo

    cfg = TrainConfig(
        out=out,
        seed=seed,
        minutes=minutes,
        max_iterations=iterations,
        scenarios=scenarios,
        exclude_traces=tuple(exclude_trace or ()),
        keep_excluded_layouts=keep_excluded_layouts,
        profile_csvs=tuple(profile_csv or ()),
        advisor=advisor,
        prior=_prior(prior, advisor),
        eval_seeds=eval_seeds,
    )
    from raysys.progress import progress

    try:
        # The bar follows the PPO time budget; each iteration's line is printed above it.
        with progress("agent train", cfg.minutes * 60, by_time=True) as log:
            result = train_ppo(cfg, log=log, command=training_command())
    except (ConfigError, ValueError) as exc:
        fail(exc)
    print(
        f"{result.iterations} PPO iterations, {result.env_steps} env steps, "
        f"{result.train_seconds:.0f} s of PPO, {result.total_seconds:.0f} s in all; "
        f"RLModule in {result.module}, Algorithm checkpoint in {result.algorithm}, "
        f"TensorBoard logs in {result.out / 'tb'}"
    )
    if ship:
        print(f"shipped: {ship_module(result.out)}")


def _prior(given: str | None, advisor: bool) -> str | None:
    if given is None:
        return "advisor" if advisor else "goodput"
    return None if given.lower() == "none" else given


@app.command()
def check(
    scenarios: Annotated[list[str], typer.Argument(
        metavar="SCENARIOS", help="scenario files or folders")],
) -> None:
    """validate scenario files and show their initial state"""
    from raysys.agent.scenarios import load_scenario, scenario_files
    from raysys.agent.sim import Simulator

    status = 0
    for target in scenarios:
        try:
            files = scenario_files(target)
        except ConfigError as exc:
            print(f"error: {exc}")
            status = 1
            continue
        for file in files:
            try:
                scenario = load_scenario(file)
                sim = Simulator(scenario)
            except (ConfigError, ValueError) as exc:
                print(f"error: {exc}")
                status = 1
                continue
            eta = scenario.spec.episode.samples / sim.initial_rate
            print(
                f"ok {file}: {scenario.name}: {len(sim.workers)} workers, step "
                f"{sim.step_time_s:.3f} s, initial ETA {eta:.0f} s, "
                f"{sim.pending_events} events"
            )
    raise typer.Exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """`raysys` on `argv`, e.g. ["agent", "eval", ...]; returns the exit status (0 ok, 1 failed,
    2 usage error or bad input)."""
    from raysys.cli import main as raysys_main  # here: raysys.cli mounts this module's app

    return raysys_main(argv)


if __name__ == "__main__":
    sys.exit(main())
