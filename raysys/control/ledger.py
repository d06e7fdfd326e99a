"""The contribution ledger: what every partner gave to the job, step by step.

Per partner: samples contributed, steps it took part in and steps it was skipped (no live worker,
or its privacy budget spent), worker failures, compute seconds of its workers, bytes its workers
sent in the gradient all-reduce, and the differential-privacy epsilon spent so far. The ledger is
persisted with every checkpoint (so a resumed job continues the same account), shown live by
`raysys status`, printed in the final report and exported as raysys_partner_* metrics.

Bytes are counted by each worker (raysys/train/collective.py) as a ring all-reduce sends them,
apart for the job-wide exchange (every step under allreduce, each fusion under local SGD: what
crosses partner sites) and the all-reduce among a partner's own workers (local SGD steps), at
2 (n - 1) / n times the payload (gloo's CPU all-reduce is ring-based; its exact schedule is gloo's
business), the payload being the gradient buckets in their wire format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from raysys.control import metrics


@dataclass
class PartnerLedger:
    samples: int = 0
    steps_participated: int = 0
    skipped_steps: int = 0
    failures: int = 0
    compute_s: float = 0.0
    bytes_exchanged: int = 0  # sent to the job-wide exchange (across partners)
    bytes_within_partner: int = 0  # sent among its own workers (local SGD steps)
    epsilon: float | None = None  # None: the partner trains without differential privacy
    budget_spent_at_step: int | None = None  # the step after which it stopped contributing


class Ledger:
    def __init__(self, partners: list[str], job: str) -> None:
        self.partners = {name: PartnerLedger() for name in partners}
        self._tags = {"job": job}

    def __getitem__(self, partner: str) -> PartnerLedger:
        return self.partners[partner]

    def record_steps(self, steps: int, batch_sizes: Mapping[str, int],
                     workers: Mapping[str, int], compute_s: Mapping[str, float],
                     bytes_sent: Mapping[str, int],
                     bytes_local: Mapping[str, int] | None = None) -> None:
        """`steps` steps completed with `workers[p]` live workers of each partner, which computed
        for `compute_s[p]` seconds and sent `bytes_sent[p]` bytes to the job-wide exchange and
        `bytes_local[p]` among themselves. A partner contributes when it has live workers and a
        non-zero batch."""
        for name, entry in self.partners.items():
            if workers.get(name, 0) and batch_sizes.get(name, 0):
                entry.samples += batch_sizes[name] * steps
                entry.steps_participated += steps
            else:
                entry.skipped_steps += steps
            entry.compute_s += compute_s.get(name, 0.0)
            entry.bytes_exchanged += bytes_sent.get(name, 0)
            entry.bytes_within_partner += (bytes_local or {}).get(name, 0)

    def record_failure(self, partner: str) -> None:
        self.partners[partner].failures += 1

    def export_metrics(self) -> None:
        for name, e in self.partners.items():
            tags = {**self._tags, "partner": name}
            metrics.PARTNER_SAMPLES.set(e.samples, tags=tags)
            metrics.PARTNER_COMPUTE_SECONDS.set(e.compute_s, tags=tags)
            metrics.PARTNER_BYTES.set(e.bytes_exchanged, tags=tags)
            metrics.PARTNER_LOCAL_BYTES.set(e.bytes_within_partner, tags=tags)
            metrics.PARTNER_STEPS.set(e.steps_participated, tags=tags)
            metrics.PARTNER_SKIPPED_STEPS.set(e.skipped_steps, tags=tags)
            if e.epsilon is not None:
                metrics.PARTNER_EPSILON.set(e.epsilon, tags=tags)

    def total_samples(self) -> int:
        return sum(e.samples for e in self.partners.values())

    # -- persistence (inside checkpoints) and reports ----------------------------------------
    def to_dict(self) -> dict[str, dict]:
        return {name: asdict(e) for name, e in self.partners.items()}

    def load_dict(self, data: Mapping[str, Mapping]) -> None:
        """Restore from a checkpoint; older checkpoints lack some fields, which start at zero."""
        known = {f.name for f in fields(PartnerLedger)}
        for name, values in data.items():
            if name in self.partners:
                self.partners[name] = PartnerLedger(
                    **{k: v for k, v in values.items() if k in known})


def format_ledger(ledger: Mapping[str, Mapping]) -> list[tuple[str, str]]:
    """(partner, one line) rows for the progress view, `raysys status` and the final report."""
    rows = []
    for name, e in ledger.items():
        eps = "" if e.get("epsilon") is None else f", epsilon {e['epsilon']:.2f}"
        if e.get("budget_spent_at_step") is not None:
            eps += f" (budget spent at step {e['budget_spent_at_step']})"
        rows.append((name, (
            f"{e['samples']:,} samples, {e['steps_participated']} steps "
            f"({e['skipped_steps']} skipped), {e['compute_s']:.1f} compute-s, "
            f"{_human_bytes(e['bytes_exchanged'])} sent{_per_step(e)}{_local_bytes(e)}, "
            f"{e['failures']} failures{eps}")))
    return rows


def _per_step(e: Mapping) -> str:
    steps = e.get("steps_participated") or 0
    return f" ({_human_bytes(e['bytes_exchanged'] / steps)}/step)" if steps else ""


def _local_bytes(e: Mapping) -> str:
    local = e.get("bytes_within_partner") or 0
    return f" (+{_human_bytes(local)} within the partner)" if local else ""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
