"""AgentActor: the live agent. Every `agent.interval_s` it takes the controller's Snapshot, asks the
policy for a Decision, passes it through the Guardrails and submits what survives.

The policy, the guardrails and the Snapshot are the same code the simulator and the evaluator run
(invariant 4); only where the Snapshot comes from differs.
"""

from __future__ import annotations

import logging
import time

import ray

from raysys.agent.policies import make_policy
from raysys.control.decisions import Noop, describe
from raysys.control.guardrails import GuardrailConfig, Guardrails
from raysys.spec import JobSpec

log = logging.getLogger(__name__)


class AgentActor:
    def __init__(self, controller: ray.actor.ActorHandle, spec: dict) -> None:
        self.spec = JobSpec.model_validate(spec)
        agent = self.spec.agent
        self.controller = controller
        config = GuardrailConfig(cooldown_s=agent.cooldown_s,
                                 max_actions_per_minute=agent.max_actions_per_minute)
        self.guardrails = Guardrails(config)
        self.policy = make_policy(agent.policy, cost_per_worker_second=agent.cost_per_worker_second,
                                  **_policy_kwargs(self.spec, config))
        self.history: list[dict] = []
        self._stopped = False

    def run(self) -> list[dict]:
        """Steer until the job reaches a terminal state; returns every non-noop decision made."""
        interval = self.spec.agent.interval_s
        while not self._stopped:
            deadline = time.monotonic() + interval
            while not self._stopped and time.monotonic() < deadline:
                time.sleep(0.1)  # short naps so stop() takes effect at once
            if self._stopped:
                break
            try:
                progress = ray.get(self.controller.progress.remote(10**9))
                if progress["state"] in ("finished", "failed"):
                    break
                if progress["state"] != "running":
                    continue
                snapshot = ray.get(self.controller.snapshot.remote())
            except ray.exceptions.RayActorError:
                break  # the controller is gone: the job ended
            wanted = self.policy.decide(snapshot)
            safe = self.guardrails.filter(wanted, snapshot)
            if isinstance(safe, Noop):
                continue
            self.controller.submit.remote(safe)
            entry = {"time_s": snapshot.time_s, "step": snapshot.step,
                     "wanted": describe(wanted), "applied": describe(safe)}
            self.history.append(entry)
            log.info("agent: %s", entry)
        return self.history

    def stop(self) -> None:
        self._stopped = True


def _policy_kwargs(spec: JobSpec, guardrails: GuardrailConfig) -> dict:
    """Constructor arguments that learned policies need from the job."""
    agent = spec.agent
    if agent.policy == "rl":
        return {"checkpoint": agent.checkpoint, "guardrails": guardrails}
    if agent.policy == "tabularq":
        return {"table": agent.checkpoint, "guardrails": guardrails}
    return {}


RemoteAgentActor = ray.remote(num_cpus=0, max_concurrency=2)(AgentActor)
