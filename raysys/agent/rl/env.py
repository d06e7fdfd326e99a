"""ClusterEnv with the RL policy's memory (history.py) appended to its observations.

The same env (`raysys/ClusterEnv-v0`: simulator, scenarios, featurize, Guardrails mask, reward)
with `History` features after featurize()'s, so the network sees what RLPolicy will give it
live. Config: ClusterEnv's, plus `history` (default True; False is plain ClusterEnv).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from raysys.agent.env import ClusterEnv
from raysys.agent.featurize import FEATURE_MAX
from raysys.agent.rl.history import History


class HistoryEnv(ClusterEnv):
    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        cfg = {**(config or {}), **kwargs}
        self.history = History(cfg.get("max_partners", 4)) if cfg.pop("history", True) else None
        super().__init__(cfg)
        if self.history is not None:
            size = self.layout.size + self.history.size
            self.observation_space = spaces.Dict(
                {
                    "observations": spaces.Box(0.0, FEATURE_MAX, (size,), np.float32),
                    "action_mask": self.observation_space["action_mask"],
                }
            )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.history is not None:
            self.history.reset()
        return super().reset(seed=seed, options=options)

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # ClusterEnv builds every observation here, from the Snapshot it just took.
        obs, info = super()._observe()
        if self.history is not None:
            extra = self.history.update(self._snapshot, self.sim.cost_per_worker_second)
            obs["observations"] = np.concatenate([obs["observations"], extra])
        return obs, info
