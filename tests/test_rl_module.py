"""The action-masking RLModule never picks, samples or trains on an action the mask forbids."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.rllib")

import gymnasium as gym  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402

from raysys.agent.rl.module import MASKED_LOGIT, MaskedActorCritic  # noqa: E402

N_FEATURES, N_ACTIONS = 141, 17


def make_module(seed: int = 0, noop_bias: float = 2.0) -> MaskedActorCritic:
    torch.manual_seed(seed)
    obs = gym.spaces.Dict(
        {
            "observations": gym.spaces.Box(0.0, 5.0, (N_FEATURES,), np.float32),
            "action_mask": gym.spaces.Box(0.0, 1.0, (N_ACTIONS,), np.float32),
        }
    )
    return MaskedActorCritic(
        observation_space=obs,
        action_space=gym.spaces.Discrete(N_ACTIONS),
        model_config={"hidden": [16, 16], "noop_bias": noop_bias},
    )


MODULE = make_module()
# A module whose weights are large, so that masked actions would often win without the mask.
WILD = make_module(seed=1, noop_bias=-5.0)
with torch.no_grad():
    for p in WILD.pi.parameters():
        p.mul_(50.0)


@st.composite
def obs_and_mask(draw):
    batch = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    features = rng.uniform(0.0, 5.0, (batch, N_FEATURES)).astype(np.float32)
    mask = (rng.random((batch, N_ACTIONS)) < draw(st.floats(0.05, 0.9))).astype(np.float32)
    mask[:, 0] = np.maximum(mask[:, 0], (mask.sum(axis=1) == 0))  # never all-forbidden
    return torch.from_numpy(features), torch.from_numpy(mask)


def _batch(features, mask):
    return {Columns.OBS: {"observations": features, "action_mask": mask}}


@settings(max_examples=60, deadline=None)
@given(obs_and_mask())
def test_no_forward_pass_prefers_a_masked_action(data) -> None:
    features, mask = data
    for module in (MODULE, WILD):
        for forward in (module.forward_inference, module.forward_exploration):
            logits = forward(_batch(features, mask))[Columns.ACTION_DIST_INPUTS]
            chosen = logits.argmax(dim=-1)
            assert bool(mask[torch.arange(len(chosen)), chosen].all())
            assert bool((logits[mask < 0.5] == MASKED_LOGIT).all())
        assert bool(mask[torch.arange(len(features)), module.act_greedy(features, mask)].all())


@settings(max_examples=30, deadline=None)
@given(obs_and_mask())
def test_sampling_and_training_give_masked_actions_zero_probability(data) -> None:
    features, mask = data
    dist_cls = WILD.get_exploration_action_dist_cls()
    logits = WILD.forward_exploration(_batch(features, mask))[Columns.ACTION_DIST_INPUTS]
    samples = dist_cls.from_logits(logits).sample(sample_shape=(64,))
    assert bool(mask.gather(1, samples.T).all())
    train_logits = WILD.forward_train(_batch(features, mask))[Columns.ACTION_DIST_INPUTS]
    probs = torch.softmax(train_logits, dim=-1)
    assert float(probs[mask < 0.5].sum().detach()) == 0.0
    entropy = dist_cls.from_logits(train_logits).entropy()
    assert bool(torch.isfinite(entropy).all())  # finite mask value: no 0 * -inf = nan


def test_values_are_one_per_observation() -> None:
    features = torch.rand(5, N_FEATURES)
    values = MODULE.compute_values(_batch(features, torch.ones(5, N_ACTIONS)))
    assert values.shape == (5,)


def test_rejects_an_observation_without_a_mask() -> None:
    with pytest.raises(ValueError, match="action_mask"):
        MaskedActorCritic(
            observation_space=gym.spaces.Box(0.0, 5.0, (N_FEATURES,), np.float32),
            action_space=gym.spaces.Discrete(N_ACTIONS),
            model_config={},
        )
