"""The RL policy's network: an RLlib RLModule whose action logits are masked by the Guardrails.

Observations are ClusterEnv's Dict {"observations": featurize(snapshot), "action_mask": mask}
(RLlib's convention for masked discrete actions, as in RLlib's
examples/rl_modules/classes/action_masking_rlm.py). Every forward pass (inference, exploration
and train) adds log(mask) to the logits, so an action the Guardrails forbid has probability 0
when sampling, never wins an argmax, and contributes nothing to PPO's loss.

A plain two-tower MLP (policy and value towers, no shared layers) instead of RLlib's catalog
models: small enough to read, to ship in the repository and to run in well under a millisecond
on one CPU thread. model_config keys:
    hidden: hidden layer sizes of each tower (default [64, 64])
    noop_bias: initial logit of Noop (default 2.0). With every logit near 0 at initialisation a
        fresh policy would rescale at almost every interval the mask allows; a positive Noop
        logit makes "change nothing" the starting default, which is the right one most of the
        time, and leaves the rest to learning.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

OBS_KEY = "observations"
MASK_KEY = "action_mask"
DEFAULT_HIDDEN = (64, 64)
DEFAULT_NOOP_BIAS = 2.0
# Added to the logit of a forbidden action: finite (so 0 * logit stays 0 in entropy and KL
# terms, where -inf would give NaN) and far below any logit a network produces.
MASKED_LOGIT = torch.finfo(torch.float32).min


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with forbidden actions (mask <= 0.5) pushed to MASKED_LOGIT."""
    return torch.where(mask > 0.5, logits, torch.full_like(logits, MASKED_LOGIT))


def _mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(a, b)
        last = i == len(sizes) - 2
        # Orthogonal init (CleanRL's PPO): small output gain keeps the initial policy close to
        # uniform (plus the Noop bias) and the initial value close to 0.
        nn.init.orthogonal_(linear.weight, out_gain if last else 2**0.5)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskedActorCritic(TorchRLModule, ValueFunctionAPI):
    """PPO-compatible RLModule: masked policy logits and a separate value tower."""

    def setup(self) -> None:
        space = self.observation_space
        if not isinstance(space, gym.spaces.Dict) or {OBS_KEY, MASK_KEY} - set(space.spaces):
            raise ValueError(
                f"MaskedActorCritic needs a Dict observation space with {OBS_KEY!r} and "
                f"{MASK_KEY!r} (ClusterEnv's), got {space}"
            )
        n_in = int(space[OBS_KEY].shape[0])
        n_out = int(self.action_space.n)
        if tuple(space[MASK_KEY].shape) != (n_out,):
            raise ValueError(f"action_mask shape {space[MASK_KEY].shape} != ({n_out},)")
        hidden = list(self.model_config.get("hidden", DEFAULT_HIDDEN))
        self.pi = _mlp([n_in, *hidden, n_out], out_gain=0.01)
        self.vf = _mlp([n_in, *hidden, 1], out_gain=1.0)
        with torch.no_grad():
            self.pi[-1].bias[0] = float(self.model_config.get("noop_bias", DEFAULT_NOOP_BIAS))

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        obs = batch[Columns.OBS]
        return masked_logits(self.pi(obs[OBS_KEY]), obs[MASK_KEY])

    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTION_DIST_INPUTS: self._logits(batch)}

    def _forward_exploration(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTION_DIST_INPUTS: self._logits(batch)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self._logits(batch)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return self.vf(batch[Columns.OBS][OBS_KEY]).squeeze(-1)

    # -- direct use (RLPolicy, pretraining): plain tensors, no RLlib batch dicts --------------
    def act_greedy(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked argmax for a batch of (features, mask): the deterministic policy."""
        with torch.no_grad():
            return masked_logits(self.pi(features), mask).argmax(dim=-1)
