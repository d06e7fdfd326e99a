"""AgentActor: the live agent. Every `agent.interval_s` it builds a Snapshot, asks the policy for a
Decision, passes it through the Guardrails and submits what survives to the JobController.

The policy, the guardrails, featurize and the Snapshot are the same code the simulator and the
evaluator run (invariant 4); only where the Snapshot comes from differs: here, the controller's
view of the group and its step timings, Ray's node table and free resources, and each node's
/metrics endpoint for CPU and memory use.

The agent must never stop a job: a policy that cannot be loaded (missing or corrupt checkpoint)
or that raises is replaced by the static policy with a warning, and the loop runs in a thread
started by the constructor, so when Ray restarts a dead AgentActor it resumes steering by itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request

import ray

from raysys.agent.featurize import featurize
from raysys.agent.policies import Policy, make_policy
from raysys.control import metrics
from raysys.control.controller import OnCreatorNode
from raysys.control.decisions import Noop, describe
from raysys.control.guardrails import GuardrailConfig, Guardrails
from raysys.control.snapshot import Snapshot
from raysys.spec import JobSpec

log = logging.getLogger(__name__)
TERMINAL = ("finished", "failed")


class AgentActor:
    def __init__(self, controller: ray.actor.ActorHandle, spec: dict) -> None:
        self.spec = JobSpec.model_validate(spec)
        self.controller = controller
        agent = self.spec.agent
        config = GuardrailConfig(cooldown_s=agent.cooldown_s,
                                 max_actions_per_minute=agent.max_actions_per_minute)
        self.guardrails = Guardrails(config)
        self.warnings: list[str] = []
        self.policy = self._load_policy(config)
        self.history: list[dict] = []
        self._tags = {"job": self.spec.name, "policy": self.policy_name}
        self._stop = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._loop, name="raysys-agent", daemon=True).start()

    # -- public ------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"policy": self.policy_name, "warnings": list(self.warnings),
                "decisions": list(self.history), "running": not self._done.is_set()}

    def wait(self, timeout_s: float | None = None) -> dict:
        """Block until the loop ends (job over or stop()); returns status()."""
        self._done.wait(timeout_s)
        return self.status()

    def stop(self) -> None:
        self._stop.set()

    def pid(self) -> int:
        return os.getpid()

    # -- policy ------------------------------------------------------------------------------
    def _load_policy(self, config: GuardrailConfig) -> Policy:
        agent = self.spec.agent
        kwargs: dict = {}
        if agent.policy == "rl":
            kwargs = {"checkpoint": agent.checkpoint, "guardrails": config}
        elif agent.policy == "tabularq":
            kwargs = {"table": agent.checkpoint, "guardrails": config}
        try:
            policy = make_policy(agent.policy,
                                 cost_per_worker_second=agent.cost_per_worker_second, **kwargs)
            self.policy_name = agent.policy
            return policy
        except Exception as exc:  # never let the agent stop the job
            self._fall_back(f"policy '{agent.policy}' could not be loaded ({exc})")
            return self.policy

    def _fall_back(self, why: str) -> None:
        message = f"{why}; training goes on under the static policy"
        log.warning(message)
        self.warnings.append(message)
        self.policy = make_policy("static")
        self.policy_name = "static"
        metrics.AGENT_FALLBACKS.inc(tags={"job": self.spec.name})

    # -- loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            pending: dict | None = None  # the last decision, waiting for its outcome
            while self._sleep(self.spec.agent.interval_s):
                try:
                    state = ray.get(self.controller.progress.remote(10**9))["state"]
                    if state in TERMINAL:
                        break
                    if state != "running":
                        continue
                    snapshot = with_node_metrics(ray.get(self.controller.snapshot.remote()))
                except ray.exceptions.RayActorError:
                    break  # the controller is gone: the job ended
                if snapshot.samples_done >= snapshot.samples_total:
                    break  # the job is finishing: nothing left to steer
                if pending is not None:
                    self._record_outcome(pending, snapshot)
                    pending = None
                pending = self._decide(snapshot)
                self._learn()  # after the decision is out: off the Snapshot -> Decision path
        finally:
            self._done.set()

    def _sleep(self, seconds: float) -> bool:
        """Nap in short pieces so stop() takes effect at once; False once stopped."""
        return not self._stop.wait(seconds)

    def _learn(self) -> None:
        try:
            self.policy.learn()
        except Exception as exc:
            self._fall_back(f"policy '{self.policy_name}' failed to learn ({exc!r})")

    def _decide(self, snapshot: Snapshot) -> dict | None:
        t0 = time.perf_counter()
        try:
            wanted = self.policy.decide(snapshot)
        except Exception as exc:
            self._fall_back(f"policy '{self.policy_name}' failed to decide ({exc!r})")
            return None
        safe = self.guardrails.filter(wanted, snapshot)
        latency = time.perf_counter() - t0
        metrics.AGENT_DECISION_SECONDS.observe(latency, tags=self._tags)
        kind = type(safe).__name__.lower()
        metrics.AGENT_DECISIONS.inc(tags={**self._tags, "kind": kind})
        if isinstance(safe, Noop):
            return None
        self.controller.submit.remote(safe)
        entry = {
            "time_s": round(snapshot.time_s, 2), "step": snapshot.step,
            "wanted": describe(wanted), "applied": describe(safe),
            "decision_ms": round(latency * 1e3, 3),
            "features": [round(float(v), 4) for v in featurize(
                snapshot, cost_per_worker_second=self.spec.agent.cost_per_worker_second)],
            "throughput_before": round(snapshot.throughput, 1),
            "rescales_before": snapshot.last_rescale_time_s,
        }
        self.history.append(entry)
        log.warning("agent %s: %s (wanted %s) at step %d", self.policy_name, entry["applied"],
                    entry["wanted"], snapshot.step)
        return entry

    @staticmethod
    def _record_outcome(entry: dict, snapshot: Snapshot) -> None:
        """One interval later: what the change cost and what it bought."""
        entry["throughput_after"] = round(snapshot.throughput, 1)
        if snapshot.last_rescale_time_s != entry["rescales_before"]:
            entry["rescale_cost_s"] = round(snapshot.last_rescale_cost_s, 3)


def with_node_metrics(snapshot: Snapshot, timeout_s: float = 1.0) -> Snapshot:
    """Fill each node's CPU and memory use from its /metrics endpoint (Prometheus text).

    A node whose endpoint does not answer keeps the figures it had (zero): the agent decides with
    what it can see rather than waiting.
    """
    ports = {n["NodeID"]: (n["NodeManagerAddress"], n.get("MetricsExportPort"))
             for n in ray.nodes() if n["Alive"]}
    for node in snapshot.nodes:
        host, port = ports.get(node.id, (None, None))
        if not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            continue
        values = parse_node_gauges(text)
        node.cpu_utilization = values.get("ray_node_cpu_utilization", 0.0) / 100.0
        total = values.get("ray_node_mem_total", 0.0)
        node.memory_used_fraction = values.get("ray_node_mem_used", 0.0) / total if total else 0.0
    return snapshot


def parse_node_gauges(text: str) -> dict[str, float]:
    """The first sample of each ray_node_* gauge in a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_node_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            continue
        try:
            out[name] = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
    return out


# Restarted by Ray if its process dies; the constructor restarts the loop.
RemoteAgentActor = OnCreatorNode(
    ray.remote(num_cpus=0, max_concurrency=4, max_restarts=3)(AgentActor))
