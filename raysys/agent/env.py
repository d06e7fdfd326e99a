"""`raysys/ClusterEnv-v0`: the simulator as a gymnasium environment (registered on import).

Observation: {"observations": featurize(Snapshot), "action_mask": Guardrails.mask} (RLlib's
convention for masked discrete actions; the mask is in `info["action_mask"]` too). Actions: the
ActionSpace vocabulary. Reward per interval: -(seconds elapsed + lambda * worker-seconds held),
divided by `reward_scale` (default 1, so an episode's return is exactly -score; docs/agent.md).

Config (a dict, as RLlib passes `env_config`, or keyword arguments):
    scenarios: a scenario file, a folder of them, LoadedScenario objects, or a list of those;
               one is drawn per episode. Default: the shipped scenarios/ folder.
    randomize: True (default) varies profiles, node speeds and event times per episode
               (sim_events.DEFAULT_VARIATION); False replays scenarios as written.
    max_partners, max_workers_per_partner: featurize/ActionSpace sizes (defaults 4 and 8).
    reward_scale: divide rewards by this many seconds (e.g. the interval, for RL stability).
    progress_shaping: False (default). True adds kappa * samples processed in the interval,
               kappa = cost per sample of the initial allocation: potential-based shaping
               (return = -score + kappa * S, a constant shift) that pays for speed when it
               happens rather than only at the end (see tabular_q.py, docs/agent.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from raysys.agent.actions import ActionSpace
from raysys.agent.featurize import FEATURE_MAX, FeatureLayout, featurize
from raysys.agent.scenarios import (
    LoadedScenario,
    load_scenario,
    needs_missing_traces,
    scenario_files,
)
from raysys.agent.sim import Simulator
from raysys.agent.sim_events import DEFAULT_VARIATION, Variation
from raysys.control.decisions import Decision, describe
from raysys.control.guardrails import Guardrails
from raysys.control.snapshot import Snapshot

ENV_ID = "raysys/ClusterEnv-v0"
SHIPPED_SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def resolve_scenarios(source: Any) -> list[LoadedScenario]:
    """Scenarios from a file, a folder (skipping those whose traces are absent), objects, a list."""
    if isinstance(source, LoadedScenario):
        return [source]
    if isinstance(source, list | tuple):
        return [s for item in source for s in resolve_scenarios(item)]
    path = Path(source)
    if path.is_file():
        return [load_scenario(path)]
    from raysys.agent.scenarios import Scenario
    from raysys.yamlio import load_model

    loaded = []
    for file in scenario_files(path):
        if not needs_missing_traces(load_model(Scenario, file)):
            loaded.append(load_scenario(file))
    if not loaded:
        raise ValueError(f"{path}: no scenario could be loaded (traces missing?)")
    return loaded


class ClusterEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        cfg = {**(config or {}), **kwargs}
        self.scenarios = resolve_scenarios(cfg.get("scenarios", SHIPPED_SCENARIOS))
        randomize = cfg.get("randomize", True)
        self.variation: Variation = (
            randomize
            if isinstance(randomize, Variation)
            else DEFAULT_VARIATION
            if randomize
            else Variation()
        )
        self.layout = FeatureLayout(
            cfg.get("max_partners", 4), cfg.get("max_workers_per_partner", 8)
        )
        self.reward_scale = float(cfg.get("reward_scale", 1.0))
        self.progress_shaping = bool(cfg.get("progress_shaping", False))
        self.action_vocabulary = ActionSpace(self.layout.max_partners)
        too_many = [
            s.name for s in self.scenarios if len(s.spec.partners) > self.layout.max_partners
        ]
        if too_many:
            raise ValueError(
                f"scenarios {too_many} have more than {self.layout.max_partners} partners"
            )
        self.action_space = spaces.Discrete(self.action_vocabulary.n)
        self.observation_space = spaces.Dict(
            {
                "observations": spaces.Box(0.0, FEATURE_MAX, (self.layout.size,), np.float32),
                "action_mask": spaces.Box(0.0, 1.0, (self.action_vocabulary.n,), np.float32),
            }
        )
        self.sim: Simulator | None = None
        self._snapshot: Snapshot | None = None
        self._mask = np.ones(self.action_vocabulary.n, dtype=bool)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        index = options.get("scenario_index")
        if index is None:
            index = int(self.np_random.integers(len(self.scenarios)))
        scenario = self.scenarios[index]
        episode_seed = int(self.np_random.integers(1 << 31))
        self.sim = Simulator(scenario, seed=episode_seed, variation=self.variation)
        self.guardrails = Guardrails(scenario.spec.guardrails)
        self._snapshot = self.sim.snapshot()
        obs, info = self._observe()
        info["scenario"] = scenario.name
        return obs, info

    def step(self, action: int):
        if self.sim is None or self._snapshot is None:
            raise RuntimeError("call reset() before step()")
        snap = self._snapshot
        decision = self.guardrails.filter(self._decode(int(action), snap), snap)
        applied = self.sim.apply(decision)
        before, samples = self.sim.score, self.sim.samples_done
        self.sim.advance(self.sim.interval_s)
        reward = -(self.sim.score - before)
        if self.progress_shaping:
            sim = self.sim
            kappa = (1.0 + sim.cost_per_worker_second * sim.initial_workers) / sim.initial_rate
            reward += kappa * (sim.samples_done - samples)
        reward /= self.reward_scale
        self._snapshot = self.sim.snapshot()
        obs, info = self._observe()
        info.update(decision=describe(decision), applied=applied)
        terminated = self.sim.done
        if terminated:
            info.update(
                score=self.sim.score,
                finished=self.sim.finished,
                completion_time_s=self.sim.time_s,
                worker_seconds=self.sim.worker_seconds,
            )
        return obs, float(reward), terminated, False, info

    def _decode(self, action: int, snapshot: Snapshot) -> Decision:
        return self.action_vocabulary.decode(action, snapshot)

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        snap = self._snapshot
        self._mask = self.guardrails.mask(snap, self.action_vocabulary)
        features = featurize(
            snap,
            self.layout.max_partners,
            self.layout.max_workers_per_partner,
            self.sim.cost_per_worker_second,
        )
        obs = {"observations": features, "action_mask": self._mask.astype(np.float32)}
        return obs, {"action_mask": self._mask.copy(), "time_s": snap.time_s}

    def action_masks(self) -> np.ndarray:
        """The current mask (the name sb3-contrib's MaskablePPO looks for)."""
        return self._mask.copy()


def register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="raysys.agent.env:ClusterEnv")


register()
