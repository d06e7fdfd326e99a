"""Held-out evaluation: a short Ray task that scores a model state on the evaluation table.

The evaluation table is not any partner's data (it is the job's own held-out split), so it is
read by this task, never by the controller and never by a partner's worker.
"""

from __future__ import annotations

import ray
import torch

from raysys.data.sources import load_partner_table
from raysys.train.replica import Replica, ReplicaConfig


def evaluate_state(cfg: ReplicaConfig, state: dict, evaluation: dict) -> dict:
    torch.set_num_threads(1)
    table = load_partner_table("evaluation", evaluation["path"], evaluation.get("features"),
                               evaluation.get("label", "label"))
    replica = Replica(cfg)
    replica.load_state(state)
    x, y = torch.from_numpy(table.x), torch.from_numpy(table.y)
    with torch.no_grad():
        logits = replica.model(x)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    return {"loss": loss, "accuracy": accuracy, "rows": int(y.shape[0])}


evaluate_remote = ray.remote(num_cpus=0.1)(evaluate_state)
