"""JobSpec: the one validated configuration of a raysys job.

Everything a job needs is read from one YAML file and checked here, before any actor starts:
unknown keys, wrong types, min > max, duplicate partner names, missing files. Checks that need the
cluster (a placement label no node carries) run in `check_against_cluster` right after Ray is up
and still before any worker starts. Every error names the field path (and the YAML line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raysys.yamlio import ConfigError, load_model

_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,30}[a-z0-9])?$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A registry name (`mlp`, `cnn`, `linear`) or `package.module:function`, plus its kwargs."""

    name: str = "mlp"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from raysys.models import REGISTRY

        if ":" in v:
            module, _, fn = v.partition(":")
            if not module or not fn.isidentifier():
                raise ValueError(f"'{v}' is not of the form package.module:function")
        elif v not in REGISTRY:
            raise ValueError(f"unknown model '{v}'; known: {', '.join(sorted(REGISTRY))}")
        return v


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class DataSpec(_Strict):
    """A partner's private table. Read only inside that partner's workers."""

    path: str
    features: list[str] | None = None  # None: every column but the label
    label: str = "label"
    # True when the file lives only on the partner's own nodes (the usual multi-site case): the
    # driver cannot see it, so its existence is checked by the partner's workers before step 1.
    on_partner_nodes: bool = False

    @model_validator(mode="after")
    def _exists_here(self) -> DataSpec:
        if self.on_partner_nodes or _URI.match(self.path):
            return self
        if not Path(self.path).is_file():
            raise ValueError(
                f"data file '{self.path}' not found (relative paths are read from the working "
                f"directory {Path.cwd()}; set on_partner_nodes: true if it lives on the partner's "
                "nodes only)"
            )
        return self


class WorkerBounds(_Strict):
    initial: int = Field(1, ge=0)
    min: int = Field(1, ge=0)
    max: int = Field(4, ge=1)
    # Warm spares: started, data loaded, model built, but outside the group; scale-up takes one
    # instead of starting an actor cold (measured ~1-2 s for an actor that imports torch).
    spares: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if not self.min <= self.initial <= self.max:
            raise ValueError(
                f"initial ({self.initial}) must lie between min ({self.min}) and max ({self.max})"
            )
        return self


class DPSpec(_Strict):
    """Differential privacy for one partner's contribution (DP-SGD: per-sample clipping to
    `max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm per step)."""

    noise_multiplier: float | None = Field(None, ge=0)
    # With target_epsilon alone the noise is chosen so the planned steps spend exactly this
    # budget; with both, the budget caps a run that goes on longer (e.g. a resumed one).
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(..., gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    # When the budget is spent: the partner stops contributing, or the whole job stops.
    on_budget_spent: Literal["stop_partner", "stop_job"] = "stop_partner"

    @model_validator(mode="after")
    def _noise_or_budget(self) -> DPSpec:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set noise_multiplier or target_epsilon (or both)")
        return self


class PrivacySpec(_Strict):
    dp: DPSpec | None = None


class PartnerSpec(_Strict):
    name: str
    data: DataSpec
    # Node label selector: workers of this partner run only on nodes carrying all these labels.
    placement: dict[str, str] = Field(default_factory=dict)
    workers: WorkerBounds = Field(default_factory=WorkerBounds)
    cpus_per_worker: float = Field(0.5, gt=0)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    # With no live worker (its nodes lost or full, a replacement waiting for room): "skip" its
    # samples while the others train on, or "wait": the whole job holds until one of its
    # workers runs again, so every step has this partner's data. Never placed elsewhere.
    on_no_room: Literal["skip", "wait"] = "skip"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"'{v}' is not a valid partner name (lower-case letters, digits, '-' or '_', "
                "at most 32 characters)"
            )
        return v

    @model_validator(mode="after")
    def _waits_for_someone(self) -> PartnerSpec:
        if self.on_no_room == "wait" and self.workers.min < 1:
            raise ValueError(f"partner '{self.name}': on_no_room: wait needs workers.min >= 1 "
                             "(with no worker to replace, the job would wait forever)")
        return self


class EvaluationSpec(_Strict):
    """A held-out table scored at the end (and every `every_steps` if set); never a partner's."""

    path: str
    features: list[str] | None = None
    label: str = "label"
    every_steps: int | None = Field(None, ge=1)

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not _URI.match(v) and not Path(v).is_file():
            raise ValueError(f"evaluation file '{v}' not found")
        return v


class CheckpointSpec(_Strict):
    storage_path: str = "checkpoints"  # local folder or any pyarrow filesystem URI
    every_steps: int = Field(0, ge=0)  # 0: only at the end
    keep: int = Field(2, ge=1)


class AgentSpec(_Strict):
    """Filled by the agent: which policy steers the job and how often it looks."""

    # The shipped RL policy steers by default; it falls back to static with a warning if it
    # cannot be loaded, so a job never depends on it.
    policy: str = "rl"
    interval_s: float = Field(10.0, gt=0)
    checkpoint: str | None = None  # RLModule checkpoint for the `rl` policy
    cooldown_s: float = Field(30.0, ge=0)
    max_actions_per_minute: int = Field(4, ge=1)
    # The objective's lambda: what one worker-second costs against one second of waiting.
    cost_per_worker_second: float = Field(0.0, ge=0)
    # The cluster has a Ray autoscaler: capacity up to workers.max counts as available, and is
    # requested with request_resources when used (raysys/control/autoscale.py).
    autoscale: bool = False


class AggregationSpec(_Strict):
    """How partners combine what they learn (docs/cross-silo.md).

    allreduce: every step, all workers' gradients are summed (one synchronous model).
    local_sgd: each partner trains `local_steps` steps on its own data (its workers, if several,
    all-reduce inside the partner every step: hierarchical), then the partner models are fused:
    their changes averaged weighted by samples contributed (FedAvg) and applied by a server
    optimizer (plain average, server momentum, or Adam on the fused change)."""

    mode: Literal["allreduce", "local_sgd"] = "allreduce"
    local_steps: int = Field(5, ge=1)  # H: local steps between two fusions
    proximal_mu: float = Field(0.0, ge=0)  # FedProx: local loss + mu/2 |w - w_global|^2
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    # None: 1.0 for fedavg and fedavgm, 0.01 for fedadam (Reddi et al.'s range).
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)  # fedavgm
    server_betas: tuple[float, float] = (0.9, 0.99)  # fedadam
    server_tau: float = Field(1e-3, gt=0)  # fedadam: adaptivity floor

    @field_validator("server_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), not {list(v)}")
        return v

    @model_validator(mode="after")
    def _fields_of_mode(self) -> AggregationSpec:
        if self.mode == "allreduce":
            # Compared with the defaults, not with the fields set: a dumped spec sets them all.
            stray = sorted(name for name, f in type(self).model_fields.items()
                           if name != "mode" and getattr(self, name) != f.get_default(
                               call_default_factory=True))
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply with mode: local_sgd")
        return self

    @property
    def resolved_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.server_optimizer == "fedadam" else 1.0


class RuntimeSpec(_Strict):
    # A collective that waits longer than this is a failure (a peer died or hangs): the step is
    # re-run on the survivors instead of hanging the job.
    collective_timeout_s: float = Field(30.0, gt=0)
    bucket_mb: float = Field(25.0, gt=0)  # gradient all-reduce bucket size
    # Steps sent to the workers per call: fewer round trips to the controller; decisions and
    # checkpoints apply between calls. 0: chosen from the measured step time (~0.25 s per call).
    steps_per_call: int = Field(0, ge=0)
    log_every_steps: int = Field(10, ge=1)
    metrics_export_port: int | None = Field(None, ge=1024, le=65535)
    # Testing aid: every exchange that crosses partners (the all-reduce of a step in allreduce
    # mode, a fusion in local_sgd mode) waits this long first, to emulate slow inter-site links.
    cross_partner_delay_ms: float = Field(0.0, ge=0)


class ChaosSpec(_Strict):
    """A fault injected at a fixed step (a testing and demo aid, like `raysys chaos`)."""

    at_step: int = Field(..., ge=0)
    worker: str  # "<partner>/<index>"
    slow: float | None = Field(None, ge=1.0)  # compute takes this many times as long
    kill: bool = False

    @model_validator(mode="after")
    def _one_fault(self) -> ChaosSpec:
        if (self.slow is None) == (not self.kill):
            raise ValueError("give exactly one of slow: FACTOR or kill: true")
        partner, _, index = self.worker.partition("/")
        if not partner or not index.isdigit():
            raise ValueError(f"worker '{self.worker}' is not of the form <partner>/<index>")
        return self


class JobSpec(_Strict):
    name: str = "job"
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    global_batch_size: int = Field(..., ge=1)
    steps: int = Field(..., ge=1)
    seed: int = 0
    num_classes: int | None = Field(None, ge=2)
    partners: list[PartnerSpec] = Field(..., min_length=1)
    evaluation: EvaluationSpec | None = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    agent: AgentSpec = Field(default_factory=AgentSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    chaos: list[ChaosSpec] = Field(default_factory=list)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    # Pairwise-masked, fixed-point all-reduce: no worker or network observer sees another
    # partner's individual gradient, only the sum (raysys/privacy/secagg.py).
    secure_aggregation: bool = False
    # With secure aggregation: mask with this many nearest workers of other partners on each
    # side of a circle that interleaves the partners (a sparse, connected graph, as SecAgg+),
    # instead of with every worker of every other partner. Cheaper per step; a worker is then
    # exposed if its ~2n neighbours collude (raysys.privacy.secagg.mask_peers).
    secure_aggregation_neighbours: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _valid_job_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"'{v}' is not a valid job name (lower-case letters, digits, '-', '_')"
            )
        return v

    @field_validator("partners")
    @classmethod
    def _unique(cls, v: list[PartnerSpec], info: ValidationInfo) -> list[PartnerSpec]:
        seen: set[str] = set()
        for p in v:
            if p.name in seen:
                raise ValueError(f"duplicate partner name '{p.name}'")
            seen.add(p.name)
        return v

    @model_validator(mode="after")
    def _neighbours_need_secure_aggregation(self) -> JobSpec:
        if self.secure_aggregation_neighbours is not None and not self.secure_aggregation:
            raise ValueError("secure_aggregation_neighbours is set but secure_aggregation is "
                             "false: set secure_aggregation: true, or drop it")
        return self

    @model_validator(mode="after")
    def _chaos_names_partners(self) -> JobSpec:
        names = {p.name for p in self.partners}
        for i, c in enumerate(self.chaos):
            if c.worker.partition("/")[0] not in names:
                raise ValueError(f"chaos.{i}.worker: no partner named "
                                 f"'{c.worker.partition('/')[0]}'")
        return self

    @model_validator(mode="after")
    def _batch_covers_partners(self) -> JobSpec:
        if self.global_batch_size < len(self.partners):
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is smaller than the number of "
                f"partners ({len(self.partners)}): every partner contributes at least one sample"
            )
        return self

    def partner(self, name: str) -> PartnerSpec:
        for p in self.partners:
            if p.name == name:
                return p
        raise KeyError(name)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec; raises ConfigError naming file, line and field path."""
    return load_model(JobSpec, path)


def node_matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_against_cluster(spec: JobSpec, nodes: list[dict]) -> None:
    """Placement labels must be carried by at least one live node (`nodes` as from ray.nodes())."""
    live = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    problems = []
    for i, p in enumerate(spec.partners):
        matching = [n for n in live if node_matches(n.get("Labels", {}) or {}, p.placement)]
        if not matching:
            carried = sorted(
                {f"{k}={v}" for n in live for k, v in (n.get("Labels") or {}).items()
                 if not k.startswith("ray.io/")}
            )
            problems.append(
                f"partners.{i}.placement: no live node carries {p.placement} "
                f"(partner '{p.name}'; labels in the cluster: {', '.join(carried) or 'none'})"
            )
    if problems:
        raise ConfigError("\n".join(problems))
