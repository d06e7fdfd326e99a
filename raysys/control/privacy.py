"""The controller's side of differential privacy: each DP partner's resolved plan, its accountant,
and its budget.

The workers do the mechanism (per-sample clipping and their share of the Gaussian noise, see
raysys/privacy/dp.py); this class decides it: it resolves `privacy.dp` against the partner's data
size and batch (sampling rate b_p / n_p), tells the group which partners clip and how much noise
they add, steps each partner's Opacus accountant once per step the partner contributed to, writes
epsilon into the ledger, and stops a partner (or the job, per spec) once its target_epsilon
would be exceeded. Steps are accounted only after they completed everywhere, and a chunk of steps
is never longer than what is left of any budget, so no step is taken past a budget.
"""

from __future__ import annotations

import math
import time

from raysys.control.ledger import Ledger
from raysys.data.schema import DataError
from raysys.privacy.dp import DPPlan, PartnerAccountant, partner_sample_rate, plan_dp
from raysys.spec import JobSpec

EPSILON_REFRESH_S = 2.0


class PartnerPrivacy:
    def __init__(self, spec: JobSpec, sizes: dict[str, int], batch_sizes: dict[str, int]) -> None:
        self.plans: dict[str, DPPlan] = {}
        self.accountants: dict[str, PartnerAccountant] = {}
        self.silenced: set[str] = set()  # budget spent: no longer contributing
        self.stop_job = False
        self._job_steps = spec.steps
        self._on_spent = {}
        self._epsilon_at = -math.inf  # when epsilon was last written into the ledger
        self._epsilon_steps: dict[str, int] = {}  # the accountant steps it was computed for
        for p in spec.partners:
            dp = p.privacy.dp
            if dp is None:
                continue
            try:
                rate = partner_sample_rate(batch_sizes[p.name], sizes[p.name])
                plan = plan_dp(dp.model_dump(), rate, spec.steps)
            except ValueError as exc:
                raise DataError(f"partner '{p.name}' privacy.dp: {exc}") from None
            self.plans[p.name] = plan
            self.accountants[p.name] = plan.new_accountant()
            self._on_spent[p.name] = dp.on_budget_spent

    @property
    def enabled(self) -> bool:
        return bool(self.plans)

    def describe(self) -> list[str]:
        lines = []
        for name, plan in self.plans.items():
            budget = "" if plan.target_epsilon is None else (
                f"; target epsilon {plan.target_epsilon:g} lasts {plan.budget_steps} steps")
            lines.append(
                f"partner {name}: differential privacy, noise multiplier "
                f"{plan.noise_multiplier:.3f}, clip {plan.max_grad_norm:g}, delta "
                f"{plan.delta:g}, sampling rate {plan.sample_rate:.4f} ({plan.accountant})"
                + budget)
        return lines

    def worker_noise(self) -> dict[str, tuple[float, float]]:
        """(noise multiplier, clip) of every partner that still contributes under DP."""
        return {name: (plan.noise_multiplier, plan.max_grad_norm)
                for name, plan in self.plans.items() if name not in self.silenced}

    def batches(self, batch_sizes: dict[str, int]) -> dict[str, int]:
        """Per-step batches as contributed: 0 for a partner whose budget is spent."""
        return {p: 0 if p in self.silenced else b for p, b in batch_sizes.items()}

    def steps_left(self, ledger: Ledger) -> int | None:
        """Steps until the first budget runs out (None: no budget binds)."""
        left = [plan.budget_steps - ledger[name].steps_participated
                for name, plan in self.plans.items()
                if plan.budget_steps is not None and name not in self.silenced]
        return max(0, min(left)) if left else None

    def record(self, ledger: Ledger, step: int) -> list[str]:
        """After the ledger counted a chunk: account the partners that took part, silence those
        whose budget is spent. Returns messages for the job log."""
        messages = []
        for name, plan in self.plans.items():
            entry = ledger[name]
            acc = self.accountants[name]
            if entry.steps_participated > acc.steps:
                acc.step(entry.steps_participated - acc.steps)
            spent = plan.budget_steps is not None and entry.steps_participated >= plan.budget_steps
            if spent and name not in self.silenced:
                self.silenced.add(name)
                entry.budget_spent_at_step = step
                self.update_epsilon(ledger, force=True)
                if step >= self._job_steps:  # a target_epsilon plan ends with the job
                    what = "the job's last step, as planned"
                elif self._on_spent[name] == "stop_job":
                    what = "the job stops"
                else:
                    what = f"{name} stops contributing; the others train on"
                messages.append(
                    f"partner {name} spent its privacy budget (epsilon {entry.epsilon:.3f} of "
                    f"{plan.target_epsilon:g}, delta {plan.delta:g}) at step {step}: {what}")
                self.stop_job |= self._on_spent[name] == "stop_job"
        self.update_epsilon(ledger)
        return messages

    def update_epsilon(self, ledger: Ledger, force: bool = False) -> None:
        """Write each DP partner's epsilon into the ledger. Opacus' RDP epsilon takes ~0.1 s,
        as long as a chunk of steps, so between checkpoints and the end (force) it is refreshed
        at most every EPSILON_REFRESH_S; budgets are enforced by step count, not by this."""
        now = time.monotonic()
        if not force and now - self._epsilon_at < EPSILON_REFRESH_S:
            return
        self._epsilon_at = now
        for name, acc in self.accountants.items():
            if self._epsilon_steps.get(name) != acc.steps:
                self._epsilon_steps[name] = acc.steps
                ledger[name].epsilon = acc.epsilon() if acc.steps else 0.0

    def restore(self, ledger: Ledger) -> None:
        """On resume: the accountants continue from the checkpoint's ledger."""
        for name in self.plans:
            entry = ledger[name]
            if entry.budget_spent_at_step is not None:
                self.silenced.add(name)
        self.record(ledger, step=-1)
        self.update_epsilon(ledger, force=True)
