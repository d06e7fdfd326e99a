"""RLPolicy ("rl"): the trained RLModule as a Policy, the same object in the evaluator, the
gymnasium env's world and the live AgentActor (ARCHITECTURE.md invariant 4).

decide(snapshot): featurize -> mask = Guardrails.mask(snapshot, ActionSpace) -> the module's
masked logits -> argmax -> ActionSpace.decode. Only the RLModule is loaded
(`RLModule.from_checkpoint`), never an Algorithm, so deciding needs torch but no Ray cluster.

This file stays cheap to import (registering the policy must not pull in torch or RLlib); the
module is loaded when an RLPolicy is built, and cached per path within a process, since the
evaluator builds one policy per episode.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from raysys.agent.actions import ActionSpace
from raysys.agent.featurize import featurize
from raysys.agent.policies import Policy, register_policy
from raysys.control.decisions import Decision
from raysys.control.guardrails import GuardrailConfig, Guardrails
from raysys.control.snapshot import Snapshot

# The shipped policy (trained by `raysys agent train`, see its MODEL_CARD.md).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "policies" / "default"
# Where an Algorithm checkpoint (algo.save_to_path) keeps the trained module.
MODULE_IN_ALGORITHM = Path("learner_group") / "learner" / "rl_module" / "default_policy"

_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


class CheckpointError(RuntimeError):
    """The RL checkpoint is missing or cannot be loaded (the message names the path)."""


def module_dir(path: str | Path) -> Path:
    """The RLModule folder of a checkpoint: the folder itself, or inside an Algorithm one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"RL checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"RL checkpoint {path} is not a folder (expected an RLModule dir)")
    # An Algorithm checkpoint has its own class_and_ctor_args.pkl (the Algorithm's): look inside
    # it first.
    for candidate in (path / MODULE_IN_ALGORITHM, path):
        if (candidate / "class_and_ctor_args.pkl").is_file():
            return candidate
    raise CheckpointError(
        f"RL checkpoint {path} holds no RLModule (no class_and_ctor_args.pkl there or in "
        f"{MODULE_IN_ALGORITHM})"
    )


def load_module(path: str | Path) -> Any:
    """The MaskedActorCritic saved under `path`, in eval mode; CheckpointError on any failure."""
    folder = module_dir(path)
    key = str(folder.resolve())
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        try:
            from ray.rllib.core.rl_module.rl_module import RLModule

            from raysys.agent.rl.module import MaskedActorCritic

            module = RLModule.from_checkpoint(folder)
        except Exception as exc:  # a corrupt or foreign checkpoint fails in many ways
            raise CheckpointError(
                f"RL checkpoint {folder} could not be loaded: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(module, MaskedActorCritic):
            raise CheckpointError(
                f"RL checkpoint {folder} holds a {type(module).__name__}, not a MaskedActorCritic"
            )
        module.eval()
        _CACHE[key] = module
        return module


@register_policy("rl")
class RLPolicy(Policy):
    """A trained MaskedActorCritic; `checkpoint=None` loads the shipped default policy.

    Raises CheckpointError (naming the path) when the checkpoint is missing or corrupt, or does
    not fit the action space / feature layout it is asked to serve.
    """

    name = "rl"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        cost_per_worker_second: float = 0.0,
        guardrails: GuardrailConfig | None = None,
    ) -> None:
        super().__init__(cost_per_worker_second)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        self.module = load_module(self.checkpoint)
        self.guardrails = Guardrails(guardrails)
        spaces = self.module.observation_space
        n_actions = int(self.module.action_space.n)
        n_features = int(spaces["observations"].shape[0])
        # The layout the module was trained with: partners from its action count (less the
        # advisor's action), workers per partner recorded in its model_config by the trainer.
        advised = bool(self.module.model_config.get("advisor"))
        per_partner = ActionSpace.ACTIONS_PER_PARTNER
        self.action_space = ActionSpace(max((n_actions - 1 - advised) // per_partner, 1))
        self.max_partners = self.action_space.max_partners
        self.max_workers_per_partner = int(
            self.module.model_config.get("max_workers_per_partner", 8)
        )
        from raysys.agent.rl.advisor import Advisor
        from raysys.agent.rl.history import History

        # Trained with HistoryEnv: the same memory of past Snapshots, reset with the policy.
        self.history = (
            History(self.max_partners) if self.module.model_config.get("history") else None
        )
        # Trained with the advisor: goodput consulted on every Snapshot, one action to follow it.
        self.advisor = Advisor(self.action_space) if advised else None
        expected = len(featurize(_EMPTY, self.max_partners, self.max_workers_per_partner))
        expected += self.history.size if self.history is not None else 0
        expected += self.advisor.size if self.advisor is not None else 0
        if self.action_space.n + advised != n_actions or expected != n_features:
            raise CheckpointError(
                f"RL checkpoint {self.checkpoint}: {n_features} features / {n_actions} actions "
                f"do not match featurize ({expected}) / ActionSpace "
                f"({self.action_space.n + advised})"
            )
        import torch

        # One decision is a batch-1 forward of a 64-wide MLP: a second thread cannot help and,
        # on a busy host, spinning threads cost milliseconds (measured 5 ms vs 40 us per layer).
        # Process-wide, which is right for the processes that decide (evaluator, AgentActor).
        torch.set_num_threads(1)
        self._torch = torch

    def reset(self) -> None:
        if self.history is not None:
            self.history.reset()
        if self.advisor is not None:
            self.advisor.reset()

    def learn(self) -> None:
        if self.advisor is not None:
            self.advisor.learn()

    def observe(self, snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """(features, mask) exactly as the training env built its observation. Call once per
        Snapshot, in order: the history features remember what they were shown."""
        features = featurize(
            snapshot, self.max_partners, self.max_workers_per_partner, self.cost_per_worker_second
        )
        from raysys.agent.rl.observation import extend

        mask = self.guardrails.mask(snapshot, self.action_space)
        return extend(features, mask, snapshot, self.history, self.advisor, self.guardrails,
                      self.cost_per_worker_second)

    def action_index(self, snapshot: Snapshot) -> int:
        features, mask = self.observe(snapshot)
        torch = self._torch
        x = torch.from_numpy(features).unsqueeze(0)
        m = torch.from_numpy(mask.astype(np.float32)).unsqueeze(0)
        return int(self.module.act_greedy(x, m)[0])

    def decide(self, snapshot: Snapshot) -> Decision:
        index = self.action_index(snapshot)
        if self.advisor is not None:
            return self.advisor.decision(index, snapshot)
        return self.action_space.decode(index, snapshot)


def _empty_snapshot() -> Snapshot:
    return Snapshot(0.0, 0, 0, 1, [], [], [], {}, {}, None, 0.0, 0, 0, 0.0, 0.0)


_EMPTY = _empty_snapshot()
