"""TabularQ: Q-learning over a coarse discretisation of featurize(), trained in the simulator.

A baseline between the heuristics and the RLlib policy: same observations, actions, mask and
objective as the RL agent (ClusterEnv), but a table instead of a network. Two choices keep the
table small enough to fill in a few hundred simulated episodes:

* Factored keys. The value of an action on partner k is keyed by (global buckets, partner k's
  buckets, action kind), shared by all partner slots; Noop is keyed by the pacing partner (the
  one whose workers set the step time). A job with three partners reuses what two taught.
* Progress shaping. The objective's per-interval cost (seconds + lambda * worker-seconds) is only
  repaid at the end, when the job finishes sooner; far beyond a discount horizon. Training adds
  the potential-based term kappa * samples processed, kappa = cost per sample of the initial
  allocation, so a faster allocation is rewarded when it happens. With gamma = 1 the return is
  -score + kappa * S, a constant shift, so the best policy is unchanged (Ng et al., 1999).

Hyperparameters are the fields of TabularQConfig.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysys.agent.actions import ActionSpace, PartnerAction
from raysys.agent.featurize import PARTNER_FEATURES, FeatureLayout, featurize
from raysys.agent.policies import Policy, register_policy
from raysys.agent.scenarios import LoadedScenario
from raysys.agent.sim import Simulator
from raysys.agent.sim_events import DEFAULT_VARIATION, Variation
from raysys.control.decisions import Decision
from raysys.control.guardrails import GuardrailConfig, Guardrails
from raysys.control.snapshot import Snapshot

Key = tuple[tuple[int, ...], tuple[int, ...], str]


@dataclass(frozen=True)
class TabularQConfig:
    episodes: int = 300
    alpha: float = 0.2  # learning rate
    gamma: float = 0.9  # discount per decision interval
    epsilon_start: float = 0.3
    epsilon_end: float = 0.02
    seed: int = 0
    max_partners: int = 4
    max_workers_per_partner: int = 8


def action_keys(features: np.ndarray, layout: FeatureLayout) -> list[Key | None]:
    """The table key of every action index (None for partner slots the job does not have)."""
    f = features.tolist()
    g = layout.global_index
    global_key = (
        bisect_right((0.1, 0.25), f[g("cost_rate")]),
        int(f[g("straggle")] > 1.3),
        int(f[g("progress")] > 0.9),
    )
    locals_: list[tuple[int, ...]] = []
    pace: list[float] = []
    at = {name: layout.partner_index(0, name) for name in PARTNER_FEATURES}
    for slot in range(layout.max_partners):
        shift = slot * layout.per_partner
        if f[at["present"] + shift] == 0:
            break
        locals_.append(
            (
                round(f[at["workers_of_max"] + shift] * 8),  # eighths of max_workers
                bisect_right((0.9, 1.05), f[at["relative_time"] + shift]),
                int(f[at["slowest_vs_median"] + shift] > 1.4),
                int(f[at["imbalance"] + shift] > 1.15),
                int(f[at["free_slots"] + shift] > 0),
            )
        )
        pace.append(f[at["relative_time"] + shift])
    keys: list[Key | None] = [None] * (1 + len(PartnerAction) * layout.max_partners)
    if locals_:
        pacing = max(range(len(pace)), key=lambda k: (pace[k], -k))
        keys[0] = (global_key, locals_[pacing], "noop")
    for slot, local in enumerate(locals_):
        for kind in PartnerAction:
            keys[1 + slot * len(PartnerAction) + kind] = (global_key, local, kind.name)
    return keys


class QTable:
    def __init__(self, layout: FeatureLayout) -> None:
        self.layout = layout
        self.values: dict[Key, float] = {}
        self.visits: dict[Key, int] = {}

    def value(self, key: Key | None) -> float:
        return self.values.get(key, 0.0) if key is not None else -np.inf

    def best(self, keys: list[Key | None], allowed: np.ndarray, learned_only: bool) -> int:
        """Highest-valued allowed action; with learned_only, unvisited actions are skipped (Noop
        is always a candidate, so a state never seen falls back to doing nothing)."""
        best, best_value = 0, self.values.get(keys[0], 0.0)
        for index in np.flatnonzero(allowed):
            key = keys[index]
            if index == 0 or key is None or (learned_only and key not in self.values):
                continue
            if self.values.get(key, 0.0) > best_value:
                best, best_value = int(index), self.values.get(key, 0.0)
        return best

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"key": [list(k[0]), list(k[1]), k[2]], "q": v, "visits": self.visits.get(k, 0)}
            for k, v in sorted(self.values.items())
        ]
        layout = {
            "max_partners": self.layout.max_partners,
            "max_workers_per_partner": self.layout.max_workers_per_partner,
        }
        path.write_text(json.dumps({"layout": layout, "rows": rows}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> QTable:
        data = json.loads(Path(path).read_text())
        table = cls(FeatureLayout(**data["layout"]))
        for row in data["rows"]:
            key = (tuple(row["key"][0]), tuple(row["key"][1]), row["key"][2])
            table.values[key] = float(row["q"])
            table.visits[key] = int(row["visits"])
        return table


def train_tabular_q(
    scenarios: Sequence[LoadedScenario],
    config: TabularQConfig = TabularQConfig(),
    variation: Variation = DEFAULT_VARIATION,
    on_episode: Callable[[int, float], None] | None = None,
) -> QTable:
    """Epsilon-greedy Q-learning over episodes cycling through `scenarios` (randomised by
    `variation`; seeds are drawn from config.seed, offset so training never reuses the
    evaluation seeds 0..N)."""
    if not scenarios:
        raise ValueError("train_tabular_q needs at least one scenario")
    table = QTable(FeatureLayout(config.max_partners, config.max_workers_per_partner))
    rng = np.random.default_rng(config.seed)
    for episode in range(config.episodes):
        scenario = scenarios[episode % len(scenarios)]
        frac = episode / max(config.episodes - 1, 1)
        epsilon = config.epsilon_start + (config.epsilon_end - config.epsilon_start) * frac
        sim = Simulator(scenario, seed=int(rng.integers(1 << 30)) + 1_000_000, variation=variation)
        _train_episode(table, sim, Guardrails(scenario.spec.guardrails), config, epsilon, rng)
        if on_episode is not None:
            on_episode(episode, sim.score)
    return table


def _train_episode(
    table: QTable,
    sim: Simulator,
    guard: Guardrails,
    config: TabularQConfig,
    epsilon: float,
    rng: np.random.Generator,
) -> None:
    layout, space = table.layout, ActionSpace(table.layout.max_partners)
    lam = sim.cost_per_worker_second
    kappa = (1.0 + lam * sim.initial_workers) / sim.initial_rate  # cost per sample at the start

    def observe(snap: Snapshot) -> tuple[list[Key | None], np.ndarray]:
        features = featurize(snap, layout.max_partners, layout.max_workers_per_partner, lam)
        return action_keys(features, layout), guard.mask(snap, space)

    snap = sim.snapshot()
    keys, allowed = observe(snap)
    while not sim.done:
        if rng.random() < epsilon:
            action = int(rng.choice(np.flatnonzero(allowed)))
        else:
            action = table.best(keys, allowed, learned_only=False)
        sim.apply(guard.filter(space.decode(action, snap), snap))
        score, samples = sim.score, sim.samples_done
        sim.advance(sim.interval_s)
        shaped = kappa * (sim.samples_done - samples) - (sim.score - score)
        reward = shaped / sim.interval_s  # in units of one interval's cost at the start
        snap = sim.snapshot()
        next_keys, next_allowed = observe(snap)
        target = reward
        if not sim.done:
            target += config.gamma * table.value(
                next_keys[table.best(next_keys, next_allowed, learned_only=False)]
            )
        key = keys[action]
        old = table.values.get(key, 0.0)
        table.values[key] = old + config.alpha * (target - old)
        table.visits[key] = table.visits.get(key, 0) + 1
        keys, allowed = next_keys, next_allowed


@register_policy("tabularq")
class TabularQPolicy(Policy):
    """Greedy over a trained QTable (from `raysys agent train-tabular` or train_tabular_q)."""

    name = "tabularq"

    def __init__(
        self,
        table: QTable | str | Path | None = None,
        guardrails: GuardrailConfig | None = None,
        cost_per_worker_second: float = 0.0,
    ) -> None:
        super().__init__(cost_per_worker_second)
        if table is None:
            raise ValueError(
                "tabularq needs table=<QTable or JSON path>; train one with "
                "`raysys agent train-tabular --scenarios DIR --out tabularq.json`"
            )
        self.table = table if isinstance(table, QTable) else QTable.load(table)
        self.space = ActionSpace(self.table.layout.max_partners)
        self.guardrails = Guardrails(guardrails)

    def decide(self, snapshot: Snapshot) -> Decision:
        layout = self.table.layout
        features = featurize(
            snapshot,
            layout.max_partners,
            layout.max_workers_per_partner,
            self.cost_per_worker_second,
        )
        mask = self.guardrails.mask(snapshot, self.space)
        action = self.table.best(action_keys(features, layout), mask, learned_only=True)
        return self.space.decode(action, snapshot)
