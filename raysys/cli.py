"""`raysys` command line: run a job locally or on a cluster, write demo data, and the agent tools.

Every command validates its input before anything starts and exits with status 2 and a message
naming the file, field or partner on bad input; 1 means a job (or a report's record) failed.
Ray, torch and the rest are imported inside the commands, so `raysys --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, NoReturn

import typer

from raysys.yamlio import ConfigError

# -h as well as --help, on every command: sub-commands inherit this from the root context.
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(name="raysys", help=__doc__.splitlines()[0], context_settings=CONTEXT,
                  add_completion=False)
chaos_app = typer.Typer(help="fault injection for testing (slow or kill a worker)")
data_app = typer.Typer(help="data tools")
app.add_typer(chaos_app, name="chaos")
app.add_typer(data_app, name="data")

# --address of the commands that attach to a running cluster.
ClusterAddress = Annotated[str | None, typer.Option("--address")]


def fail(message: object, status: int = 2) -> NoReturn:
    """Print `error: message` to stderr and exit with `status` (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(status)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                                help="log at INFO level")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    config: Annotated[str, typer.Argument(
        metavar="CONFIG", help="job spec, e.g. jobs/configs/digits.yaml")],
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue from the latest checkpoint in checkpoint.storage_path")] = False,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: RAY_ADDRESS, else a local cluster with one labelled "
             "node per partner placement)")] = None,
    summary: Annotated[str | None, typer.Option(
        help="also write the summary as JSON here")] = None,
    run_dir: Annotated[str | None, typer.Option(
        help="where spec.json, events.jsonl and summary.json go (default runs/<job>-<time>/; "
             "`raysys report` reads it)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="print no progress or summary")] = False,
) -> None:
    """run a job spec (YAML) to the end"""
    from raysys.data.sources import DataError
    from raysys.runner import attached, run_job
    from raysys.spec import load_spec

    spec = load_spec(config)  # before Ray starts: a bad spec costs nothing
    with attached(spec, address):
        try:
            run_job(spec, resume=resume, quiet=quiet, summary_path=summary, run_dir=run_dir)
        except (ConfigError, DataError) as exc:
            fail(exc)


@app.command()
def submit(
    config: Annotated[str, typer.Argument(
        metavar="CONFIG", help="job spec inside the working directory")],
    address: Annotated[str | None, typer.Option(
        help="dashboard address (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or "
             "http://127.0.0.1:8265)")] = None,
    working_dir: Annotated[str, typer.Option(
        help="uploaded to the cluster (default: here; .venv, runs, checkpoints and .git are "
             "left out)")] = ".",
    job_id: Annotated[str | None, typer.Option(help="submission id (default: Ray's)")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="wait for the job, print its logs; exit 1 unless it SUCCEEDED")] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: seconds")] = None,
) -> None:
    """submit a job spec to a cluster through Ray's Jobs API (jobs/train.py); prints the job id"""
    from raysys.submit import submit as submit_job
    from raysys.submit import wait as wait_for

    try:
        client, submitted = submit_job(config, address, working_dir, job_id)
    except ValueError as exc:
        fail(exc)
    print(submitted)
    if not wait:
        return
    state = wait_for(client, submitted, timeout)
    print(client.get_job_logs(submitted), end="")
    print(f"job {submitted}: {state}")
    if state != "SUCCEEDED":
        raise typer.Exit(1)


@app.command(help="measure step time by workers and local batch (Pollux placements.csv format) "
                  "for the simulator")
def profile(
    config: Annotated[str, typer.Argument(metavar="CONFIG")],
    workers: Annotated[str, typer.Option(
        help="worker counts, e.g. 1,2,3 (on one host: at most its core count, or the profile "
             "measures CPU contention instead of scaling)")] = "1,2,3",
    local_batches: str = "16,32,64,128",
    steps: Annotated[int, typer.Option(help="measured steps per point")] = 30,
    warmup: int = 5,
    out: str = "runs/profile.csv",
    address: ClusterAddress = None,
) -> None:
    import ray

    from raysys.profile import profile as measure
    from raysys.progress import progress
    from raysys.runner import attached
    from raysys.spec import check_against_cluster, load_spec

    spec = load_spec(config)
    counts = _int_list(workers, "--workers")
    batches = _int_list(local_batches, "--local-batches")
    with attached(spec, address):
        check_against_cluster(spec, ray.nodes())
        with progress("profile", len(counts) * len(batches)) as log:
            path = measure(spec, counts, batches, steps, warmup, out, log)
    print(f"wrote {path}; fit it with: raysys agent fit {path}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected positive integers, got '{text}'")
    return values


def _on_cluster(address: str | None, action: Callable[[], None]) -> None:
    """Attach to a running cluster (raysys namespace), run `action()`, detach. A ValueError (no
    such job or worker) is a usage error: exit status 2 with its message."""
    import ray

    from raysys.runner import NAMESPACE

    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    try:
        action()
    except ValueError as exc:
        fail(exc)
    finally:
        ray.shutdown()


@app.command(help="a running job's step, loss, workers per partner and node, contribution "
                  "ledger and agent decisions")
def status(
    job: Annotated[str | None, typer.Argument(
        metavar="JOB", help="job name (default: every running job)")] = None,
    address: ClusterAddress = None,
) -> None:
    from raysys.status import job_status, print_status, running_jobs

    def act() -> None:
        jobs = [job] if job else running_jobs()
        if not jobs:
            print("no raysys job is running in this cluster")
        for name in jobs:
            print_status(job_status(name))

    _on_cluster(address, act)


@app.command()
def stop(
    job: Annotated[str, typer.Argument(metavar="JOB", help="job name")],
    address: ClusterAddress = None,
) -> None:
    """stop a running job after the steps in flight"""
    from raysys.status import stop_job

    def act() -> None:
        stop_job(job)
        print(f"job {job} stops after the steps in flight (final checkpoint and summary are "
              "written; --resume continues it)")

    _on_cluster(address, act)


ChaosJob = Annotated[str, typer.Option(help="job name")]


@chaos_app.command()
def slow(
    worker: Annotated[str, typer.Argument(metavar="WORKER", help="<partner>/<index>, e.g. beta/1")],
    factor: Annotated[float, typer.Argument(metavar="FACTOR")],
    job: ChaosJob,
    address: ClusterAddress = None,
) -> None:
    """make a worker FACTOR times slower"""
    from raysys import chaos

    def act() -> None:
        chaos.slow(job, worker, factor)
        print(f"{worker} of job {job} now computes {factor:g}x slower")

    _on_cluster(address, act)


@chaos_app.command()
def kill(
    worker: Annotated[str, typer.Argument(metavar="WORKER")],
    job: ChaosJob,
    address: ClusterAddress = None,
) -> None:
    """kill a worker as a crash would"""
    from raysys import chaos

    def act() -> None:
        chaos.kill(job, worker)
        print(f"killed {worker} of job {job}")

    _on_cluster(address, act)


@data_app.command()
def demo(
    out: str = "data/digits",
    partners: str = "alpha,beta,gamma",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    seed: int = 0,
) -> None:
    """write the digits demo split (no download)"""
    from raysys.data.demo import describe_split, write_digits_demo

    names = [p.strip() for p in partners.split(",") if p.strip()]
    try:
        paths = write_digits_demo(out, partners=names, alpha=alpha, seed=seed)
    except ValueError as exc:  # no partners, alpha <= 0, ...
        fail(exc)
    print(f"wrote {len(paths)} files to {out} (digits, Dirichlet alpha={alpha}):")
    print(describe_split(paths))


@app.command(help="write RUN_DIR/report.html with PNG plots (throughput, workers, loss, "
                  "contribution, epsilon) from its events.jsonl and summary.json")
def report(
    run_dir: Annotated[str, typer.Argument(
        metavar="RUN_DIR", help="a run directory written by `raysys run` (holds events.jsonl)")],
) -> None:
    from raysys.report import ReportError, RunDirError, write_report

    try:
        paths = write_report(run_dir)
    except RunDirError as exc:  # no such run directory, or no events.jsonl in it
        fail(exc)
    except ReportError as exc:  # a malformed record: names the file and line
        fail(exc, status=1)
    for path in paths:
        print(f"wrote {path}")


try:
    from raysys.agent.cli import app as agent_app
except ImportError:  # the agent package is optional at this layer
    agent_app = None
if agent_app is not None:
    app.add_typer(agent_app, name="agent")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status: 0 ok,
    1 a failed job, 2 a usage error or bad input."""
    try:
        typer.main.get_command(app).main(args=argv, prog_name="raysys")
    except SystemExit as exc:  # click ends every run, a successful one too, with sys.exit
        return _exit_status(exc.code)
    except ConfigError as exc:  # a bad spec or option value found inside a command
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _exit_status(code: str | int | None) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # as sys.exit("message") would
    return 1


if __name__ == "__main__":
    sys.exit(main())
