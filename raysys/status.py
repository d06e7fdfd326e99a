"""`raysys status [JOB]` and `raysys stop JOB`: look at a running job, or end it, through its
controller and agent actors.

Jobs are found by their actors' names in the raysys namespace (`raysys:<job>:controller`,
`raysys:<job>:agent`), so any client of the cluster can look, including from another machine.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import ray
from rich.console import Console
from rich.table import Table

from raysys.control.ledger import format_ledger

CONTROLLER = "raysys:{job}:controller"
AGENT = "raysys:{job}:agent"


def running_jobs() -> list[str]:
    names = ray.util.list_named_actors()  # this namespace only: plain names
    return sorted(n.split(":")[1] for n in names
                  if n.startswith("raysys:") and n.endswith(":controller"))


def _controller(job: str) -> ray.actor.ActorHandle:
    try:
        return ray.get_actor(CONTROLLER.format(job=job))
    except ValueError:
        jobs = running_jobs()
        raise ValueError(f"no running job '{job}' in this cluster"
                         + (f" (running: {', '.join(jobs)})" if jobs else " (none running)")
                         ) from None


def stop_job(job: str) -> None:
    """Ask the job to stop after the steps in flight: it writes its final checkpoint and
    summary as if it had reached its last step (resume continues from there)."""
    ray.get(_controller(job).stop.remote(), timeout=30)


def job_status(job: str, timeout_s: float = 10.0) -> dict:
    """Progress, workers and contribution ledger of `job`, plus its agent's last decisions."""
    controller = _controller(job)
    progress = ray.get(controller.progress.remote(10**9), timeout=timeout_s)
    workers = ray.get(controller.workers.remote(), timeout=timeout_s)
    agent = None
    # No agent actor under the static policy; a restarting agent answers on the next look.
    with contextlib.suppress(ValueError, ray.exceptions.RayError):
        agent = ray.get(ray.get_actor(AGENT.format(job=job)).status.remote(), timeout=timeout_s)
    return {"job": job, "progress": progress, "workers": workers, "agent": agent}


def print_status(status: dict, console: Console | None = None, decisions: int = 5) -> None:
    console = console or Console()
    p = status["progress"]
    loss = "-" if p["loss"] is None else f"{p['loss']:.4f}"
    head = Table(title=f"raysys job '{status['job']}': {p['state']}", show_header=False)
    head.add_row("step", f"{p['step']}/{p['steps']}")
    head.add_row("loss", loss)
    head.add_row("throughput", f"{p['samples_per_s']:.0f} samples/s")
    head.add_row("generation", str(p["generation"]))
    active = [w for w in status["workers"] if w["state"] == "active"]
    per_node = Counter((w["partner"], (w["node_id"] or "?")[:8]) for w in active)
    for partner, n in p["workers"].items():
        nodes = ", ".join(f"{node}:{k}" for (pp, node), k in sorted(per_node.items())
                          if pp == partner)
        head.add_row(f"workers {partner}", f"{n}" + (f" (on {nodes})" if nodes else ""))
    for name, line in format_ledger(p["ledger"]):
        head.add_row(f"partner {name}", line)
    agent = status["agent"]
    if agent:
        head.add_row("agent policy", agent["policy"])
        for d in agent["decisions"][-decisions:]:
            head.add_row(f"  at step {d['step']}", d["applied"])
        for w in agent["warnings"]:
            head.add_row("  agent warning", w)
    console.print(head)
