"""The RL policy's advisor: GoodputGreedy, consulted every interval; its proposal is one action.

Why: behaviour cloning from goodput reached only ~66% of goodput's own moves, and the network
trained that way lost to goodput on 6 of the 14 scenarios, mostly where goodput's online
step-time fit sizes a job that the network cannot size from one Snapshot's features. With the
advisor, the network does not have to reproduce that fit: one extra action means "do what the
advisor proposes", and the features say what that proposal is (one-hot over the ActionSpace).
Behaviour cloning then labels every state with that action, so the network starts out as goodput
exactly, and PPO learns where deviating from it pays.

The advisor is part of the policy: the same object runs in the training env (HistoryEnv), the
evaluator and the live AgentActor (through RLPolicy), and it only reads Snapshots (invariant 4).
It must see every Snapshot once, in order, as goodput's fit learns from each.

Its goodput differs from the `goodput` baseline in when it refits its step-time model (~50 ms a
refit), not in how it decides (GOODPUT_OPTIONS):
- in learn(), after the decision, so the policy's Snapshot -> Decision latency stays that of a
  forward pass; the proposal uses the model fitted one interval earlier;
- on a new (workers, nodes) configuration or a quarter more points, not on every new point
  (rebalances make a new point per local batch: hundreds per episode), which makes training
  episodes ~4.5x faster to simulate.
"""

from __future__ import annotations

import numpy as np

from raysys.agent.actions import ActionSpace
from raysys.control.decisions import NOOP, Decision
from raysys.control.guardrails import Guardrails
from raysys.control.snapshot import Snapshot

GOODPUT_OPTIONS = {"refit_after_deciding": True, "refit_growth": 0.25}


class Advisor:
    def __init__(self, space: ActionSpace) -> None:
        self.space = space
        self.size = space.n  # features: one-hot of the proposal's index in the ActionSpace
        self.follow_action = space.n  # the policy's action index for "follow the advisor"
        self.reset()

    def reset(self) -> None:
        """A new job: the next update() starts a fresh goodput (its fit is per job)."""
        self._policy = None
        self.proposal: Decision = NOOP

    def update(
        self, snapshot: Snapshot, guardrails: Guardrails, mask: np.ndarray,
        cost_per_worker_second: float,
    ) -> np.ndarray:
        """Consult goodput on this Snapshot; returns the features describing its proposal."""
        if self._policy is None:
            from raysys.agent.goodput import GoodputGreedyPolicy

            self._policy = GoodputGreedyPolicy(
                cost_per_worker_second=cost_per_worker_second, **GOODPUT_OPTIONS)
        self.proposal = guardrails.filter(self._policy.decide(snapshot), snapshot)
        index = self.space.encode(self.proposal, snapshot)
        if not mask[index]:
            index = 0
        features = np.zeros(self.size, dtype=np.float32)
        features[index] = 1.0
        return features

    def learn(self) -> None:
        """After the decision: goodput refits on what update() showed it (Policy.learn)."""
        if self._policy is not None:
            self._policy.learn()

    def decision(self, action: int, snapshot: Snapshot) -> Decision:
        """The Decision for a policy action index: the proposal, or the ActionSpace's."""
        if action == self.follow_action:
            return self.proposal
        return self.space.decode(action, snapshot)
