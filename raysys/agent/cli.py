"""`raysys agent ...`: evaluate policies, fit step-time profiles, train TabularQ and the RL policy,
check scenarios.

raysys/cli.py adds these with add_agent_parser(subparsers); every subcommand sets `func`, which
returns the exit code. `python -m raysys.agent.cli agent ...` runs them stand-alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raysys.yamlio import ConfigError

DEFAULT_POLICIES = "static,threshold,goodput"


def add_agent_parser(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser("agent", help="simulator, baselines and evaluation")
    sub = agent.add_subparsers(dest="agent_command", required=True)

    ev = sub.add_parser("eval", help="score policies on scenarios against oracle-static")
    ev.add_argument("--scenarios", default="scenarios", help="folder of scenario YAML files")
    ev.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma list: static,threshold,goodput,tabularq,rl,oracle-static,...",
    )
    ev.add_argument("--rl-checkpoint", help="RLModule checkpoint for rl (default: the shipped one)")
    ev.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per scenario")
    ev.add_argument("--jobs", type=int, default=1, help="worker processes")
    ev.add_argument("--json", default="eval.json", help="where to write all results")
    ev.add_argument("--tabular-table", help="QTable JSON for tabularq (default: train one now)")
    ev.add_argument("--tabular-episodes", type=int, default=300)
    ev.set_defaults(func=cmd_eval)

    fit = sub.add_parser("fit", help="fit the step-time model to profiles, report held-out error")
    fit.add_argument(
        "paths",
        nargs="+",
        help="placements.csv files, trace folders, or trace names (cifar10, bert...)",
    )
    fit.add_argument("--holdout-every", type=int, default=5, help="hold out every N-th row")
    fit.set_defaults(func=cmd_fit)

    train = sub.add_parser("train-tabular", help="train the TabularQ baseline in the simulator")
    train.add_argument("--scenarios", default="scenarios")
    train.add_argument("--episodes", type=int, default=300)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="tabularq.json")
    train.set_defaults(func=cmd_train_tabular)

    rl = sub.add_parser(
        "train", help="train the RL policy (PPO, RLlib) in the simulator and evaluate it"
    )
    rl.add_argument("--scenarios", default="scenarios")
    rl.add_argument("--out", default="runs/agent-train", help="checkpoint, logs, evaluation")
    rl.add_argument("--seed", type=int, default=0)
    rl.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for PPO")
    rl.add_argument("--iterations", type=int, default=10_000, help="at most this many PPO iters")
    rl.add_argument(
        "--exclude-trace",
        action="append",
        default=[],
        help="hold a Pollux trace out of training (repeatable), e.g. imagenet",
    )
    rl.add_argument(
        "--keep-excluded-layouts",
        action="store_true",
        help="keep the held-out trace's scenarios, with the other profiles swapped in",
    )
    rl.add_argument("--profile-csv", action="append", default=[], help="live profile to swap in")
    rl.add_argument("--prior", default="goodput", help="teacher for the behaviour-cloning start, "
                    "or 'none' for PPO from a random network")
    rl.add_argument("--eval-seeds", type=int, default=10, help="0: skip the evaluation")
    rl.add_argument("--ship", action="store_true",
                    help="also copy the trained RLModule to the shipped default policy folder")
    rl.set_defaults(func=cmd_train_rl)

    check = sub.add_parser("check", help="validate scenario files and show their initial state")
    check.add_argument("scenarios", nargs="+", help="scenario files or folders")
    check.set_defaults(func=cmd_check)


def _load(folder: str):
    from raysys.agent.scenarios import load_scenarios

    return load_scenarios(folder)


def cmd_eval(args: argparse.Namespace) -> int:
    from raysys.agent.evaluate import ORACLE, default_builder, evaluate

    try:
        scenarios = _load(args.scenarios)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    builders = {}
    for name in names:
        if name == ORACLE:
            continue  # always computed: it is the yardstick
        kwargs = {}
        if name == "tabularq":
            kwargs["table"] = _tabular_table(args, scenarios)
        if name == "rl" and args.rl_checkpoint:
            kwargs["checkpoint"] = str(Path(args.rl_checkpoint).resolve())
        builders[name] = default_builder(name, **kwargs)
    if "rl" in builders:
        from raysys.agent.rl.policy import CheckpointError, RLPolicy

        try:  # fail here, with the path, rather than inside the first episode
            RLPolicy(checkpoint=dict(builders["rl"].kwargs).get("checkpoint"))
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from raysys.agent.policies import available_policies

    unknown = [n for n in builders if n not in available_policies()]
    if unknown:
        print(f"error: unknown policies {unknown}; known: {available_policies()}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = evaluate(scenarios, builders, list(range(args.seeds)), jobs=args.jobs)
    elapsed = time.perf_counter() - start
    print(report.table())
    path = report.to_json(args.json)
    print(f"\n{len(report.episodes)} episodes in {elapsed:.1f} s; results written to {path}")
    return 0


def _tabular_table(args: argparse.Namespace, scenarios):
    from raysys.agent.tabular_q import QTable, TabularQConfig, train_tabular_q

    if args.tabular_table:
        return QTable.load(args.tabular_table)
    start = time.perf_counter()
    # Training seeds are offset far from evaluation seeds 0..N-1 (see train_tabular_q).
    table = train_tabular_q(scenarios, TabularQConfig(episodes=args.tabular_episodes))
    print(
        f"trained tabularq: {args.tabular_episodes} episodes, {len(table.values)} states, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return table


def cmd_fit(args: argparse.Namespace) -> int:
    from raysys.agent.profile_fit import fit_report, trace_profile

    status = 0
    print(f"{'profile':<48} {'train':>6} {'test':>5} {'median':>8} {'p90':>8} {'mean':>8}  params")
    for raw in args.paths:
        path = Path(raw)
        try:
            if not path.exists() and len(path.parts) == 1:
                path = trace_profile(raw)
            report = fit_report(path, args.holdout_every)
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
        f"(every {args.holdout_every}th row); goal: median <= 10%"
    )
    return status


def cmd_train_tabular(args: argparse.Namespace) -> int:
    from raysys.agent.tabular_q import TabularQConfig, train_tabular_q

    try:
        scenarios = _load(args.scenarios)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    scores: list[float] = []
    table = train_tabular_q(
        scenarios,
        TabularQConfig(episodes=args.episodes, seed=args.seed),
        on_episode=lambda _, score: scores.append(score),
    )
    path = table.save(args.out)
    print(
        f"{args.episodes} episodes in {time.perf_counter() - start:.1f} s, "
        f"{len(table.values)} states; table written to {path}"
    )
    return 0


def cmd_train_rl(args: argparse.Namespace) -> int:
    from raysys.agent.rl.card import ship, training_command
    from raysys.agent.rl.train import TrainConfig, train

    cfg = TrainConfig(
        out=args.out,
        seed=args.seed,
        minutes=args.minutes,
        max_iterations=args.iterations,
        scenarios=args.scenarios,
        exclude_traces=tuple(args.exclude_trace),
        keep_excluded_layouts=args.keep_excluded_layouts,
        profile_csvs=tuple(args.profile_csv),
        prior=None if args.prior.lower() == "none" else args.prior,
        eval_seeds=args.eval_seeds,
    )
    from raysys.progress import progress

    try:
        # The bar follows the PPO time budget; each iteration's line is printed above it.
        with progress("agent train", cfg.minutes * 60, by_time=True) as report:
            result = train(cfg, log=report, command=training_command())
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{result.iterations} PPO iterations, {result.env_steps} env steps, "
        f"{result.train_seconds:.0f} s of PPO, {result.total_seconds:.0f} s in all; "
        f"RLModule in {result.module}, Algorithm checkpoint in {result.algorithm}, "
        f"TensorBoard logs in {result.out / 'tb'}"
    )
    if args.ship:
        print(f"shipped: {ship(result.out)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from raysys.agent.scenarios import load_scenario, scenario_files
    from raysys.agent.sim import Simulator

    status = 0
    for target in args.scenarios:
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
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raysys")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
