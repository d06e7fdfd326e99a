"""ClusterEnv with the RL policy's memory (history.py) and advisor (advisor.py) added.

The same env (`raysys/ClusterEnv-v0`: simulator, scenarios, featurize, Guardrails mask, reward)
with, after featurize()'s features, the `History` features and, with the advisor, the one-hot of
goodput's proposal; the advisor also adds one action, "follow the proposal" (always allowed: the
proposal has passed the Guardrails). So the network sees what RLPolicy will give it live.
Config: ClusterEnv's, plus `history` (default True) and `advisor` (default False); both False is
plain ClusterEnv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from raysys.agent.env import ClusterEnv
from raysys.agent.featurize import FEATURE_MAX
from raysys.agent.rl.advisor import Advisor
from raysys.agent.rl.history import History
from raysys.agent.rl.observation import extend
from raysys.control.decisions import Decision
from raysys.control.snapshot import Snapshot


class HistoryEnv(ClusterEnv):
    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        cfg = {**(config or {}), **kwargs}
        self.history = History(cfg.get("max_partners", 4)) if cfg.pop("history", True) else None
        advised = bool(cfg.pop("advisor", False))
        super().__init__(cfg)
        self.advisor = Advisor(self.action_vocabulary) if advised else None
        size = self.layout.size
        size += self.history.size if self.history is not None else 0
        size += self.advisor.size if self.advisor is not None else 0
        n = self.action_vocabulary.n + (1 if self.advisor is not None else 0)
        self.action_space = spaces.Discrete(n)
        self.observation_space = spaces.Dict(
            {
                "observations": spaces.Box(0.0, FEATURE_MAX, (size,), np.float32),
                "action_mask": spaces.Box(0.0, 1.0, (n,), np.float32),
            }
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.history is not None:
            self.history.reset()
        if self.advisor is not None:
            self.advisor.reset()
        return super().reset(seed=seed, options=options)

    def step(self, action: int):
        if self.advisor is not None:
            self.advisor.learn()  # the action is chosen: the advisor's refit is off its path
        return super().step(action)

    def _decode(self, action: int, snapshot: Snapshot) -> Decision:
        if self.advisor is not None:
            return self.advisor.decision(action, snapshot)
        return super()._decode(action, snapshot)

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # ClusterEnv builds every observation here, from the Snapshot it just took.
        obs, info = super()._observe()
        obs["observations"], self._mask = extend(
            obs["observations"], self._mask, self._snapshot, self.history, self.advisor,
            self.guardrails, self.sim.cost_per_worker_second)
        obs["action_mask"] = self._mask.astype(np.float32)
        info["action_mask"] = self._mask.copy()
        return obs, info
