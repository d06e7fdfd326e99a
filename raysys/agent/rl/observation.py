"""What the RL policy observes beyond featurize() and the Guardrails mask, built in one place for
the training env (HistoryEnv) and for RLPolicy live, so the two cannot drift apart.

Features: featurize()'s, then History's, then the Advisor's; mask: the Guardrails' over the
ActionSpace, then "follow the advisor" (always allowed: its proposal has passed the Guardrails).
"""

from __future__ import annotations

import numpy as np

from raysys.agent.rl.advisor import Advisor
from raysys.agent.rl.history import History
from raysys.control.guardrails import Guardrails
from raysys.control.snapshot import Snapshot


def extend(
    features: np.ndarray,
    mask: np.ndarray,
    snapshot: Snapshot,
    history: History | None,
    advisor: Advisor | None,
    guardrails: Guardrails,
    cost_per_worker_second: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(features, mask) with History and Advisor added. Call once per Snapshot, in order: both
    remember what they were shown."""
    parts = [features]
    if history is not None:
        parts.append(history.update(snapshot, cost_per_worker_second))
    if advisor is not None:
        parts.append(advisor.update(snapshot, guardrails, mask, cost_per_worker_second))
        mask = np.append(mask, True)
    return np.concatenate(parts), mask
