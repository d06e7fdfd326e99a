"""Optional teacher prior: initialise the RLModule by imitating a heuristic before PPO.

PPO from a random network needs far more episodes than a 2-core machine gives it in minutes:
at first it rescales at random, and the effect of a worker added now shows up over hundreds of
intervals. So, when `TrainConfig.prior` names a policy (default "goodput"), training starts by
behaviour cloning (DAgger-style):

1. roll ClusterEnv episodes; at every interval the teacher sees the same Snapshot the env
   observed and its decision (after the Guardrails) is encoded in the ActionSpace, the label;
   in later rounds the student network drives some episodes (the teacher still labels every
   state, so the student learns to recover from its own mistakes);
2. fit the policy tower to the labels (cross-entropy over masked logits) and the value tower to
   the discounted shaped returns of those episodes, so PPO starts with a sensible critic.

PPO then optimises the objective itself from this starting point; nothing of the teacher is
used at decision time. The model card says whether a shipped policy was trained this way.

With the advisor (advisor.py) the teacher is `ADVISOR`: every state is labelled "follow the
advisor", so the clone is goodput exactly. Label smoothing (`smoothing`, a share of the target
spread over the allowed actions) keeps the clone from being certain, so that PPO's sampling still
tries the other actions and can learn where they pay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raysys.agent.env import ClusterEnv  # or HistoryEnv, a subclass
from raysys.agent.policies import make_policy
from raysys.agent.rl.module import MaskedActorCritic, masked_logits

ADVISOR = "advisor"  # the teacher that labels every state "follow the advisor" (advisor.py)


@dataclass
class Demonstrations:
    features: np.ndarray  # (n, features) float32
    masks: np.ndarray  # (n, actions) float32
    actions: np.ndarray  # (n,) int64: the teacher's label
    returns: np.ndarray  # (n,) float32: discounted return-to-go of the behaviour policy

    def __len__(self) -> int:
        return len(self.actions)

    @staticmethod
    def concat(parts: list[Demonstrations]) -> Demonstrations:
        return Demonstrations(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in Demonstrations._fields())
        )

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("features", "masks", "actions", "returns")


def collect(
    env: ClusterEnv,
    teacher: str,
    episodes: int,
    seed: int,
    gamma: float,
    student: MaskedActorCritic | None = None,
    student_share: float = 0.0,
) -> Demonstrations:
    """Episodes of `env` labelled by `teacher`; the student drives `student_share` of them."""
    rng = np.random.default_rng(seed)
    space = env.action_vocabulary
    advisor = getattr(env, "advisor", None)
    if teacher == ADVISOR and advisor is None:
        raise ValueError("prior: the 'advisor' teacher needs the advisor (advisor: true)")
    feats, masks, labels, returns = [], [], [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed * 100_003 + episode)
        policy = None
        if teacher != ADVISOR:
            policy = make_policy(teacher, cost_per_worker_second=env.sim.cost_per_worker_second)
            policy.reset()
        student_drives = student is not None and rng.random() < student_share
        rewards: list[float] = []
        done = False
        while not done:
            # ClusterEnv keeps the Snapshot its observation was built from; the teacher must
            # see that one (a second sim.snapshot() would move the measurement window).
            snap = env._snapshot
            if policy is None:
                label = advisor.follow_action
            else:
                wanted = env.guardrails.filter(policy.decide(snap), snap)
                policy.learn()
                label = space.encode(wanted, snap)
                if obs["action_mask"][label] < 0.5:
                    label = 0
            action = label
            if student_drives:
                x = torch.from_numpy(obs["observations"]).unsqueeze(0)
                m = torch.from_numpy(obs["action_mask"]).unsqueeze(0)
                action = int(student.act_greedy(x, m)[0])
            feats.append(obs["observations"])
            masks.append(obs["action_mask"])
            labels.append(label)
            obs, reward, done, _, _ = env.step(action)
            rewards.append(reward)
        g, out = 0.0, np.empty(len(rewards), dtype=np.float32)
        for t in range(len(rewards) - 1, -1, -1):
            g = rewards[t] + gamma * g
            out[t] = g
        returns.append(out)
    return Demonstrations(
        np.asarray(feats, dtype=np.float32),
        np.asarray(masks, dtype=np.float32),
        np.asarray(labels, dtype=np.int64),
        np.concatenate(returns),
    )


def fit(
    module: MaskedActorCritic,
    data: Demonstrations,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
    smoothing: float = 0.0,
) -> dict[str, float]:
    """Supervised fit of both towers; returns the last epoch's losses and label accuracy.
    `smoothing` of the target goes evenly to the allowed actions (masked ones get none)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.features)
    m = torch.from_numpy(data.masks)
    y = torch.from_numpy(data.actions)
    r = torch.from_numpy(data.returns)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    stats: dict[str, float] = {}
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        pi_sum = vf_sum = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            logits = masked_logits(module.pi(x[idx]), m[idx])
            pi_loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if smoothing > 0:
                allowed = m[idx] > 0.5
                log_p = torch.where(allowed, torch.log_softmax(logits, dim=-1), 0.0)
                spread = -(log_p.sum(-1) / allowed.sum(-1)).mean()
                pi_loss = (1 - smoothing) * pi_loss + smoothing * spread
            vf_loss = torch.nn.functional.mse_loss(module.vf(x[idx]).squeeze(-1), r[idx])
            opt.zero_grad()
            (pi_loss + 0.5 * vf_loss).backward()
            opt.step()
            pi_sum += pi_loss.item() * len(idx)
            vf_sum += vf_loss.item() * len(idx)
        stats = {"pi_loss": pi_sum / len(y), "vf_loss": vf_sum / len(y)}
    module.eval()
    predicted = module.act_greedy(x, m)
    acting = y != 0
    stats["accuracy"] = float((predicted == y).float().mean())
    stats["accuracy_on_actions"] = float((predicted[acting] == y[acting]).float().mean())
    stats["teacher_action_rate"] = float(acting.float().mean())
    return stats


def pretrain(
    module: MaskedActorCritic,
    env: ClusterEnv,
    teacher: str,
    rounds: list[tuple[int, float]],
    epochs: int,
    gamma: float,
    seed: int,
    log: Callable[[str], None] = print,
    smoothing: float = 0.0,
) -> dict[str, float]:
    """DAgger rounds of (episodes, student share), refitting on everything gathered so far."""
    parts: list[Demonstrations] = []
    stats: dict[str, float] = {}
    for i, (episodes, share) in enumerate(rounds):
        student = module if share > 0 else None
        parts.append(collect(env, teacher, episodes, seed + 1000 * i, gamma, student, share))
        data = Demonstrations.concat(parts)
        stats = fit(module, data, epochs, seed=seed + i, smoothing=smoothing)
        log(
            f"prior round {i}: {episodes} episodes (student drives {share:.0%}), "
            f"{len(data)} states; accuracy {stats['accuracy']:.3f}, on the teacher's actions "
            f"{stats['accuracy_on_actions']:.3f} ({stats['teacher_action_rate']:.1%} of states)"
        )
    return stats
