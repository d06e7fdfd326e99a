"""Local SGD across partners: rounds of local steps, then a sample-weighted fusion (FedAvg).

In `aggregation.mode: local_sgd` a partner's workers all-reduce among themselves every step (one
synchronous model per partner: the hierarchical case when a partner has several workers) and
exchange with the other partners only once per round, at a fusion:

    delta_p = w_p - w_global                      every partner's change over the round
    Delta   = sum_p n_p delta_p / sum_p n_p        weighted by the samples each contributed
    w_global <- server_optimizer(w_global, Delta)  fedavg: w + lr Delta; fedavgm: momentum on
                                                   Delta; fedadam: Adam on Delta (Reddi et al.)

The weighted sum travels through the job's gradient buckets: each worker writes its own share,
(w_p - w_global) * (samples it processed this round), into the buckets (each parameter's .grad
is a view into them) with its sample count in the last tail slot, and the generation's global
all-reduce sums them (masked under secure aggregation, like gradients). Workers of one partner
hold the same w_p, so their shares add up to n_p delta_p. Every worker then applies the same
server step to the same sum, so all replicas hold the same w_global after a fusion without
anyone being a server.

A round ends every `local_steps` steps (counted from step 0) and at the end of every call of
`run_steps`; the controller makes calls end only on round boundaries, at the end of the job and
where a partner's privacy budget ends, so where fusions happen depends on the spec alone.

FedProx (`proximal_mu` > 0) adds mu (w - w_global) to each local gradient after averaging, the
gradient of mu/2 |w - w_global|^2. Each round starts with fresh local optimizer state (the
usual FedAvg client), so momentum never carries a partner's direction across a fusion.

Failure: until a fusion completes, a round's local progress exists only inside its partner, so
a failed round is rolled back to its start (`rollback`) and re-run in the next generation on the
same samples. Nothing about it left the partner, so nothing else needs undoing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FusionConfig:
    local_steps: int
    proximal_mu: float = 0.0
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_betas: tuple[float, float] = (0.9, 0.99)
    server_tau: float = 1e-3

    def ends_round(self, step: int, last_step_of_call: int) -> bool:
        """Whether a fusion follows `step` (0-based)."""
        return (step + 1) % self.local_steps == 0 or step == last_step_of_call


class PartnerFusion:
    """One replica's local-SGD state: the global model of the last fusion, where that round
    started, the samples this worker processed since, and the server optimizer's buffers."""

    def __init__(self, cfg: FusionConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step: int) -> None:
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.global_params = [p.detach().clone() for p in self.params]
        self.round_start = step
        self.samples = 0  # processed by this worker in the current round
        self.fusions = 0  # completed, for fedadam's bias correction
        self._m: list[torch.Tensor] | None = None  # fedavgm velocity, fedadam first moment
        self._v: list[torch.Tensor] | None = None  # fedadam second moment

    def proximal_(self) -> None:
        """FedProx: add mu (w - w_global) to the (averaged) gradients."""
        mu = self.cfg.proximal_mu
        if mu:
            for p, g in zip(self.params, self.global_params, strict=True):
                p.grad.add_(p.detach() - g, alpha=mu)

    def write_shares(self, tail: torch.Tensor) -> None:
        """Put this worker's weighted change into the buckets (the .grad views) and its sample
        count into the last tail slot; the loss slots stay zero (a fusion carries no loss)."""
        w = float(self.samples)
        for p, g in zip(self.params, self.global_params, strict=True):
            torch.sub(p.detach(), g, out=p.grad).mul_(w)
        tail.zero_()
        tail[-1] = w

    def fuse(self, tail: torch.Tensor, step: int) -> int:
        """After the all-reduce: the buckets hold sum n_p delta_p, the tail the total samples.
        Take the server step, load the new global model and start the next round at `step`.
        Returns the round's samples over all partners."""
        total = int(round(float(tail[-1])))
        if total > 0:
            deltas = [p.grad.div_(total) for p in self.params]
            self._server_step(deltas)
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params, strict=True):
                p.copy_(g)
        self.fusions += 1
        self._start_round(step)
        return total

    def _server_step(self, deltas: list[torch.Tensor]) -> None:
        c = self.cfg
        kind = c.server_optimizer
        if kind == "fedavg":
            for g, d in zip(self.global_params, deltas, strict=True):
                g.add_(d, alpha=c.server_lr)
            return
        if self._m is None:
            self._m = [torch.zeros_like(g) for g in self.global_params]
            if kind == "fedadam":
                self._v = [torch.zeros_like(g) for g in self.global_params]
        if kind == "fedavgm":
            for g, d, m in zip(self.global_params, deltas, self._m, strict=True):
                m.mul_(c.server_momentum).add_(d)
                g.add_(m, alpha=c.server_lr)
            return
        if kind == "fedadam":
            b1, b2 = c.server_betas
            for g, d, m, v in zip(self.global_params, deltas, self._m, self._v, strict=True):
                m.mul_(b1).add_(d, alpha=1 - b1)
                v.mul_(b2).addcmul_(d, d, value=1 - b2)
                # Reddi et al. Algorithm 2 has no bias correction; tau keeps small v from
                # blowing up the step.
                g.addcdiv_(m, v.sqrt().add_(c.server_tau), value=c.server_lr)
            return
        raise ValueError(f"unknown server optimizer '{kind}'")

    def _start_round(self, step: int) -> None:
        self.round_start = step
        self.samples = 0
        self.optimizer.state.clear()  # fresh local optimizer state each round

    def rollback(self) -> int:
        """Undo the local steps of an unfinished round; returns the step it started at."""
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params, strict=True):
                p.copy_(g)
        self._start_round(self.round_start)
        return self.round_start

    # -- state: only valid on a round boundary, where every replica holds w_global ------------
    def state(self) -> dict:
        return {"fusions": self.fusions,
                "m": None if self._m is None else [t.clone() for t in self._m],
                "v": None if self._v is None else [t.clone() for t in self._v]}

    def load_state(self, state: dict | None, step: int) -> None:
        """After the model was loaded: its parameters are the global model of a boundary."""
        self.global_params = [p.detach().clone() for p in self.params]
        state = state or {}
        self.fusions = int(state.get("fusions", 0))
        self._m = [t.clone() for t in state["m"]] if state.get("m") is not None else None
        self._v = [t.clone() for t in state["v"]] if state.get("v") is not None else None
        self._start_round(step)


def fusion_config(spec) -> FusionConfig | None:
    """The FusionConfig of a JobSpec, or None under allreduce."""
    agg = spec.aggregation
    if agg.mode != "local_sgd":
        return None
    return FusionConfig(agg.local_steps, agg.proximal_mu, agg.server_optimizer,
                        agg.resolved_server_lr, agg.server_momentum, tuple(agg.server_betas),
                        agg.server_tau)


def round_end(step: int, local_steps: int) -> int:
    """The round boundary that closes the round containing `step` (the first multiple of
    local_steps strictly after it)."""
    return (step // local_steps + 1) * local_steps
