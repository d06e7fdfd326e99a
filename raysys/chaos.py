"""`raysys chaos`: fault injection for testing the agent and the elastic group (a testing aid).

`slow` makes one worker's compute take FACTOR times as long (it sleeps after each local
backward); `kill` ends a worker process as a crash would. Workers are found by their actor names,
`raysys:<job>:<partner>:<i>`, in the raysys namespace.
"""

from __future__ import annotations

import ray


def worker_actor(job: str, worker: str) -> ray.actor.ActorHandle:
    partner, _, index = worker.partition("/")
    if not partner or not index.isdigit():
        raise ValueError(f"worker '{worker}': expected <partner>/<index>, e.g. alpha/1")
    name = f"raysys:{job}:{partner}:{index}"
    try:
        return ray.get_actor(name)
    except ValueError:
        raise ValueError(f"no live worker {worker} in job '{job}' (actor {name})") from None


def slow(job: str, worker: str, factor: float) -> None:
    if factor < 1.0:
        raise ValueError(f"factor must be >= 1 (1 = normal speed), got {factor}")
    ray.get(worker_actor(job, worker).set_slowdown.remote(factor))


def kill(job: str, worker: str) -> None:
    ray.kill(worker_actor(job, worker), no_restart=True)
