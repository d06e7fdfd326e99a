"""`raysys` command line: run a job locally or on a cluster, write demo data, and the agent tools.

Every command validates its input before anything starts and exits with status 2 and a message
naming the file, field or partner on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys

from raysys.yamlio import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from raysys.data.sources import DataError
    from raysys.runner import connect, run_job
    from raysys.spec import load_spec

    spec = load_spec(args.config)  # before Ray starts: a bad spec costs nothing
    local = connect(spec, args.address)
    try:
        run_job(spec, resume=args.resume, quiet=args.quiet, summary_path=args.summary,
                run_dir=args.run_dir)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import ray

        ray.shutdown()
        if local is not None:
            local.shutdown()
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from raysys.submit import submit, wait

    try:
        client, job_id = submit(args.config, args.address, args.working_dir, args.job_id)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(job_id)
    if not args.wait:
        return 0
    status = wait(client, job_id, args.timeout)
    print(client.get_job_logs(job_id), end="")
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_profile(args: argparse.Namespace) -> int:
    import ray

    from raysys.profile import profile
    from raysys.runner import connect
    from raysys.spec import check_against_cluster, load_spec

    spec = load_spec(args.config)
    counts = _int_list(args.workers, "--workers")
    batches = _int_list(args.local_batches, "--local-batches")
    local = connect(spec, args.address)
    try:
        check_against_cluster(spec, ray.nodes())
        from raysys.progress import progress

        with progress("profile", len(counts) * len(batches)) as report:
            path = profile(spec, counts, batches, args.steps, args.warmup, args.out, report)
        print(f"wrote {path}; fit it with: raysys agent fit {path}")
    finally:
        ray.shutdown()
        if local is not None:
            local.shutdown()
    return 0


def _on_cluster(address: str | None, action) -> int:
    """Attach to a running cluster (raysys namespace), run `action()`, detach. A ValueError (no
    such job or worker) is a usage error: exit status 2 with its message."""
    import ray

    from raysys.runner import NAMESPACE

    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    try:
        action()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


def _cmd_chaos(args: argparse.Namespace) -> int:
    from raysys import chaos

    def act() -> None:
        if args.chaos_cmd == "slow":
            chaos.slow(args.job, args.worker, args.factor)
            print(f"{args.worker} of job {args.job} now computes {args.factor:g}x slower")
        else:
            chaos.kill(args.job, args.worker)
            print(f"killed {args.worker} of job {args.job}")

    return _on_cluster(args.address, act)


def _cmd_status(args: argparse.Namespace) -> int:
    from raysys.status import job_status, print_status, running_jobs

    def act() -> None:
        jobs = [args.job] if args.job else running_jobs()
        if not jobs:
            print("no raysys job is running in this cluster")
        for job in jobs:
            print_status(job_status(job))

    return _on_cluster(args.address, act)


def _cmd_stop(args: argparse.Namespace) -> int:
    from raysys.status import stop_job

    def act() -> None:
        stop_job(args.job)
        print(f"job {args.job} stops after the steps in flight (final checkpoint and summary "
              "are written; --resume continues it)")

    return _on_cluster(args.address, act)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected positive integers, got '{text}'")
    return values


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from raysys.data.demo import describe_split, write_digits_demo

    partners = [p.strip() for p in args.partners.split(",") if p.strip()]
    paths = write_digits_demo(args.out, partners=partners, alpha=args.alpha, seed=args.seed)
    print(f"wrote {len(paths)} files to {args.out} (digits, Dirichlet alpha={args.alpha}):")
    print(describe_split(paths))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from raysys.report import ReportError, RunDirError, write_report

    try:
        paths = write_report(args.run_dir)
    except RunDirError as exc:  # no such run directory, or no events.jsonl in it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReportError as exc:  # a malformed record: names the file and line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job spec (YAML) to the end")
    run.add_argument("config", help="job spec, e.g. jobs/configs/digits.yaml")
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in checkpoint.storage_path")
    run.add_argument("--address", default=None,
                     help="Ray cluster address (default: RAY_ADDRESS, else a local cluster with "
                          "one labelled node per partner placement)")
    run.add_argument("--summary", default=None, help="also write the summary as JSON here")
    run.add_argument("--run-dir", default=None,
                     help="where spec.json, events.jsonl and summary.json go "
                          "(default runs/<job>-<time>/; `raysys report` reads it)")
    run.add_argument("--quiet", action="store_true", help="print no progress or summary")
    run.set_defaults(func=_cmd_run)

    submit = sub.add_parser("submit", help="submit a job spec to a cluster through Ray's Jobs "
                                           "API (jobs/train.py); prints the job id")
    submit.add_argument("config", help="job spec inside the working directory")
    submit.add_argument("--address", default=None,
                        help="dashboard address (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS "
                             "or http://127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".",
                        help="uploaded to the cluster (default: here; .venv, runs, checkpoints "
                             "and .git are left out)")
    submit.add_argument("--job-id", default=None, help="submission id (default: Ray's)")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job, print its logs; exit 1 unless it SUCCEEDED")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: seconds")
    submit.set_defaults(func=_cmd_submit)

    prof = sub.add_parser("profile", help="measure step time by workers and local batch "
                                           "(Pollux placements.csv format) for the simulator")
    prof.add_argument("config")
    prof.add_argument("--workers", default="1,2,3",
                      help="worker counts, e.g. 1,2,3 (on one host: at most its core count, or "
                           "the profile measures CPU contention instead of scaling)")
    prof.add_argument("--local-batches", default="16,32,64,128")
    prof.add_argument("--steps", type=int, default=30, help="measured steps per point")
    prof.add_argument("--warmup", type=int, default=5)
    prof.add_argument("--out", default="runs/profile.csv")
    prof.add_argument("--address", default=None)
    prof.set_defaults(func=_cmd_profile)

    status = sub.add_parser("status", help="a running job's step, loss, workers per partner and "
                                            "node, contribution ledger and agent decisions")
    status.add_argument("job", nargs="?", help="job name (default: every running job)")
    status.add_argument("--address", default=None)
    status.set_defaults(func=_cmd_status)

    stop = sub.add_parser("stop", help="stop a running job after the steps in flight")
    stop.add_argument("job", help="job name")
    stop.add_argument("--address", default=None)
    stop.set_defaults(func=_cmd_stop)

    chaos = sub.add_parser("chaos", help="fault injection for testing (slow or kill a worker)")
    chaos_sub = chaos.add_subparsers(dest="chaos_cmd", required=True)
    slow = chaos_sub.add_parser("slow", help="make a worker FACTOR times slower")
    slow.add_argument("worker", help="<partner>/<index>, e.g. beta/1")
    slow.add_argument("factor", type=float)
    kill = chaos_sub.add_parser("kill", help="kill a worker as a crash would")
    kill.add_argument("worker")
    for p in (slow, kill):
        p.add_argument("--job", required=True, help="job name")
        p.add_argument("--address", default=None)
        p.set_defaults(func=_cmd_chaos)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    demo = data.add_parser("demo", help="write the digits demo split (no download)")
    demo.add_argument("--out", default="data/digits")
    demo.add_argument("--partners", default="alpha,beta,gamma")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_data_demo)

    report = sub.add_parser("report", help="write RUN_DIR/report.html with PNG plots (throughput, "
                                           "workers, loss, contribution, epsilon) from its "
                                           "events.jsonl and summary.json")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory written by `raysys run` (holds events.jsonl)")
    report.set_defaults(func=_cmd_report)

    try:
        from raysys.agent.cli import add_agent_parser
    except ImportError:  # the agent package is optional at this layer
        add_agent_parser = None
    if add_agent_parser is not None:
        add_agent_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
