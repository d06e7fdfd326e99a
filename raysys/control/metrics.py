"""Prometheus metrics exported through ray.util.metrics (each node's /metrics, `ray_` prefix).

Metric objects are created on first use inside the process that records them (a worker or the
controller), since ray.util.metrics needs a connected Ray worker.
"""

from __future__ import annotations

from functools import cached_property

_STEP_BOUNDS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
_RESCALE_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


class _Metrics:
    @cached_property
    def _m(self):  # imported lazily: importing raysys must not need Ray's metrics agent
        from ray.util import metrics

        return metrics

    @cached_property
    def STEP_TIME(self):
        return self._m.Histogram(
            "raysys_step_time_seconds", "Training step time of one worker (compute + sync).",
            boundaries=_STEP_BOUNDS, tag_keys=("job", "partner", "worker"),
        )

    @cached_property
    def WORKER_SAMPLES_PER_S(self):
        return self._m.Gauge(
            "raysys_worker_samples_per_second", "Samples per second processed by one worker.",
            tag_keys=("job", "partner", "worker"),
        )

    @cached_property
    def LOSS(self):
        return self._m.Gauge(
            "raysys_loss", "Training loss (global mean of the last step).",
            tag_keys=("job", "partner", "worker"),
        )

    @cached_property
    def JOB_SAMPLES_PER_S(self):
        return self._m.Gauge(
            "raysys_job_samples_per_second", "Samples per second of the whole job.",
            tag_keys=("job",),
        )

    @cached_property
    def JOB_STEP(self):
        return self._m.Gauge("raysys_step", "Optimizer steps completed.", tag_keys=("job",))

    @cached_property
    def WORKERS(self):
        return self._m.Gauge(
            "raysys_workers", "Live workers in the group, per partner.",
            tag_keys=("job", "partner"),
        )

    @cached_property
    def RESCALES(self):
        return self._m.Counter(
            "raysys_rescales_total", "Re-formations of the worker group (scale_up, "
            "scale_down, replace, recovery; changes applied together count once, kinds "
            "joined by '+'). A rebalance does not re-form the group and is not counted.",
            tag_keys=("job", "kind"),
        )

    @cached_property
    def RESCALE_SECONDS(self):
        return self._m.Histogram(
            "raysys_rescale_seconds", "Time from a decision to the first step completed at "
            "the new size (rebalances included).", boundaries=_RESCALE_BOUNDS,
            tag_keys=("job", "kind"),
        )

    @cached_property
    def FAILURES(self):
        return self._m.Counter(
            "raysys_worker_failures_total", "Workers lost during training.",
            tag_keys=("job", "partner"),
        )

    # -- the contribution ledger, per partner (raysys/control/ledger.py) ----------------------
    def _partner_gauge(self, name: str, doc: str):
        return self._m.Gauge(name, doc, tag_keys=("job", "partner"))

    @cached_property
    def PARTNER_SAMPLES(self):
        return self._partner_gauge("raysys_partner_samples", "Samples a partner contributed.")

    @cached_property
    def PARTNER_COMPUTE_SECONDS(self):
        return self._partner_gauge("raysys_partner_compute_seconds",
                                   "Compute seconds of a partner's workers.")

    @cached_property
    def PARTNER_BYTES(self):
        return self._partner_gauge("raysys_partner_bytes_sent",
                                   "Bytes a partner's workers sent to the job-wide exchange "
                                   "(gradient all-reduces, or fusions under local SGD).")

    @cached_property
    def PARTNER_LOCAL_BYTES(self):
        return self._partner_gauge("raysys_partner_bytes_within",
                                   "Bytes a partner's workers sent among themselves "
                                   "(local SGD steps).")

    @cached_property
    def PARTNER_STEPS(self):
        return self._partner_gauge("raysys_partner_steps",
                                   "Steps a partner contributed to.")

    @cached_property
    def PARTNER_SKIPPED_STEPS(self):
        return self._partner_gauge("raysys_partner_skipped_steps",
                                   "Steps a partner did not contribute to.")

    @cached_property
    def PARTNER_EPSILON(self):
        return self._partner_gauge("raysys_partner_epsilon",
                                   "Differential-privacy epsilon a partner has spent.")

    @cached_property
    def AGENT_DECISIONS(self):
        return self._m.Counter(
            "raysys_agent_decisions_total", "Decisions of the agent after the guardrails.",
            tag_keys=("job", "policy", "kind"),
        )

    @cached_property
    def AGENT_DECISION_SECONDS(self):
        return self._m.Histogram(
            "raysys_agent_decision_seconds", "Snapshot -> Decision time (policy + guardrails).",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.05], tag_keys=("job", "policy"),
        )

    @cached_property
    def AGENT_FALLBACKS(self):
        return self._m.Counter(
            "raysys_agent_fallbacks_total", "Times the agent fell back to the static policy.",
            tag_keys=("job",),
        )


_metrics = _Metrics()


def __getattr__(name: str):
    return getattr(_metrics, name)
