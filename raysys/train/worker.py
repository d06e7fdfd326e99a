"""PartnerWorker: a Ray actor holding one replica and ONE partner's private rows.

Residency (invariant 1): the only place a partner's data file is opened is `load()` below, and
the actor is scheduled only on nodes whose labels match the partner's placement. What leaves the
actor: gradients (inside the all-reduce), aggregate statistics (row count, schema, loss sums) and
timings.

A worker computes its own sample indices from the plan (seed, step, partner batch, its position
and share), so a call can carry many steps while sending only a few numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from raysys.control import metrics
from raysys.data.sampler import split_indices, step_indices
from raysys.data.sources import TableSchema, load_partner_table
from raysys.data.summary import DataSummary, summarize
from raysys.train.collective import CollectiveError, GenerationGroup
from raysys.train.replica import TAIL, DPStep, Replica, ReplicaConfig


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker does every step of a call: its partner's per-step batch is split among
    the partner's live workers by `shares`, and this worker takes chunk number `position`."""

    partner_batch: int
    position: int
    shares: tuple[float, ...]
    dp: DPStep | None = None  # the partner trains under differential privacy


@dataclass
class ChunkReport:
    """What a worker says after a call of run_steps: per completed step, and why it stopped."""

    worker: str
    first_step: int
    steps_done: int = 0
    loss: list[float] = field(default_factory=list)  # global mean loss of each step
    samples: list[int] = field(default_factory=list)  # global samples of each step
    local_batch: list[int] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    sync_s: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)  # by this worker, job-wide exchanges
    bytes_local: list[int] = field(default_factory=list)  # inside its partner (local SGD)
    error: str | None = None

    def truncate(self, steps: int) -> None:
        """Keep only the first `steps` steps."""
        self.steps_done = steps
        for name in ("loss", "samples", "local_batch", "compute_s", "sync_s", "bytes_sent",
                     "bytes_local"):
            del getattr(self, name)[steps:]


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    partner: str
    node_id: str
    node_ip: str
    pid: int
    schema: TableSchema
    summary: DataSummary  # aggregates only (no row): what partners compare before training


class PartnerWorker:
    def __init__(self, job: str, worker_id: str, partner: str, data: dict, seed: int) -> None:
        torch.set_num_threads(1)  # fractional CPUs on small hosts: one thread per replica
        self.job = job
        self.worker_id = worker_id
        self.partner = partner
        self.seed = seed
        self._data_spec = data
        # Artificial slowdown (1.0 = none): fault injection by `raysys chaos` and spec `chaos:`.
        self.slowdown = 1.0
        self.replica: Replica | None = None
        self.group: GenerationGroup | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._noise: torch.Generator | None = None  # DP noise, made on the first private step
        self._tags = {"job": job, "partner": partner, "worker": worker_id}

    # -- life cycle --------------------------------------------------------------------------
    def load(self, secure: bool = False) -> WorkerInfo:
        """Read this partner's table (the only read of partner data anywhere in raysys). In a
        job with secure aggregation also ready its kernels, so the first step need not."""
        if secure:
            from raysys.privacy.secagg import SecureAggregator  # secure jobs only: numba, AES

            SecureAggregator.warm()
        table = load_partner_table(
            self.partner, self._data_spec["path"], self._data_spec.get("features"),
            self._data_spec.get("label", "label"),
        )
        self._x = torch.from_numpy(table.x)
        self._y = torch.from_numpy(table.y)
        ctx = ray.get_runtime_context()
        return WorkerInfo(self.worker_id, self.partner, ctx.get_node_id(),
                          ray.util.get_node_ip_address(), os.getpid(), table.schema,
                          summarize(table.x, table.y, table.schema))

    def build(self, cfg: ReplicaConfig, state: dict | None = None) -> int:
        """Build the replica (same seed everywhere: same initial parameters), or load `state`."""
        self.replica = Replica(cfg)
        if state is not None:
            self.replica.load_state(state)
        return self.replica.step

    def join(self, generation: int, rank: int, world: int, store_host: str, store_port: int,
             timeout_s: float, partners: list[str], secure: bool = False,
             cross_partner_delay_s: float = 0.0, mask_neighbours: int | None = None) -> int:
        self.leave()
        self.group = GenerationGroup(
            generation, rank, world, store_host, store_port, timeout_s, partners, secure,
            partner_group=self.replica.fusion is not None,
            cross_partner_delay_s=cross_partner_delay_s, mask_neighbours=mask_neighbours)
        return self.replica.step

    def leave(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def export_state(self) -> dict:
        return self.replica.state()

    def import_state(self, state: dict) -> int:
        self.replica.load_state(state)
        return self.replica.step

    def settle(self) -> int:
        """The step this worker can continue from: under local SGD an unfinished round is
        rolled back first (see raysys/train/fusion.py)."""
        return self.replica.settle() if self.replica else -1

    def set_slowdown(self, factor: float) -> None:
        self.slowdown = factor

    # -- training ----------------------------------------------------------------------------
    def run_steps(self, generation: int, first_step: int, n_steps: int,
                  plan: WorkerPlan) -> ChunkReport:
        report = ChunkReport(self.worker_id, first_step)
        if self.group is None or self.group.generation != generation:
            report.error = f"{self.worker_id} is not in generation {generation}"
            return report
        if self.replica.step != first_step:
            report.error = f"{self.worker_id} is at step {self.replica.step}, not {first_step}"
            return report
        rows = int(self._y.shape[0])
        fusion = self.replica.fusion  # None: all-reduce every step across all partners
        last = first_step + n_steps - 1
        pending = 0  # steps of the current local-SGD round, not yet fused
        for step in range(first_step, first_step + n_steps):
            t0 = time.perf_counter()
            if plan.partner_batch:
                idx = step_indices(self.seed, self.partner, rows, plan.partner_batch, step)
                mine = torch.from_numpy(split_indices(idx, list(plan.shares))[plan.position])
            else:  # the partner contributes nothing this step (its privacy budget is spent)
                mine = torch.zeros(0, dtype=torch.int64)
            if plan.dp is not None and self._noise is None:
                from raysys.privacy.dp import noise_generator

                self._noise = noise_generator()  # from os.urandom: nobody else can predict it
            self.replica.local_gradients(self._x[mine], self._y[mine], plan.dp, self._noise)
            t1 = time.perf_counter()
            if self.slowdown > 1.0:
                time.sleep((t1 - t0) * (self.slowdown - 1.0))
                t1 = time.perf_counter()
            fused = False
            sent = local_sent = 0
            try:
                if fusion is None:
                    sent = self.group.all_reduce_sum(self.replica.buckets, step)
                    loss, n = self.replica.apply()
                else:
                    local_sent = self.group.partner_all_reduce_sum(self.replica.buckets)
                    loss, n = self.replica.apply()  # the partner's own loss and samples
                    fusion.samples += int(mine.numel())
                    if fusion.cfg.ends_round(step, last):
                        tail = self.replica.buckets[-1][-TAIL:]
                        fusion.write_shares(tail)
                        sent = self.group.all_reduce_sum(self.replica.buckets, step)
                        fusion.fuse(tail, step + 1)
                        fused = True
            except CollectiveError as exc:
                report.error = str(exc)
                if fusion is not None:
                    # The unfinished round never left the partner: roll it back, and report
                    # only the steps up to the last fusion (they are re-run after recovery).
                    self.replica.settle()
                    report.truncate(report.steps_done - pending)
                break
            t2 = time.perf_counter()
            pending = 0 if fusion is None or fused else pending + 1
            report.steps_done += 1
            report.loss.append(loss)
            report.samples.append(n)
            report.local_batch.append(int(mine.numel()))
            report.compute_s.append(t1 - t0)
            report.sync_s.append(t2 - t1)
            report.bytes_sent.append(sent)
            report.bytes_local.append(local_sent)
        self._export_metrics(report)
        return report

    def _export_metrics(self, report: ChunkReport) -> None:
        if not report.steps_done:
            return
        for c, s in zip(report.compute_s, report.sync_s, strict=True):
            metrics.STEP_TIME.observe(c + s, tags=self._tags)
        elapsed = sum(report.compute_s) + sum(report.sync_s)
        local = sum(report.local_batch)
        metrics.WORKER_SAMPLES_PER_S.set(local / elapsed if elapsed else 0.0, tags=self._tags)
        metrics.LOSS.set(report.loss[-1], tags=self._tags)

    def flat_parameters(self) -> np.ndarray:
        return self.replica.flat_parameters().numpy()


RemotePartnerWorker = ray.remote(PartnerWorker)
