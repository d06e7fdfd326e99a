"""DP overhead: one replica's training step with per-partner DP vs without, on one torch thread.

Every system runs the step a raysys worker runs, on a real `Replica` (gradients in flat buckets,
.grad views into them), minus the all-reduce:

  non-DP         Replica.local_gradients (forward, backward of the summed loss) + Replica.apply
                 (divide by n, SGD step).
  raysys DP      zero the buckets, DPClipper.clipped_gradient_sum (book-keeping: hooks, one
                 backward to the layer outputs, exact per-sample norms, clipped sum as a matmul),
                 Gaussian noise on the gradient part of the buckets, Replica.apply.
  torch.func     the same with DPClipper(method="vmap"): vmap over grad, per-sample gradients
                 materialised (our fallback for models the book-keeping path does not know).
  Opacus         GradSampleModule + DPOptimizer (hooks materialise per-sample gradients, then
                 clip, noise and step), the usual way to run DP-SGD in torch.

Models: mlp(64, 10, hidden=(128, 64)) and SmallCNN(64, 10) (8x8 images, as the digits demo),
local batches 64 and 256. Systems are interleaved round by round (so a neighbour's load hits all
of them alike); a figure is the median over rounds of the per-step time of a round, and the
ratio is DP / non-DP of those medians. Goal: raysys DP <= 2x non-DP.

Usage: .venv/bin/python bench/dp_overhead.py [--rounds N] [--steps N] [--no-opacus] [--strict]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from common import NUM_CLASSES, machine_line, median, print_table  # noqa: E402
from torch import nn  # noqa: E402

from raysys.privacy.dp import (  # noqa: E402
    DPClipper,
    noise_generator,
    noise_std,
)
from raysys.train.replica import DPStep, Replica, ReplicaConfig  # noqa: E402

# -- parameters -------------------------------------------------------------------------------
FEATURES = 64  # 8x8 images for the CNN
MODELS = {"mlp": ("mlp", {"hidden": [128, 64]}), "cnn": ("cnn", {})}
BATCHES = (64, 256)
ROUNDS = 7
STEPS = 20  # timed steps per system and round
WARMUP = 5  # untimed steps per system before the first round
SIGMA, CLIP, WORKERS = 1.0, 1.0, 2  # any values: the cost does not depend on them
POOL = 2048  # rows the steps cycle through
GOAL = 2.0

Step = Callable[[torch.Tensor, torch.Tensor], None]


def replica(model: str) -> Replica:
    name, kwargs = MODELS[model]
    return Replica(ReplicaConfig(model=name, model_kwargs=kwargs, in_features=FEATURES,
                                 num_classes=NUM_CLASSES, seed=0, optimizer="sgd", lr=0.05,
                                 momentum=0.9, weight_decay=0.0))


def non_dp_step(model: str) -> Step:
    r = replica(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        r.local_gradients(x, y)
        r.apply()
    return step


def raysys_dp_step(model: str, method: str) -> Step:
    """What the worker does for a DP partner (all-reduce aside)."""
    r = replica(model)
    r._clipper = DPClipper(r.model, r._loss, max_grad_norm=CLIP, method=method)
    gen = noise_generator()
    dp = DPStep(CLIP, noise_std(SIGMA, CLIP, WORKERS))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        r.local_gradients(x, y, dp, gen)
        r.apply()
    return step


def opacus_step(model: str, batch: int) -> Step:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # "Full backward hook is firing ... no inputs require gradients": expected, inputs are data
    warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)

    r = replica(model)  # same initial model and optimizer
    gsm = GradSampleModule(r.model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.05, momentum=0.9),
                      noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=batch,
                      loss_reduction="sum")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        loss_fn(gsm(x), y).backward()
        opt.step()
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--no-opacus", action="store_true", help="skip the Opacus peer")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit 1 when raysys DP costs more than {GOAL:g}x non-DP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    print(f"1 torch thread, {args.rounds} rounds of {args.steps} steps per system, "
          f"median per-step time over rounds")

    gen = torch.Generator().manual_seed(0)
    x_pool = torch.randn(POOL, FEATURES, generator=gen)
    y_pool = torch.randint(0, NUM_CLASSES, (POOL,), generator=gen)
    headers = ["model", "batch", "non-DP ms", "raysys DP ms", "ratio", "torch.func ms", "ratio"]
    if not args.no_opacus:
        headers += ["Opacus ms", "ratio"]
    headers.append(f"goal <= {GOAL:g}x")
    rows, short = [], []
    for model in args.models.split(","):
        for batch in BATCHES:
            systems = {"non-DP": non_dp_step(model), "raysys": raysys_dp_step(model, "bk"),
                       "vmap": raysys_dp_step(model, "vmap")}
            if not args.no_opacus:
                systems["opacus"] = opacus_step(model, batch)
            batches = [(x_pool[i:i + batch], y_pool[i:i + batch])
                       for i in range(0, POOL - batch + 1, batch)]
            for step in systems.values():
                for i in range(WARMUP):
                    step(*batches[i % len(batches)])
            per_step: dict[str, list[float]] = {k: [] for k in systems}
            for _ in range(args.rounds):
                for name, step in systems.items():
                    t0 = time.perf_counter()
                    for i in range(args.steps):
                        step(*batches[i % len(batches)])
                    per_step[name].append((time.perf_counter() - t0) / args.steps)
            ms = {k: 1e3 * median(v) for k, v in per_step.items()}
            ratio = {k: ms[k] / ms["non-DP"] for k in ms}
            row = [model, str(batch), f"{ms['non-DP']:.2f}", f"{ms['raysys']:.2f}",
                   f"{ratio['raysys']:.2f}", f"{ms['vmap']:.2f}", f"{ratio['vmap']:.2f}"]
            if not args.no_opacus:
                row += [f"{ms['opacus']:.2f}", f"{ratio['opacus']:.2f}"]
            holds = ratio["raysys"] <= GOAL
            row.append("holds" if holds else "FALLS SHORT")
            rows.append(row)
            if not holds:
                short.append(f"{model}/{batch}")
    print_table(headers, rows)
    if short:
        print(f"raysys DP over {GOAL:g}x non-DP: {', '.join(short)}")
    return 1 if short and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
