"""The driver side of a job: connect to Ray (or start a local cluster), validate, run, report.

Used by `raysys run` and by `jobs/train.py` (the `ray job submit` entry point), so both paths
validate the same way and print the same progress and summary.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from rich.console import Console
from rich.table import Table

from raysys.control.ledger import format_ledger
from raysys.data.sources import DataError
from raysys.spec import JobSpec, check_against_cluster
from raysys.yamlio import ConfigError

console = Console(stderr=False, highlight=False)
# Every raysys driver joins this namespace, so a job's actors (raysys:<job>:...) can be found by
# name from another shell: `raysys chaos`, dashboards, operators.
NAMESPACE = "raysys"


@dataclass
class LocalCluster:
    """Several labelled Ray "nodes" on this host, one per distinct partner placement."""

    cluster: Any

    @classmethod
    def for_spec(cls, spec: JobSpec, cpus_per_node: float | None = None,
                 metrics_port: int | None = None) -> LocalCluster:
        from ray.cluster_utils import Cluster

        # The agent's port is left to Ray (None), as Cluster does for its other nodes: the fixed
        # default would clash with another local cluster on this host (a second job, a test
        # cluster), and a raylet whose agent cannot start exits.
        head_args: dict[str, Any] = {"num_cpus": 1, "include_dashboard": True,
                                     "dashboard_agent_listen_port": None}
        if metrics_port:
            head_args["metrics_export_port"] = metrics_port
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
        selectors: dict[tuple, float] = {}
        for p in spec.partners:
            key = tuple(sorted(p.placement.items()))
            need = (p.workers.max + p.workers.spares) * p.cpus_per_worker
            selectors[key] = selectors.get(key, 0.0) + need
        for key, need in selectors.items():
            if not key:
                continue  # an empty selector matches the head node too
            cpus = cpus_per_node or max(1, math.ceil(need))  # Ray wants whole CPUs per node
            cluster.add_node(num_cpus=cpus, labels=dict(key))
        cluster.wait_for_nodes()
        return cls(cluster)

    @property
    def address(self) -> str:
        return self.cluster.address

    def shutdown(self) -> None:
        self.cluster.shutdown()


@contextmanager
def attached(spec: JobSpec, address: str | None) -> Iterator[None]:
    """Join the given/ambient cluster, or start a local labelled one when there is none; on
    leaving, disconnect and stop the local cluster if one was started."""
    address = address or os.environ.get("RAY_ADDRESS")
    local = None
    if not address:
        local = LocalCluster.for_spec(spec, metrics_port=spec.runtime.metrics_export_port)
        address = local.address
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        if local is not None:
            local.shutdown()


def default_run_dir(spec: JobSpec) -> Path:
    return Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_job(spec: JobSpec, resume: bool = False, quiet: bool = False,
            summary_path: str | None = None, run_dir: str | Path | None = None) -> dict:
    """Validate against the live cluster, start the controller, stream progress, return summary.

    The run directory (default runs/<job>-<time>/) gets spec.json, events.jsonl (written as
    events happen, so a crashed run keeps what it did) and summary.json: what `raysys report`
    reads."""
    from raysys.control.controller import RemoteJobController

    check_against_cluster(spec, ray.nodes())
    controller_name = f"raysys:{spec.name}:controller"
    _wait_until_name_free(controller_name)
    controller = RemoteJobController.options(name=controller_name).remote(
        spec.model_dump(), resume
    )
    done = controller.run.remote()
    record = _RunDirectory(Path(run_dir) if run_dir else default_run_dir(spec), spec)
    agent = None
    if spec.agent.policy != "static":  # static never acts: no agent process needed
        from raysys.agent.actor import RemoteAgentActor

        agent = RemoteAgentActor.options(name=f"raysys:{spec.name}:agent").remote(
            controller, spec.model_dump())
        agent_done = agent.wait.remote()
    since = 0
    live = _ProgressView(spec, quiet)
    while True:
        ready, _ = ray.wait([done], timeout=0.5)
        try:
            progress = ray.get(controller.progress.remote(since), timeout=5)
        except Exception:  # the controller ended between the two calls
            progress = None
        if progress:
            live.update(progress)
            since = progress["next_event"]
        record.pull(controller)
        if ready:
            break
    live.close()
    try:
        summary = ray.get(done)
    except RayTaskError as exc:
        # Bad partner data or config found inside the cluster: show the message, not a traceback.
        if isinstance(exc.cause, (DataError, ConfigError)):
            raise exc.cause from None
        raise
    finally:
        if agent is not None:
            agent.stop.remote()
            agent_status = _agent_status(agent_done)
        ray.kill(controller)  # its workers are already gone; free the name for the next run
        # ray.kill returns before Ray has released the name: wait, so that when run_job returns
        # or raises, none of the job's actors is left (a test, or the user's next run, may look).
        _name_released(controller_name, timeout_s=10.0)
    if agent is not None:
        summary["agent"] = agent_status
        ray.kill(agent)
    record.finish(summary)
    if summary_path:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    if not quiet:
        print_summary(summary)
        console.print(f"run directory: {record.path} (raysys report {record.path})")
    return summary


class _RunDirectory:
    """spec.json, events.jsonl (appended as the controller records events) and summary.json."""

    def __init__(self, path: Path, spec: JobSpec) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        self._events = open(path / "events.jsonl", "a")  # noqa: SIM115 (open for the run)
        self._n = 0

    def pull(self, controller) -> None:
        try:
            new = ray.get(controller.records.remote(self._n), timeout=5)
        except Exception:  # the controller ended: the final summary still arrives via run()
            return
        for event in new:
            self._events.write(json.dumps(event) + "\n")
        self._events.flush()
        self._n += len(new)

    def finish(self, summary: dict) -> None:
        self._events.close()
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


def _name_released(name: str, timeout_s: float) -> bool:
    """Whether no actor holds `name` within `timeout_s` (Ray reaps a killed actor's name a
    moment after ray.kill returns)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.05)


def _wait_until_name_free(name: str, timeout_s: float = 15.0) -> None:
    """A job of this name may still be winding down (e.g. its driver was just killed and Ray is
    reaping its actors); a second live job of the same name is an error."""
    if not _name_released(name, timeout_s):
        raise ConfigError(f"name: a job named '{name.split(':')[1]}' is already running in "
                          f"this cluster (actor {name}); choose another job name")


def _agent_status(agent_done: ray.ObjectRef) -> dict:
    try:
        return ray.get(agent_done, timeout=30)
    except Exception as exc:  # the agent's failure must not hide the job's result
        return {"warnings": [f"agent ended with {type(exc).__name__}: {exc}"], "decisions": []}


class _ProgressView:
    """A progress bar on a terminal; plain log lines otherwise (ray job logs, CI)."""

    def __init__(self, spec: JobSpec, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self.t0 = time.time()
        self.bar = None
        if self.tty and not quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                console=console)
            self.task = self.bar.add_task(spec.name, total=spec.steps, info="starting")
            self.bar.start()

    def update(self, progress: dict) -> None:
        if self.quiet:
            return
        for line in progress["events"]:
            (self.bar.console if self.bar else console).print(line)
        if self.bar:
            loss = progress["loss"]
            info = (f"{progress['state']} loss {loss:.4f} " if loss is not None else
                    f"{progress['state']} ") + f"{progress['samples_per_s']:.0f}/s " + \
                " ".join(f"{k}:{v}" for k, v in progress["workers"].items())
            self.bar.update(self.task, completed=progress["step"], info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def print_summary(summary: dict) -> None:
    table = Table(title=f"raysys job '{summary['job']}' {summary['state']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["steps"]))
    if summary["final_loss"] is not None:
        table.add_row("final training loss", f"{summary['final_loss']:.4f}")
    elif summary.get("loss_private"):
        table.add_row("final training loss", "private (every partner is under DP)")
    if summary.get("held_out"):
        h = summary["held_out"]
        table.add_row("held-out loss", f"{h['loss']:.4f}")
        table.add_row("held-out accuracy", f"{h['accuracy']:.3f} ({h['rows']} rows)")
    for name, line in format_ledger(summary["partners"]):
        table.add_row(f"partner {name}", line)
    table.add_row("rescales", str(summary["rescales"]))
    agent = summary.get("agent")
    if agent:
        table.add_row("agent policy", agent.get("policy", "?"))
        for d in agent.get("decisions", []):
            table.add_row(f"  agent at step {d['step']}", d["applied"])
        for w in agent.get("warnings", []):
            table.add_row("  agent warning", w)
    table.add_row("throughput", f"{summary['samples_per_s']:.0f} samples/s")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    console.print(table)
