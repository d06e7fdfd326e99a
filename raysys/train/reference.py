"""A single-process run on exactly the samples a raysys job uses: the yardstick of invariant 2.

Whatever the number of workers, their speeds and splits, the parameters of a raysys job after K
steps must equal (to float tolerance) what this plain loop computes with one replica that sees
every partner's samples of each step at once. Tests use it; so can a user who doubts a run.
"""

from __future__ import annotations

import numpy as np
import torch

from raysys.data.sampler import partner_batch_sizes, step_indices
from raysys.data.sources import PartnerTable
from raysys.train.replica import Replica, ReplicaConfig


def reference_parameters(cfg: ReplicaConfig, tables: dict[str, PartnerTable], seed: int,
                         global_batch: int, steps: int,
                         skip: dict[str, set[int]] | None = None) -> np.ndarray:
    """Flat parameters after `steps` steps; `skip[p]` lists steps partner p did not take part in."""
    torch.set_num_threads(1)
    sizes = {p: int(t.y.shape[0]) for p, t in tables.items()}
    batches = partner_batch_sizes(sizes, global_batch)
    replica = Replica(cfg)
    skip = skip or {}
    for step in range(steps):
        xs, ys = [], []
        for partner, table in tables.items():
            if step in skip.get(partner, ()):
                continue
            idx = step_indices(seed, partner, sizes[partner], batches[partner], step)
            xs.append(torch.from_numpy(table.x[idx]))
            ys.append(torch.from_numpy(table.y[idx]))
        replica.local_gradients(torch.cat(xs), torch.cat(ys))
        replica.apply()
    return replica.flat_parameters().numpy()


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest parameter magnitude (elementwise ratios are
    meaningless for parameters that happen to sit near zero)."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
