"""Pieces shared by bench/throughput.py, bench/rescale_latency.py and bench/_ddp_worker.py.

The peers (torchrun DDP, Ray Train) run the *same* training step as raysys: same registry model,
same seed, same optimizer, and the same rows per step, drawn with raysys's own sampler
(`step_indices` + `split_indices`), so the systems differ only in how they launch, synchronise
and drive the step. Worker processes of Ray Train import this module by name, so the scripts
put bench/ on the workers' PYTHONPATH (see `worker_runtime_env`).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from raysys.data.demo import write_blobs_table as write_table  # noqa: F401 (re-export)
from raysys.data.sampler import split_indices, step_indices

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PARTNER = "alpha"  # every benchmark job has one partner; its name seeds the sampler
NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelCase:
    """A registry model and the feature count of its synthetic table."""

    registry: str
    kwargs: dict = field(default_factory=dict)
    features: int = 256


# ~1.06M parameters (256*1024 + 1024*768 + 768*10 weights plus biases): all-reduce bound on CPU.
MLP = ModelCase("mlp", {"hidden": [1024, 768]}, features=256)
# 16x16 single-channel images, ~6k parameters but ~1.2M multiply-adds per sample: compute bound.
CNN = ModelCase("cnn", {"channels": [16, 32]}, features=256)
MODELS = {"mlp": MLP, "cnn": CNN}


def ray_env_defaults() -> None:
    """Environment every bench process (and the Ray processes it starts) should see."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a fresh local cluster needs no token
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # Ray Train v2 (the 2.60 default anyway)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per process, everywhere


def worker_runtime_env() -> dict:
    """runtime_env that lets Ray workers `import common` (Ray Train loops call into it)."""
    path = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, seed: int, global_batch: int, rank: int, world: int,
                first: int, last: int) -> None:
    """Steps first..last-1 of a DDP-wrapped `model` on the rows raysys would use.

    Rank r takes chunk r of the step's batch, as a raysys worker at position r does; DDP then
    averages the ranks' mean gradients, which with equal chunks is the global mean gradient.
    """
    rows = int(y.shape[0])
    shares = [1.0] * world
    for step in range(first, last):
        idx = split_indices(step_indices(seed, PARTNER, rows, global_batch, step), shares)[rank]
        mine = torch.from_numpy(idx)
        optimizer.zero_grad()
        F.cross_entropy(model(x[mine]), y[mine]).backward()
        optimizer.step()


def timed_ddp_run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, seed: int, global_batch: int, rank: int, world: int,
                  warmup: int, windows: int, window_steps: int) -> list[float]:
    """Seconds of each of `windows` windows of `window_steps` steps, after `warmup` steps,
    timed inside the training loop.

    The all-reduce inside backward keeps the ranks in lock step, so rank 0's clock times the job.
    """
    train_steps(model, optimizer, x, y, seed, global_batch, rank, world, 0, warmup)
    seconds = []
    for w in range(windows):
        first = warmup + w * window_steps
        t0 = time.perf_counter()
        train_steps(model, optimizer, x, y, seed, global_batch, rank, world, first,
                    first + window_steps)
        seconds.append(time.perf_counter() - t0)
    return seconds


def machine_line() -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{dt.datetime.now():%Y-%m-%d %H:%M} | {platform.node()} | "
            f"{os.cpu_count()} CPU cores | torch {torch.__version__} | load average {load}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A GitHub-markdown table, so the output pastes straight into docs/benchmarks.md."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def shipped_scenarios(parser, names: str) -> list:
    """The shipped scenarios, or those named in `names` (comma-separated; empty: all); an unknown
    name is an argparse error naming --scenarios."""
    from raysys.agent.env import SHIPPED_SCENARIOS, resolve_scenarios

    scenarios = resolve_scenarios(SHIPPED_SCENARIOS)
    if not names:
        return scenarios
    wanted = names.split(",")
    unknown = set(wanted) - {s.name for s in scenarios}
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}")
    return [s for s in scenarios if s.name in wanted]
