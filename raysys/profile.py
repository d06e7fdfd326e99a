"""`raysys profile CONFIG`: measure the live system's step time by worker count and local batch.

Runs the job's model on its first partner's data at each (workers, local batch) pair, for a few
warm-up steps and then `steps` measured ones, and writes one row per pair in the Pollux
placements.csv format (placement, local_bsz, step_time, sync_time) that the simulator fits
(raysys/agent/profile_fit.py). Placement digits count workers per node, as in the Pollux traces.
"""

from __future__ import annotations

import statistics
import tempfile
from collections import Counter
from pathlib import Path

import ray

from raysys.agent.profile_fit import placement_string, write_profile_csv
from raysys.spec import JobSpec


def profile_spec(spec: JobSpec, workers: int, local_batch: int, steps: int,
                 storage: str) -> dict:
    """The job reduced to its first partner at a fixed size and batch: no checkpoints, no
    evaluation, no agent, no injected faults."""
    first = spec.partners[0].model_dump()
    first["workers"] = {"initial": workers, "min": workers, "max": workers, "spares": 0}
    data = spec.model_dump()
    data.update(
        name=f"{spec.name}-profile", partners=[first], global_batch_size=workers * local_batch,
        steps=steps, evaluation=None, chaos=[], agent={"policy": "static"},
        checkpoint={"storage_path": storage, "every_steps": 0, "keep": 1},
    )
    data["runtime"]["steps_per_call"] = 5
    return data


def measure(spec: JobSpec, workers: int, local_batch: int, steps: int, warmup: int) -> dict:
    from raysys.control.controller import RemoteJobController

    with tempfile.TemporaryDirectory() as storage:
        controller = RemoteJobController.remote(
            profile_spec(spec, workers, local_batch, warmup + steps, storage))
        try:
            ray.get(controller.run.remote())
            timings = [t for t in ray.get(controller.step_timings.remote()) if t[0] >= warmup]
            nodes = Counter(w["node_id"] for w in ray.get(controller.workers.remote())
                            if w["state"] != "spare")
        finally:
            ray.kill(controller)
    return {
        "placement": placement_string(sorted(nodes.values(), reverse=True)),
        "local_bsz": local_batch,
        "step_time": statistics.median(t[1] for t in timings),
        "sync_time": statistics.median(t[2] for t in timings),
    }


def profile(spec: JobSpec, worker_counts: list[int], local_batches: list[int], steps: int,
            warmup: int, out: str | Path, echo=print) -> Path:
    rows = []
    for n in worker_counts:
        for lb in local_batches:
            row = measure(spec, n, lb, steps, warmup)
            echo(f"workers {n} local batch {lb}: placement {row['placement']} "
                 f"step {row['step_time'] * 1e3:.2f} ms sync {row['sync_time'] * 1e3:.2f} ms")
            rows.append(row)
    return write_profile_csv(rows, out)
