"""Scenario files: the validated YAML description of one simulated job (docs/scenarios.md).

A scenario names the job's step-time profile (a Pollux trace, a live profile CSV or parametric
constants), its partners and their bounds, the cluster's nodes and labels, timed and random events,
the episode and the objective weight. Any mistake is a ConfigError naming file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysys.agent.profile_fit import StepTimeModel, fit_profile, trace_profile, traces_dir
from raysys.control.guardrails import GuardrailConfig
from raysys.control.snapshot import matches
from raysys.yamlio import ConfigError, load_model, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParametricProfile(_Strict):
    a: float = Field(gt=0, description="compute seconds per step at batch 0")
    b: float = Field(ge=0, description="compute seconds per sample")
    c: float = Field(ge=0, description="sync seconds across nodes, 2 workers")
    d: float = Field(0.0, ge=0, description="extra sync seconds per worker beyond 2")
    gamma: float = Field(1.0, ge=1, le=10)
    c_local: float | None = Field(None, ge=0, description="sync within one node (default c)")
    d_local: float | None = Field(None, ge=0)


class ProfileSpec(_Strict):
    trace: str | None = None  # name under the traces folder (cifar10, bert, imagenet) or a folder
    csv: str | None = None  # a profile written by `raysys profile`, relative to this file
    parametric: ParametricProfile | None = None
    compute_scale: float = Field(1.0, gt=0, description="multiply compute times")
    sync_scale: float = Field(1.0, gt=0, description="multiply sync times")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ProfileSpec:
        given = [k for k in ("trace", "csv", "parametric") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of trace, csv, parametric (got {given or 'none'})")
        return self


class PartnerSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    batch_share: int = Field(gt=0, description="samples per step this partner's workers process")
    workers: int = Field(ge=1, description="initial workers")
    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    placement: dict[str, str] = Field(default_factory=dict, description="node label selector")

    @model_validator(mode="after")
    def _bounds(self) -> PartnerSpec:
        if not self.min_workers <= self.workers <= self.max_workers:
            raise ValueError(
                f"need min_workers <= workers <= max_workers, got {self.min_workers} <= "
                f"{self.workers} <= {self.max_workers}"
            )
        if self.batch_share < self.max_workers:
            raise ValueError(f"batch_share {self.batch_share} < max_workers {self.max_workers}")
        return self


class NodeSpec(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    labels: dict[str, str] = Field(default_factory=dict)
    cpus: float = Field(gt=0)
    speed: float = Field(1.0, gt=0, description="relative compute speed")
    count: int = Field(1, ge=1, description="expand into count nodes named <id>-0 .. <id>-(n-1)")

    def expand(self) -> list[NodeSpec]:
        if self.count == 1:
            return [self]
        return [
            self.model_copy(update={"id": f"{self.id}-{i}", "count": 1}) for i in range(self.count)
        ]


class _Event(_Strict):
    at: float = Field(ge=0, description="seconds after the start")
    jitter_s: float = Field(0.0, ge=0, description="per seed, move the event by up to +-jitter_s")


class ContentionEvent(_Event):
    kind: Literal["contention"]
    cpus: float = Field(gt=0, description="CPUs other tenants take on each matching node")
    node: str | None = None
    selector: dict[str, str] | None = None  # all nodes with these labels (if node is not given)
    duration_s: float | None = Field(None, gt=0, description="None: never given back")


class StragglerEvent(_Event):
    kind: Literal["straggler"]
    factor: float = Field(gt=1, description="compute of the target is this many times slower")
    worker: str | None = None  # e.g. alpha/0; replacing the worker cures it
    node: str | None = None  # every worker on the node; moving off the node cures it
    duration_s: float | None = Field(None, gt=0, description="None: persistent")

    @model_validator(mode="after")
    def _one_target(self) -> StragglerEvent:
        if (self.worker is None) == (self.node is None):
            raise ValueError("give exactly one of worker, node")
        return self


class WorkerFailureEvent(_Event):
    kind: Literal["worker_failure"]
    worker: str | None = None  # None: a random live worker


class NodeFailureEvent(_Event):
    kind: Literal["node_failure"]
    node: str
    duration_s: float | None = Field(None, gt=0, description="None: the node never comes back")


class NodeJoinEvent(_Event):
    kind: Literal["node_join"]
    node: NodeSpec


Event = Annotated[
    ContentionEvent | StragglerEvent | WorkerFailureEvent | NodeFailureEvent | NodeJoinEvent,
    Field(discriminator="kind"),
]

Range = tuple[float, float]


class RandomStragglers(_Strict):
    kind: Literal["stragglers"]
    rate_per_hour: float = Field(gt=0)
    factor: Range = (1.5, 3.0)
    duration_s: Range | None = (30.0, 300.0)  # None: persistent
    target: Literal["worker", "node"] = "worker"

    @model_validator(mode="after")
    def _slower(self) -> RandomStragglers:
        if not 1 < self.factor[0] <= self.factor[1]:
            raise ValueError(f"factor must be a range [low, high] with 1 < low <= high (a "
                             f"straggler is slower), got {list(self.factor)}")
        return self


class RandomContention(_Strict):
    kind: Literal["contention"]
    rate_per_hour: float = Field(gt=0)
    cpus: Range = (1.0, 4.0)
    duration_s: Range = (60.0, 600.0)
    selector: dict[str, str] = Field(default_factory=dict)


class RandomFailures(_Strict):
    kind: Literal["worker_failures"]
    rate_per_hour: float = Field(gt=0)


RandomEvents = Annotated[
    RandomStragglers | RandomContention | RandomFailures, Field(discriminator="kind")
]


class EpisodeSpec(_Strict):
    samples: int = Field(gt=0, description="samples the job must process (S)")
    interval_s: float = Field(10.0, gt=0, description="seconds between agent decisions")
    max_time_s: float | None = Field(None, gt=0, description="default: 3x the initial ETA + 600")
    observation_noise: float = Field(0.02, ge=0, le=0.5, description="lognormal sigma on timings")


class ObjectiveSpec(_Strict):
    cost_per_worker_second: float = Field(ge=0, description="lambda: seconds per worker-second")


class RescaleCosts(_Strict):
    """Seconds the whole job stalls for each kind of change (defaults from live measurements)."""

    scale_up_cold: float = Field(2.0, ge=0)  # newcomer on a node without a worker of its partner
    scale_up_warm: float = Field(0.5, ge=0)  # newcomer beside a worker of its partner
    scale_down: float = Field(0.5, ge=0)
    replace: float = Field(2.0, ge=0)
    rebalance: float = Field(0.05, ge=0)
    failure: float = Field(2.0, ge=0)  # survivors regroup after a worker dies


class Scenario(_Strict):
    name: str
    description: str = ""
    profile: ProfileSpec
    episode: EpisodeSpec
    objective: ObjectiveSpec
    partners: list[PartnerSpec] = Field(min_length=1)
    nodes: list[NodeSpec] = Field(min_length=1)
    events: list[Event] = Field(default_factory=list)
    random_events: list[RandomEvents] = Field(default_factory=list)
    rescale_costs: RescaleCosts = Field(default_factory=RescaleCosts)
    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [p.name for p in self.partners]
        if len(set(names)) != len(names):
            raise ValueError(f"partner names repeat: {names}")
        nodes = self.all_nodes()
        ids = [n.id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids repeat (count expands to <id>-<i>): {sorted(ids)}")
        for p in self.partners:
            fitting = [n for n in self.initial_nodes() if matches(n.labels, p.placement)]
            slots = sum(int(n.cpus // p.cpus_per_worker) for n in fitting)
            if slots < p.min_workers:
                raise ValueError(
                    f"partner {p.name}: placement {p.placement} fits {slots} workers"
                    f" on the initial nodes, fewer than min_workers {p.min_workers}"
                )
        for e in self.events:
            target = getattr(e, "node", None)
            if isinstance(target, str) and target not in ids:
                raise ValueError(f"event at {e.at}s names unknown node {target!r}")
            worker = getattr(e, "worker", None)
            if worker is not None and worker.split("/")[0] not in names:
                raise ValueError(f"event at {e.at}s names worker {worker!r} of no partner")
        return self

    def initial_nodes(self) -> list[NodeSpec]:
        return [n for spec in self.nodes for n in spec.expand()]

    def all_nodes(self) -> list[NodeSpec]:
        joined = [n for e in self.events if isinstance(e, NodeJoinEvent) for n in e.node.expand()]
        return self.initial_nodes() + joined

    @property
    def global_batch(self) -> int:
        return sum(p.batch_share for p in self.partners)


class LoadedScenario:
    """A validated scenario with its step-time model resolved (traces fitted, CSVs read)."""

    def __init__(self, spec: Scenario, model: StepTimeModel, source: Path | None = None) -> None:
        self.spec = spec
        self.model = model
        self.source = source

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"LoadedScenario({self.spec.name!r}, source={self.source})"


def resolve_profile(profile: ProfileSpec, base_dir: Path) -> StepTimeModel:
    """StepTimeModel for a profile spec; raises FileNotFoundError/ValueError with the reason."""
    if profile.parametric is not None:
        p = profile.parametric
        model = StepTimeModel.parametric(p.a, p.b, p.c, p.d, p.gamma, p.c_local, p.d_local)
    elif profile.trace is not None:
        folder = Path(profile.trace)
        if not folder.is_absolute() and len(folder.parts) == 1:
            path = trace_profile(profile.trace)
        else:
            path = folder if folder.is_absolute() else base_dir / folder
        model = fit_profile(path)
    else:
        path = Path(profile.csv)
        model = fit_profile(path if path.is_absolute() else base_dir / path)
    return model.scaled(profile.compute_scale, profile.sync_scale)


def needs_missing_traces(spec: Scenario) -> bool:
    """True when the scenario names a Pollux trace that is not on this machine (tests skip it)."""
    t = spec.profile.trace
    return t is not None and len(Path(t).parts) == 1 and not (traces_dir() / t).is_dir()


def load_scenario(path: str | Path) -> LoadedScenario:
    path = Path(path)
    spec = load_model(Scenario, path, docs="docs/scenarios.md")
    try:
        model = resolve_profile(spec.profile, path.parent)
    except (OSError, ValueError) as exc:
        _, lines = read_yaml(path)
        field = "trace" if spec.profile.trace else "csv" if spec.profile.csv else "parametric"
        line = lines.get(("profile", field), lines.get(("profile",), "?"))
        raise ConfigError(f"{path}:{line}: profile.{field}: {exc}") from None
    return LoadedScenario(spec, model, path)


def scenario_from_dict(data: dict, base_dir: str | Path = ".") -> LoadedScenario:
    """Build a scenario in code (same schema as the YAML files; pydantic errors on mistakes)."""
    spec = Scenario.model_validate(data)
    return LoadedScenario(spec, resolve_profile(spec.profile, Path(base_dir)))


def scenario_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise ConfigError(f"{folder}: no scenario files (*.yaml)")
    return files


def load_scenarios(folder: str | Path) -> list[LoadedScenario]:
    return [load_scenario(p) for p in scenario_files(folder)]
