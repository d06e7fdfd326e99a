"""One model + optimizer replica, and the per-step arithmetic shared by workers and references.

Gradients are summed per sample on each replica (loss with reduction="sum"), summed across
replicas by the all-reduce, and divided by the number of samples the whole step used. The result
is the mean gradient over the step's samples however they were split, which is what makes the
parameters independent of worker count and split (invariant 2).

Gradients live in flat per-bucket buffers and each parameter's `.grad` is a view into them, so
backward writes straight into what the all-reduce sends (no copy in, no copy out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysys.models import build_model, build_optimizer
from raysys.train.fusion import FusionConfig, PartnerFusion

TAIL = 3  # slots after the last bucket's gradients: [loss_sum, loss_samples, samples]


@dataclass(frozen=True)
class DPStep:
    """Differential privacy for one worker's step: clip each sample's gradient to
    max_grad_norm, then add N(0, noise_std^2) to every gradient coordinate."""

    max_grad_norm: float
    noise_std: float


@dataclass(frozen=True)
class ReplicaConfig:
    model: str
    model_kwargs: dict
    in_features: int
    num_classes: int
    seed: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    bucket_mb: float = 25.0
    fusion: FusionConfig | None = None  # local SGD across partners (aggregation: local_sgd)


class Replica:
    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module = build_model(
            cfg.model, cfg.model_kwargs, cfg.in_features, cfg.num_classes, cfg.seed
        )
        self.optimizer = build_optimizer(
            self.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay
        )
        self.step = 0  # optimizer steps applied so far
        self.buckets = self._bind_gradient_buckets(int(cfg.bucket_mb * 2**20))
        self._loss = nn.CrossEntropyLoss(reduction="sum")
        self._clipper = None  # a DPClipper, made on the first private step
        self.fusion = None if cfg.fusion is None else PartnerFusion(
            cfg.fusion, self.model, self.optimizer, self.step)

    def _bind_gradient_buckets(self, bucket_bytes: int) -> list[torch.Tensor]:
        """Allocate flat buffers and make every parameter's .grad a view into one of them.

        The last bucket carries TAIL extra slots, [loss_sum, loss_samples, samples], so the
        step's global loss and sample count travel in the same all-reduce as the gradients.
        loss_samples counts the samples whose loss is in loss_sum: a partner under differential
        privacy keeps its loss to itself (its sensitivity is unbounded), so it is smaller than
        samples then.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if groups[-1] and (size + p.numel()) * 4 > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel()
        buckets = []
        for i, group in enumerate(groups):
            extra = TAIL if i == len(groups) - 1 else 0
            flat = torch.zeros(sum(p.numel() for p in group) + extra, dtype=torch.float32)
            offset = 0
            for p in group:
                p.grad = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
            buckets.append(flat)
        return buckets

    def gradient_views(self) -> list[torch.Tensor]:
        """The buckets without the tail slots: where gradients (and DP noise) go."""
        return [*self.buckets[:-1], self.buckets[-1][:-TAIL]]

    def local_gradients(self, x: torch.Tensor, y: torch.Tensor, dp: DPStep | None = None,
                        noise: torch.Generator | None = None) -> None:
        """Zero the buffers, then sum per-sample gradients of this replica's samples into them:
        as they are, or under differential privacy each clipped to dp.max_grad_norm, plus this
        worker's share of the partner's Gaussian noise (added even with no rows, or the
        partner's aggregate would carry less noise than accounted for)."""
        for b in self.buckets:
            b.zero_()
        n = int(y.shape[0])
        tail = self.buckets[-1]
        if dp is None:
            if n:
                loss = self._loss(self.model(x), y)
                loss.backward()
                tail[-3] = loss.detach()
                tail[-2] = float(n)
        else:
            if self._clipper is None or self._clipper.max_grad_norm != dp.max_grad_norm:
                from raysys.privacy.dp import DPClipper  # DP jobs only: pulls in opacus later

                self._clipper = DPClipper(self.model, self._loss, dp.max_grad_norm)
            if n:
                self._clipper.clipped_gradient_sum(x, y)
            if dp.noise_std > 0:
                from raysys.privacy.dp import add_noise

                add_noise(self.gradient_views(), dp.noise_std, noise)
        tail[-1] = float(n)

    def apply(self) -> tuple[float, int]:
        """After the buffers hold the sum over all replicas: average and take the optimizer step.
        Returns the step's global mean loss (NaN when no partner shared its loss) and samples."""
        tail = self.buckets[-1]
        n = int(round(float(tail[-1])))
        loss_samples = float(tail[-2])
        loss = float(tail[-3]) / loss_samples if loss_samples else float("nan")
        if n == 0:  # nobody contributed (every partner skipped): nothing to learn from
            self.step += 1
            return loss, 0
        for b in self.buckets:
            b.div_(n)
        if self.fusion is not None:
            self.fusion.proximal_()
        self.optimizer.step()
        self.step += 1
        return loss, n

    # -- state, for newcomers (in memory) and for durable checkpoints -------------------------
    def state(self) -> dict:
        """Under local SGD only valid on a round boundary (callers settle() first)."""
        state = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }
        if self.fusion is not None:
            state["fusion"] = self.fusion.state()
        return state

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.fusion is not None:
            self.fusion.load_state(state.get("fusion"), self.step)

    def settle(self) -> int:
        """Drop local progress no other partner has seen yet (an unfinished local-SGD round:
        after a failure it is re-run); returns the step this replica is then at."""
        if self.fusion is not None and self.step != self.fusion.round_start:
            self.step = self.fusion.rollback()
        return self.step

    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
