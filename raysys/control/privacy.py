"""The controller's side of differential privacy: each DP partner's resolved plan, its accountant,
and its budget.

The workers do the mechanism (per-sample clipping and their share of the Gaussian noise, see
raysys/privacy/dp.py); this class decides it: it resolves `privacy.dp` against the partner's data
size and batch (sampling rate b_p / n_p), tells the group which partners clip and how much noise
they add, steps each partner's Opacus accountant once per step the partner contributed to, writes
epsilon into the ledger, and stops a partner (or the job, per spec) once its target_epsilon
would be exceeded. Steps are accounted only after they completed everywhere, and a chunk of steps
is never longer than what is left of any budget, so no step is taken past a budget.

Checkpoints carry every accountant's history (state_dict), so a resumed job accounts the steps
already taken at the settings they were taken with, even when the resumed spec resolves to
another noise multiplier (a changed noise_multiplier, target_epsilon, job length or data size);
a budget then lasts as many further steps as the true history leaves room for.

A step can release a partner's noisy gradient without completing: a ring all-reduce hands out
summed segments (under secure aggregation too, masks cancelled) before it ends, and without
secure aggregation a worker's own noisy sum goes onto the ring in clear. A step that runs again
on the same rows with fresh noise (after a failed chunk, a re-formation behind the job's step, or
a resume behind what the stopped run attempted) releases the same batch again. Independent
Gaussian releases x + N(0, s_i^2) of one batch are, up to independent noise, one release whose
precision 1 / s^2 is the sum of theirs: so every batch released more than once is accounted as
one step at the noise multiplier of its summed precision (sigma / sqrt(k) for k releases at
sigma; releases made at another noise, before a resume, count at theirs). Releases wait, pending,
until the step's re-run completes or the job passes it; the reported epsilon counts them
meanwhile. A batch released again after its releases were accounted (a re-formation went back)
gets one more entry covering all its releases, on top of the first: more than the exact cost,
never less. Budgets are re-planned on all that (note_failed_steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

from raysys.control.ledger import Ledger
from raysys.data.schema import DataError
from raysys.privacy.dp import DPPlan, PartnerAccountant, partner_sample_rate, plan_dp
from raysys.spec import JobSpec

EPSILON_REFRESH_S = 2.0


def _precision(sigma: float) -> float:
    """1 / sigma^2: what one release with noise multiplier sigma adds to a batch's precision
    (independent Gaussian releases of one batch add up to one of the summed precision)."""
    return math.inf if sigma <= 0 else 1.0 / sigma**2


def _noise(precision: float) -> float:
    """The noise multiplier of one release of `precision`."""
    return 0.0 if math.isinf(precision) else 1.0 / math.sqrt(precision)


class PartnerPrivacy:
    def __init__(self, spec: JobSpec, sizes: dict[str, int], batch_sizes: dict[str, int]) -> None:
        self.plans: dict[str, DPPlan] = {}
        self.accountants: dict[str, PartnerAccountant] = {}
        self.silenced: set[str] = set()  # budget spent: no longer contributing
        self.stop_job = False
        self._job_steps = spec.steps
        self._on_spent = {}
        self._epsilon_at = -math.inf  # when epsilon was last written into the ledger
        # What each partner's epsilon was last computed for: accountant steps, pending releases.
        self._epsilon_for: dict[str, tuple] = {}
        # The step count after which a partner stops (target_epsilon): the plan's, or on resume
        # what the checkpoint's history leaves.
        self.budget_steps: dict[str, int | None] = {}
        self._accounted: dict[str, int] = {}  # participations the accountant has taken
        # Per partner: step -> the precision (sum of 1 / sigma^2) of the releases of its batch
        # not yet in the accountant; and for steps whose releases were accounted together, the
        # precision they were accounted at, which a later release of the batch adds to.
        self._released: dict[str, dict[int, float]] = {}
        self._settled: dict[str, dict[int, float]] = {}
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
            self.budget_steps[p.name] = plan.budget_steps
            self._accounted[p.name] = 0
            self._released[p.name] = {}
            self._settled[p.name] = {}
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
        left = [budget - ledger[name].steps_participated
                for name, budget in self.budget_steps.items()
                if budget is not None and name not in self.silenced]
        return max(0, min(left)) if left else None

    def note_failed_steps(self, partners: set[str], steps: range, ledger: Ledger,
                          accounted: bool = False) -> list[str]:
        """`steps` were attempted with `partners` contributing (their workers took part with a
        batch, decided when the attempt started) and run again: each DP partner among them may
        have released its batch of each such step, which its accountant must count (module
        docstring), even if it has stopped contributing since. With `accounted`, those
        attempts completed and are in the accountant already (a re-formation went back): the
        re-run is accounted on top of them. Re-plans budgets on that; a partner whose re-runs
        would pass its target_epsilon stops contributing now. Returns messages for the log."""
        for name in partners & self.plans.keys():
            sigma = self.plans[name].noise_multiplier
            for s in steps:
                if accounted:  # its completed attempt is in the accountant, at sigma
                    self._add_release(name, s, 0.0, prior=_precision(sigma))
                else:
                    self._add_release(name, s, _precision(sigma), prior=0.0)
        return self._replan_budgets(ledger, steps.start)

    def _add_release(self, name: str, step: int, precision: float, prior: float) -> None:
        """One more release of `name`'s batch of `step`, of `precision`. A step not pending
        starts from what its accountant holds for it: the precision of its releases accounted
        together, or `prior` for an ordinary completed step (0 for one never run), so that its
        next entry covers every release of the batch (on top of the earlier entry: more than
        the exact cost, never less)."""
        released = self._released[name]
        if step not in released:
            released[step] = self._settled[name].get(step, prior)
        released[step] += precision

    def _replan_budgets(self, ledger: Ledger, step: int) -> list[str]:
        """Re-plan the budget of every contributing partner with pending releases; stop one
        (at `step`) whose re-runs would pass its target_epsilon."""
        messages = []
        for name, plan in self.plans.items():
            released = self._released[name]
            if name in self.silenced or plan.target_epsilon is None or not released:
                continue
            rerun = self.accountants[name].with_steps(
                self._rerun_noise(name, released.values()))
            if rerun.epsilon() > plan.target_epsilon:
                self._account_released_alone(name)
                self.silenced.add(name)
                ledger[name].budget_spent_at_step = step
                messages.append(
                    f"partner {name}: a step released its noisy gradient before completing; "
                    f"running it again would pass its privacy budget (epsilon "
                    f"{rerun.epsilon():.3f} of {plan.target_epsilon:g}), so {name} stops "
                    "contributing (the release so far is accounted)")
                self.stop_job |= self._on_spent[name] == "stop_job"
            else:
                self._replan(name, rerun)
        self.update_epsilon(ledger, force=True)
        return messages

    def _replan(self, name: str, rerun: PartnerAccountant) -> None:
        """Set `name`'s budget (target_epsilon) from `rerun`: its history with every pending
        release accounted with its re-run. Steps past the job's end never bind."""
        left = rerun.steps_left(self.plans[name].target_epsilon, max_steps=self._job_steps)
        self.budget_steps[name] = self._accounted[name] + len(self._released[name]) + left

    def _rerun_noise(self, name: str, precisions: Iterable[float]) -> list[float]:
        """The noise multiplier a re-run step is accounted at, per pending precision P: its
        releases and the re-run together are one release of precision P + 1 / sigma^2."""
        once = _precision(self.plans[name].noise_multiplier)
        return [_noise(p + once) for p in precisions]

    def _account(self, name: str, step: int, rerun: bool) -> None:
        """Account `name`'s pending releases of `step`, with its re-run or alone."""
        precision = self._released[name].pop(step)
        if rerun:
            precision += _precision(self.plans[name].noise_multiplier)
        self.accountants[name].step(noise_multiplier=_noise(precision))
        self._settled[name][step] = precision

    def _account_released_alone(self, name: str) -> None:
        """Account every pending release of `name` as never re-run."""
        for s in list(self._released[name]):
            self._account(name, s, rerun=False)

    def record(self, ledger: Ledger, step: int, first: int) -> list[str]:
        """After the ledger counted the chunk of steps [first, step): account the partners
        that took part, silence those whose budget is spent. Returns messages for the job log.

        A partner takes part in every step of a chunk or in none (the ledger counts it so). A
        released step of the chunk is accounted with its releases and its re-run if the partner
        took part in the re-run, else with its releases alone: the job has passed it."""
        messages = []
        for name, plan in self.plans.items():
            entry = ledger[name]
            acc = self.accountants[name]
            new = entry.steps_participated - self._accounted[name]
            for s in sorted(s for s in self._released[name] if s < step):
                rerun = new > 0 and s >= first
                self._account(name, s, rerun)
                new -= rerun
            if new > 0:
                acc.step(new)
            self._accounted[name] = entry.steps_participated
            budget = self.budget_steps[name]
            spent = budget is not None and entry.steps_participated >= budget
            if spent and name not in self.silenced:
                self.silenced.add(name)
                self._account_released_alone(name)
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

    def finish(self, ledger: Ledger) -> None:
        """At the end of the job (or its failure): the ledger's epsilon, exact now. Releases of
        steps not run again stay pending in the accountants (a resumed job may still run them,
        and must then account them with their re-run); the epsilon already counts them."""
        self.update_epsilon(ledger, force=True)

    def update_epsilon(self, ledger: Ledger, force: bool = False) -> None:
        """Write each DP partner's epsilon spent so far into the ledger: its accountant's,
        plus every pending release as if never run again (at its own precision; its re-run will
        cost at least that). Opacus' RDP epsilon takes ~0.1 s, as long as a chunk of steps, so
        between checkpoints and the end (force) it is refreshed at most every
        EPSILON_REFRESH_S; budgets are enforced by step count, not by this."""
        now = time.monotonic()
        if not force and now - self._epsilon_at < EPSILON_REFRESH_S:
            return
        self._epsilon_at = now
        for name, acc in self.accountants.items():
            released = self._released[name]
            key = (acc.steps, tuple(sorted(released.items())))
            if self._epsilon_for.get(name) != key:
                self._epsilon_for[name] = key
                spent = acc.with_steps(_noise(p) for p in released.values() if p) \
                    if released else acc
                ledger[name].epsilon = spent.epsilon() if spent.steps else 0.0

    def state_dict(self) -> dict[str, dict]:
        """Every DP partner's accountant history and not yet accounted releases (failed steps
        still to be re-run), for the checkpoint."""
        return {name: {**acc.state_dict(), "released": dict(self._released[name]),
                       "settled": dict(self._settled[name])}
                for name, acc in self.accountants.items()}

    def restore(self, ledger: Ledger, saved: Mapping[str, Mapping] | None, step: int,
                attempts: Iterable[Sequence] = ()) -> list[str]:
        """On resume from the checkpoint of `step`: continue each accountant from the
        checkpoint's history (`saved`, from state_dict(); None for a checkpoint written before
        histories were kept, whose steps are then accounted at today's settings). `attempts` is
        the stopped run's journal of step ranges it attempted after that checkpoint ([first,
        end, {partner: noise multiplier}], from CheckpointStore.attempts): every attempt was a
        release, at the noise it had. A step from `step` on runs again, its releases pending; one
        below (attempted again after a re-formation went back) is in the checkpoint's history
        already, so it gets one more entry now, covering that release and its later ones (more
        than the exact combined cost). Returns messages for the job log. Raises DataError for a
        partner under DP now whose checkpointed steps were trained without it (or without a
        history): no guarantee can cover those."""
        messages = []
        for name, plan in self.plans.items():
            entry, acc = ledger[name], self.accountants[name]
            untracked = entry.epsilon is None or (saved is not None and name not in saved)
            if entry.steps_participated and untracked:
                raise DataError(
                    f"partner '{name}' privacy.dp: the checkpoint at step {step} holds "
                    f"{entry.steps_participated} steps this partner trained without differential "
                    "privacy, and no guarantee can cover them; start a new job (another "
                    "checkpoint.storage_path or job name) to train it under DP")
            if entry.budget_spent_at_step is not None:
                self.silenced.add(name)
            if saved is None:
                messages.append(f"partner {name}: the checkpoint has no privacy accountant "
                                "history (an older version); its steps are accounted at this "
                                f"spec's noise multiplier {plan.noise_multiplier:.3f}")
                continue  # record() below replays them
            state = saved.get(name, {"history": [], "released": {}, "settled": {}})
            acc.continue_history(state)
            self._accounted[name] = entry.steps_participated
            self._released[name] = {int(s): float(p) for s, p in state["released"].items()}
            self._settled[name] = {int(s): float(p) for s, p in state["settled"].items()}
            taken = {round(nm, 6) for nm, _, _ in state["history"]}
            if taken - {round(plan.noise_multiplier, 6)}:
                messages.append(
                    f"partner {name}: resumed at noise multiplier {plan.noise_multiplier:.3f}; "
                    f"its {acc.steps} steps so far were accounted at noise multipliers "
                    f"{', '.join(f'{nm:.3f}' for nm in sorted(taken))}, as they were taken")
        reached, below = step, set()
        for first, end, sigmas in attempts:
            for name in sigmas.keys() & self.plans.keys():
                # Steps the stopped run had completed before this checkpoint were taken at the
                # checkpoint's noise.
                then = (saved or {}).get(name, {}).get("noise_multiplier", sigmas[name])
                for s in range(first, end):
                    self._add_release(name, s, _precision(sigmas[name]),
                                      prior=_precision(then) if s < step else 0.0)
                    if s < step:
                        below.add(s)
            reached = max(reached, end)
        for name in self.plans:  # attempted again below the checkpoint: never run again now
            for s in sorted(s for s in self._released[name] if s < step):
                self._account(name, s, rerun=False)
        if reached > step:
            messages.append(f"the stopped run attempted steps {step}-{reached - 1} after its "
                            "checkpoint: they run again, and every attempt is accounted as a "
                            "release")
        if below:
            messages.append(f"the stopped run attempted {len(below)} steps "
                            "below its checkpoint again (it had gone back): each attempt is "
                            "accounted as one more release")
        for name, plan in self.plans.items():  # budgets on the true history
            if plan.target_epsilon is not None and name not in self.silenced \
                    and not self._released[name] and saved is not None:
                self._replan(name, self.accountants[name])
        messages += self._replan_budgets(ledger, step)  # and those with releases to re-run
        # Last: replays an older checkpoint's steps, and stops a partner whose budget the
        # history has spent (before a single step more runs).
        messages += self.record(ledger, step, first=step)
        return messages
