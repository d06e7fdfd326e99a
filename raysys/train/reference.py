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
from raysys.train.replica import TAIL, DPStep, Replica, ReplicaConfig


def reference_parameters(cfg: ReplicaConfig, tables: dict[str, PartnerTable], seed: int,
                         global_batch: int, steps: int,
                         skip: dict[str, set[int]] | None = None) -> np.ndarray:
    """Flat parameters after `steps` steps; `skip[p]` lists steps partner p did not take part in."""
    return reference_replica(cfg, tables, seed, global_batch, steps, skip).flat_parameters().numpy()


def reference_replica(cfg: ReplicaConfig, tables: dict[str, PartnerTable], seed: int,
                      global_batch: int, steps: int, skip: dict[str, set[int]] | None = None,
                      dp: dict[str, DPStep] | None = None,
                      noise: torch.Generator | None = None) -> Replica:
    """The replica after `steps` steps. With `dp[p]`, partner p's samples are clipped and
    noised as its (single) worker would do, in a gradient of their own that is then added."""
    torch.set_num_threads(1)
    sizes = {p: int(t.y.shape[0]) for p, t in tables.items()}
    batches = partner_batch_sizes(sizes, global_batch)
    replica = Replica(cfg)
    skip = skip or {}
    dp = dp or {}
    for step in range(steps):
        xs, ys, private = [], [], []
        for partner, table in tables.items():
            if step in skip.get(partner, ()):
                continue
            idx = step_indices(seed, partner, sizes[partner], batches[partner], step)
            batch = torch.from_numpy(table.x[idx]), torch.from_numpy(table.y[idx])
            if partner in dp:
                private.append((batch, dp[partner]))
            else:
                xs.append(batch[0])
                ys.append(batch[1])
        summed = None
        for (x, y), step_dp in private:
            replica.local_gradients(x, y, step_dp, noise)
            summed = _add(summed, replica.buckets)
        if xs:
            replica.local_gradients(torch.cat(xs), torch.cat(ys))
            summed = _add(summed, replica.buckets)
        if summed is None:  # nobody took part: apply() sees zero samples and only counts
            summed = [torch.zeros_like(b) for b in replica.buckets]
        for bucket, total in zip(replica.buckets, summed, strict=True):
            bucket.copy_(total)
        replica.apply()
    return replica


def reference_local_sgd(cfg: ReplicaConfig, tables: dict[str, PartnerTable], seed: int,
                        global_batch: int, steps: int) -> Replica:
    """Local SGD (cfg.fusion) in one process: one replica per partner, each stepping on its
    partner's samples, fused on the same round boundaries as a job. Returns the replica of the
    first partner (after the last fusion every partner holds the same model)."""
    torch.set_num_threads(1)
    if cfg.fusion is None:
        raise ValueError("reference_local_sgd needs a ReplicaConfig with fusion")
    sizes = {p: int(t.y.shape[0]) for p, t in tables.items()}
    batches = partner_batch_sizes(sizes, global_batch)
    replicas = {p: Replica(cfg) for p in tables}
    for step in range(steps):
        for partner, table in tables.items():
            idx = step_indices(seed, partner, sizes[partner], batches[partner], step)
            replica = replicas[partner]
            replica.local_gradients(torch.from_numpy(table.x[idx]), torch.from_numpy(table.y[idx]))
            replica.apply()
            replica.fusion.samples += len(idx)
        if cfg.fusion.ends_round(step, steps - 1):
            summed = None
            for replica in replicas.values():
                replica.fusion.write_shares(replica.buckets[-1][-TAIL:])
                summed = _add(summed, replica.buckets)
            for replica in replicas.values():
                for bucket, total in zip(replica.buckets, summed, strict=True):
                    bucket.copy_(total)
                replica.fusion.fuse(replica.buckets[-1][-TAIL:], step + 1)
    return next(iter(replicas.values()))


def _add(total: list[torch.Tensor] | None, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.clone() for b in buckets] if total is None else [
        t + b for t, b in zip(total, buckets, strict=True)]


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest parameter magnitude (elementwise ratios are
    meaningless for parameters that happen to sit near zero)."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
