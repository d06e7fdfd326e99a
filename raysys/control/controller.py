"""JobController: one per job, a Ray actor that drives training and applies decisions.

  STARTING -> RUNNING <-> RESCALING -> FINISHED | FAILED

The loop reads top to bottom: apply what changed (decisions, newcomers ready, failures), run a
chunk of steps on every active worker, account for what came back, checkpoint, repeat. Decisions
(from the agent or a user) only say what should change; `_apply` turns them into ElasticGroup
operations between steps. The controller never opens a partner's data file.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import asdict
from enum import Enum

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.control import metrics
from raysys.control.autoscale import CapacityRequest, virtual_nodes
from raysys.control.decisions import Decision, Noop, describe
from raysys.control.events import Progress, RescaleEvent, RunRecord
from raysys.control.executor import DecisionExecutor
from raysys.control.ledger import Ledger
from raysys.control.privacy import PartnerPrivacy
from raysys.control.snapshot import NodeView, PartnerView, Snapshot, WorkerView
from raysys.data.sampler import partner_batch_sizes
from raysys.data.sources import DataError, check_schema_agreement
from raysys.data.summary import compare_summaries
from raysys.spec import JobSpec
from raysys.train.checkpoint import Checkpoint, CheckpointStore
from raysys.train.collective import StoreServer
from raysys.train.evaluation import evaluate_remote
from raysys.train.fusion import fusion_config, round_end
from raysys.train.group import ElasticGroup, GroupError, MemberState
from raysys.train.replica import Replica, ReplicaConfig

log = logging.getLogger(__name__)

# How long a decision's newcomer that is still starting holds the agent's cooldown (see
# snapshot()): a cold start takes seconds; one still waiting after this (no room anywhere, say)
# no longer keeps the agent from acting.
IN_FLIGHT_HOLD_S = 60.0


class JobState(Enum):
    STARTING = ("starting", False)
    RUNNING = ("running", False)
    RESCALING = ("rescaling", False)
    FINISHED = ("finished", True)
    FAILED = ("failed", True)

    def __init__(self, label: str, terminal: bool) -> None:
        self.label = label
        self.terminal = terminal


class JobController:
    def __init__(self, spec: dict, resume: bool = False, worker_class: type | None = None) -> None:
        self.spec = JobSpec.model_validate(spec)
        self.resume = resume
        self.state = JobState.STARTING
        self.step = 0
        self.batch_sizes: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.ledger = Ledger([p.name for p in self.spec.partners], self.spec.name)
        self.decisions: queue.Queue[tuple[float, Decision]] = queue.Queue()
        self.rescales: list[RescaleEvent] = []
        self._deaths_counted: set[str] = set()  # members whose death the ledger holds
        self._open_events: list[RescaleEvent] = []  # changed, first step not yet measured
        self._waiting_since: float | None = None  # holding for an `on_no_room: wait` partner
        # Under DP: the journal of attempted step ranges ([seq, first, end, {partner: noise
        # multiplier}], kept durably beside the checkpoints: _journal_attempt), the next seq,
        # whether the next attempt must open an entry (one was checkpointed), and the part of
        # the running chunk not yet known to have completed (range, partners), for a job that
        # fails.
        self._attempts: list[list] = []
        self._attempt_seq = 0
        self._journal_break = True
        self._in_flight: tuple[range, set[str]] | None = None
        self._chaos = sorted(self.spec.chaos, key=lambda c: c.at_step)
        self.losses: deque[float] = deque(maxlen=20)
        # A partner under differential privacy keeps its training loss to itself (see
        # Replica.local_gradients); when every partner does, the job has no training loss to
        # show, which is not the NaN of a diverged run.
        self.loss_private = all(p.privacy.dp is not None for p in self.spec.partners)
        self.step_times: deque[float] = deque(maxlen=20)  # slowest worker's compute + sync
        self.chunk_rates: deque[tuple[int, float]] = deque(maxlen=10)  # (samples, wall seconds)
        self.step_log: deque[tuple[int, float, float]] = deque(maxlen=5000)  # step, time, sync
        # (job time, step, live workers, samples/s) after every chunk: for reports and plots.
        self.timeline: deque[tuple[float, int, int, float]] = deque(maxlen=20000)
        self.worker_seconds = 0.0  # live workers x wall time, the objective's cost term
        self.last_checkpoint_step = -1
        self.evaluation_log: list[dict] = []
        # Last multiple of every_steps acted on: under local SGD a chunk may step over a
        # multiple (it ends on a round boundary), and the checkpoint or evaluation then follows.
        self._last_due = {"ckpt": 0, "eval": 0}
        self.log_lines: deque[tuple[int, str]] = deque(maxlen=500)
        self.n_logged = 0
        self.t_start = time.time()
        self.record = RunRecord(self.t_start)  # events.jsonl, see RunRecord
        self.error: str | None = None
        self.final_state: dict | None = None
        self.resumed_from: int | None = None
        self.data_warnings: list[str] = []  # partners' data differ (from aggregates only)
        self.privacy: PartnerPrivacy | None = None  # per-partner DP plans, accountants, budgets
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        store = StoreServer(ray.util.get_node_ip_address())
        self.group = ElasticGroup(self.spec, store, worker_class=worker_class)
        self.executor = DecisionExecutor(self.spec, self.group, self._log)
        self.ckpt = CheckpointStore(self.spec.checkpoint.storage_path, self.spec.name,
                                    self.spec.checkpoint.keep)
        self._tags = {"job": self.spec.name}
        self.capacity = CapacityRequest(self.spec) if self.spec.agent.autoscale else None

    # -- public API (called from the driver, the agent, tests) --------------------------------
    def run(self) -> dict:
        try:
            self._start()
            self._train()
            summary = self._finish()
            self._set_state(JobState.FINISHED)
            return summary
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if self.privacy is not None:  # the ledger's epsilon holds every release
                if self._in_flight is not None:  # steps that may have left, not recorded
                    self.privacy.note_failed_steps(self._in_flight[1], self._in_flight[0],
                                                   self.ledger)
                self.privacy.finish(self.ledger)
            self._set_state(JobState.FAILED)
            self.group.shutdown()
            raise
        finally:
            if self.capacity is not None:
                self.capacity.release()  # the autoscaler may scale idle nodes down again

    def submit(self, decision: Decision) -> None:
        # Stamped now: a rescale's latency counts from here, including the wait for the chunk
        # of steps that was running when the decision arrived.
        self.decisions.put((time.time(), decision))

    def stop(self) -> None:
        self._stop.set()

    def progress(self, since: int = 0) -> dict:
        """Where the job is; `events` holds the log lines numbered `since` and later."""
        return asdict(Progress(
            state=self.state.label, step=self.step, steps=self.spec.steps,
            loss=self.losses[-1] if self.losses and not self.loss_private else None,
            samples_per_s=self._throughput(), step_time_s=self._mean_step_time(),
            workers=self.group.counts(), generation=self.group.generation,
            elapsed_s=time.time() - self.t_start,
            ledger=self.ledger.to_dict(),
            events=[line for i, line in list(self.log_lines) if i >= since],
            next_event=self.n_logged,
        ))

    def workers(self) -> list[dict]:
        """Live view of every member: id, partner, state, node, recent step time, local batch."""
        return [{"id": m.id, "partner": m.partner, "state": m.state.value,
                 "node_id": m.info.node_id if m.info else None,
                 "pid": m.info.pid if m.info else None,
                 "step_time_s": m.recent_step_s, "local_batch": m.local_batch, "share": m.share}
                for m in self.group.members.values()]

    def snapshot(self) -> Snapshot:
        """This instant as a policy sees it: the same Snapshot the simulator produces.

        A change still in flight (a cold newcomer of a decision, starting) is the last rescale,
        happening now, for up to IN_FLIGHT_HOLD_S: the simulator applies a decision at once and
        charges its cost as a stall, during which the guardrails' cooldown holds every policy.
        Without this, a policy would see nothing change for the seconds a newcomer takes to
        start (an actor importing torch) and ask again for what is already on its way; and the
        newcomer, not yet measured, would make the change look worthless if it were counted."""
        now = time.time()
        s = self.spec
        workers = [WorkerView(m.id, m.partner, m.info.node_id if m.info else "",
                              m.recent_step_s, m.local_batch, m.state is MemberState.ACTIVE)
                   for m in self.group.members.values()
                   if m.state is MemberState.ACTIVE or (m.died and now - m.t_gone < 60)]
        # The agent's floor is one worker even where the spec allows 0: a partner without
        # workers drops its data from the job, which only a failure may cause, never a policy.
        partners = [PartnerView(p.name, len(self.group.active(p.name)), max(p.workers.min, 1),
                                p.workers.max, self.batch_sizes.get(p.name, 0))
                    for p in s.partners]
        free = ray._private.state.available_resources_per_node()  # no public per-node view
        nodes = [NodeView(n["NodeID"], dict(n.get("Labels") or {}),
                          float(n["Resources"].get("CPU", 0.0)),
                          float(free.get(n["NodeID"], {}).get("CPU", 0.0)))
                 for n in ray.nodes() if n["Alive"]]
        if s.agent.autoscale:
            nodes += virtual_nodes(s, self._live_by_partner())
        last = self.rescales[-1] if self.rescales else None
        pending = list(self.executor.pending.values())
        in_flight = [e for e in pending if now - e.t_decision < IN_FLIGHT_HOLD_S]
        if in_flight:
            last_rescale_s = now - self.t_start
            last_kind = max(in_flight, key=lambda e: e.t_decision).kind
        else:
            last_rescale_s = (last.t_ready - self.t_start) if last and last.t_ready else None
            last_kind = last.kind if last else ""
        return Snapshot(
            time_s=now - self.t_start, step=self.step,
            samples_done=self.ledger.total_samples(),
            samples_total=s.steps * s.global_batch_size, workers=workers, partners=partners,
            nodes=nodes, cpus_per_worker={p.name: p.cpus_per_worker for p in s.partners},
            placement={p.name: dict(p.placement) for p in s.partners},
            last_rescale_time_s=last_rescale_s,
            last_rescale_cost_s=(last.latency_s or 0.0) if last else 0.0,
            recent_failures=sum(1 for m in self.group.members.values()
                                if m.died and now - m.t_gone < 60),
            actions_last_minute=sum(1 for e in [*self.rescales, *pending]
                                    if e.kind != "recovery" and now - e.t_decision < 60),
            step_time_s=self._mean_step_time(), throughput=self._throughput(),
            last_rescale_kind=last_kind,
        )

    def history(self) -> list[tuple[float, int, int, float]]:
        """(job time s, step, live workers, samples/s) after every chunk of steps."""
        return list(self.timeline)

    def step_timings(self) -> list[tuple[int, float, float]]:
        """(step, step time, sync time) of recent steps, as `raysys profile` records them."""
        return list(self.step_log)

    def records(self, since: int = 0) -> list[dict]:
        """Structured events from number `since` on (what the driver writes to events.jsonl)."""
        return self.record.since(since)

    def evaluations(self) -> list[dict]:
        """Periodic held-out evaluations: step, job time when it started, its own duration
        (so time-to-accuracy figures can leave evaluation out), loss and accuracy."""
        return list(self.evaluation_log)

    def rescale_events(self) -> list[dict]:
        return [dict(asdict(e), latency_s=e.latency_s) for e in self.rescales]

    def parameters(self) -> np.ndarray:
        """Flat parameters: of the first active worker while running (all replicas hold the same
        ones), of the final state once finished."""
        if self.final_state is None:
            return ray.get(self.group.active()[0].actor.flat_parameters.remote())
        replica = Replica(self.group.replica_cfg)
        replica.load_state(self.final_state)
        return replica.flat_parameters().numpy()

    # -- STARTING ----------------------------------------------------------------------------
    def _start(self) -> None:
        ckpt = self.ckpt.latest() if self.resume else None
        # What the stopped run attempted after its checkpoint (or from the start, if it wrote
        # none): every such attempt was a release (see _journal_attempt).
        journal = self.ckpt.attempts() if self.resume else []
        after = ckpt.journal_seq if ckpt is not None else 0
        attempts = [a[1:] for a in journal if a[0] >= after]
        for p in self.spec.partners:
            for _ in range(p.workers.initial):
                self.group.start(p, MemberState.ACTIVE)
            for _ in range(p.workers.spares):
                self.group.start(p, MemberState.SPARE)
        self._sync_capacity()  # with an autoscaler, nodes for the initial workers are requested
        infos = self._load_all()
        schemas, summaries = {}, {}
        for info in infos:
            schemas.setdefault(info.partner, info.schema)
            summaries.setdefault(info.partner, info.summary)
        features, num_classes = check_schema_agreement(schemas, self.spec.num_classes)
        # Only aggregates crossed the partner boundary; hard mismatches raise DataError here,
        # distribution differences are warnings (one model needs consistent data).
        self.data_warnings = compare_summaries(summaries)
        for warning in self.data_warnings:
            self._log(f"data warning: {warning}")
        self.sizes = {name: s.rows for name, s in schemas.items()}
        self.batch_sizes = partner_batch_sizes(self.sizes, self.spec.global_batch_size)
        self.privacy = PartnerPrivacy(self.spec, self.sizes, self.batch_sizes)
        for line in self.privacy.describe():
            self._log(line)
        if ckpt is not None:
            self._check_resumable(ckpt)
        self.group.replica_cfg = self._replica_config(len(features), num_classes)
        self.group.build_pending(self.group.replica_cfg)
        # The first generation is formed once every initial worker is built.
        while self.group.with_state(MemberState.STARTING):
            self.group.poll_starting(timeout_s=1.0)
        if ckpt is not None:
            state_ref = ray.put(ckpt.state)
            ray.get([m.actor.import_state.remote(state_ref)
                     for m in self.group.active() + self.group.with_state(MemberState.SPARE)])
            self.ledger.load_dict(ckpt.counters)
            for message in self.privacy.restore(self.ledger, ckpt.privacy, ckpt.step,
                                                attempts):
                self._log(message)
            self.resumed_from = ckpt.step
            self._log(f"resumed from {ckpt.path} at step {ckpt.step}")
        if ckpt is None and attempts:
            for message in self.privacy.restore(self.ledger, {}, 0, attempts):
                self._log(message)
        self._stop_if_budget_spent()  # a resumed partner's budget was spent, under stop_job
        if self.privacy.enabled:  # kept, in case this run stops too before its checkpoint
            self._attempts = journal
            self._attempt_seq = max([after, *(a[0] + 1 for a in journal)])
        self.step = self.group.reform(self.spec.runtime.collective_timeout_s)
        self._count_deaths()
        self._export_worker_counts()
        self._t_first_step = time.time() - self.t_start
        self._set_state(JobState.RUNNING)
        self._log(f"started {self._describe_counts()}; batch per step {self.batch_sizes}")
        self.record.add("start", self.step, job=self.spec.name, steps=self.spec.steps,
                        partners=self.group.counts(), batch_per_step=self.batch_sizes,
                        aggregation=self.spec.aggregation.mode)

    def _load_all(self) -> list:
        """Wait for every worker's data; a partner's bad data stops the job before step 1."""
        members = list(self.group.members.values())
        infos = []
        problems = []
        for m in members:
            try:
                m.info = ray.get(m.load_ref)
                infos.append(m.info)
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, DataError) else exc
                problems.append(str(cause).strip().splitlines()[-1]
                                if not isinstance(cause, DataError) else str(cause))
        if problems:
            raise DataError("\n".join(dict.fromkeys(problems)))
        return infos

    def _check_resumable(self, ckpt: Checkpoint) -> None:
        saved = ckpt.sampler
        if saved["seed"] != self.spec.seed or saved["batch_sizes"] != self.batch_sizes:
            raise ValueError(
                f"checkpoint {ckpt.path} was written with seed {saved['seed']} and per-partner "
                f"batches {saved['batch_sizes']}; this job has seed {self.spec.seed} and "
                f"{self.batch_sizes}: resuming would not continue the same run"
            )

    def _replica_config(self, in_features: int, num_classes: int) -> ReplicaConfig:
        s = self.spec
        return ReplicaConfig(
            model=s.model.name, model_kwargs=dict(s.model.kwargs), in_features=in_features,
            num_classes=num_classes, seed=s.seed, optimizer=s.optimizer.name, lr=s.optimizer.lr,
            momentum=s.optimizer.momentum, weight_decay=s.optimizer.weight_decay,
            bucket_mb=s.runtime.bucket_mb, fusion=fusion_config(s),
        )

    # -- RUNNING -----------------------------------------------------------------------------
    def _train(self) -> None:
        ev, every = self.spec.evaluation, self.spec.checkpoint.every_steps
        self._last_due = {"ckpt": self.step // every if every else 0,
                          "eval": self.step // ev.every_steps if ev and ev.every_steps else 0}
        while self.step < self.spec.steps and not self._stop.is_set():
            self._inject_chaos()
            self._apply_changes()
            self._sync_capacity()
            if self._holding_for_partners():
                continue
            n = self._chunk_size()
            t_chunk, end = time.time(), self.step + n
            # Who contributes rows to this chunk, decided now (a partner stopped later still
            # released what it sent).
            took_part = {m.partner for m in self.group.active()} - self.privacy.silenced
            self._journal_attempt(self.step, end, took_part)
            self._in_flight = (range(self.step, end), took_part)
            reports, lost = self._run_chunk(n)
            done = self._account(reports, n, t_chunk)
            self._in_flight = (range(self.step, end), took_part)
            if lost or done < n:
                reached = self.step
                self._recover(lost)
                if done < n:
                    self._note_released(took_part, self._failed_steps(reached, end))
            self._in_flight = None
            self._maybe_checkpoint()
            self._maybe_evaluate()

    def _holding_for_partners(self) -> bool:
        """Whether a partner with `on_no_room: wait` has no live worker, so no step may run
        (every step must hold its data). Waits up to a second for a starting worker first;
        _apply_changes then lets it join, and training resumes."""
        missing = [p.name for p in self.spec.partners
                   if p.on_no_room == "wait" and not self.group.active(p.name)]
        if not missing:
            if self._waiting_since is not None:
                self._log(f"the job resumes after waiting {time.time() - self._waiting_since:.1f}"
                          " s for a partner's worker")
                self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = time.time()
            self._log(f"the job waits at step {self.step}: partner {', '.join(missing)} has no "
                      "live worker (on_no_room: wait); its replacement waits for room on a node "
                      "of its placement")
            self.record.add("wait", self.step, partners=missing)
        # A replacement that failed to start, or a worker found dead by a re-formation, has no
        # successor yet: start one, or the job would wait for nothing.
        self._keep_minimums()
        starting = [m.ready_ref for m in self.group.with_state(MemberState.STARTING)
                    if m.ready_ref is not None]
        if starting:
            ray.wait(starting, num_returns=1, timeout=1.0)
        else:
            self._stop.wait(1.0)
        return True

    def _inject_chaos(self) -> None:
        """Faults the spec schedules (testing and demo aid), once their step is reached."""
        while self._chaos and self._chaos[0].at_step <= self.step:
            c = self._chaos.pop(0)
            m = self.group.members.get(c.worker)
            if m is None or m.state is not MemberState.ACTIVE:
                self._log(f"chaos: {c.worker} is not an active worker; skipped")
                continue
            if c.kill:
                ray.kill(m.actor, no_restart=True)
                self._log(f"chaos: killed {c.worker} at step {self.step}")
                self.record.add("chaos", self.step, worker=c.worker, fault="kill")
            else:
                ray.get(m.actor.set_slowdown.remote(c.slow))
                self._log(f"chaos: {c.worker} computes {c.slow:g}x slower from step {self.step}")
                self.record.add("chaos", self.step, worker=c.worker, fault=f"slow {c.slow:g}x")

    def _chunk_size(self) -> int:
        rt = self.spec.runtime
        if rt.steps_per_call:
            n = rt.steps_per_call
        else:
            mean = self._mean_step_time()
            n = 1 if mean <= 0 else int(min(50, max(1, 0.25 / mean)))
        # Never run past a boundary where the controller has work to do.
        if self._chaos:
            n = min(n, max(1, self._chaos[0].at_step - self.step))
        for every in (self.spec.checkpoint.every_steps,
                      self.spec.evaluation.every_steps if self.spec.evaluation else None):
            if every:
                n = min(n, every - self.step % every)
        left = self.privacy.steps_left(self.ledger)
        if left is not None:  # never a step past a partner's privacy budget
            n = min(n, max(1, left))
        if self._open_events or not self.decisions.empty():
            n = 1  # a change is in flight: measure its first step precisely
        n = max(1, min(n, self.spec.steps - self.step))
        if self.group.replica_cfg.fusion is not None:
            # Local SGD: a call ends with a fusion, so it must end on a round boundary (or at
            # the end of the job, or where a privacy budget ends): fusions then depend on the
            # spec alone, never on how steps were chunked.
            end = round_end(self.step + n - 1, self.spec.aggregation.local_steps)
            if left is not None:
                end = min(end, self.step + max(1, left))
            n = min(end, self.spec.steps) - self.step
        return n

    def _run_chunk(self, n: int) -> tuple[dict[str, object], list[str]]:
        plans = self.group.plans(self.privacy.batches(self.batch_sizes),
                                 self.privacy.worker_noise())
        gen = self.group.generation
        refs = {m.id: m.actor.run_steps.remote(gen, self.step, n, plans[m.id])
                for m in self.group.active()}
        reports, lost = {}, []
        for member_id, ref in refs.items():
            try:
                reports[member_id] = ray.get(ref)
            except RayActorError:
                lost.append(member_id)
        return reports, lost

    def _account(self, reports: dict, n: int, t_chunk: float) -> int:
        """Record the steps that completed everywhere; returns how many that is."""
        if not reports:
            return 0
        done = min(r.steps_done for r in reports.values())
        best = max(reports.values(), key=lambda r: r.steps_done)
        for member_id, r in reports.items():
            m = self.group.members[member_id]
            if r.steps_done:
                # A worker's own step time: its compute plus the communication every worker pays
                # (the smallest sync of the step); the rest of its sync is waiting for a slower
                # peer and would hide which worker is the straggler.
                shared_sync = [min(o.sync_s[i] for o in reports.values() if o.steps_done > i)
                               for i in range(r.steps_done)]
                m.recent_step_s = float(np.mean(np.add(r.compute_s, shared_sync)))
                m.local_batch = r.local_batch[-1]
            if r.error:
                self._log(f"{member_id}: {r.error}")
        advanced = best.steps_done
        counts = self.group.counts()
        step_losses = self._step_losses(reports, advanced)
        for i in range(advanced):
            self.losses.append(step_losses[i])
            # The step lasts as long as its slowest worker's compute plus the sync after it
            # (the others' sync includes waiting for that worker).
            slowest = max((r for r in reports.values() if r.steps_done > i),
                          key=lambda r, i=i: r.compute_s[i])
            step_time = slowest.compute_s[i] + slowest.sync_s[i]
            self.step_times.append(step_time)
            self.step_log.append((self.step + i, step_time, slowest.sync_s[i]))
            if i == 0:
                self._close_events(t_chunk + step_time)
        compute_s: dict[str, float] = {}
        bytes_sent: dict[str, int] = {}
        bytes_local: dict[str, int] = {}
        for member_id, r in reports.items():
            partner = self.group.members[member_id].partner
            compute_s[partner] = compute_s.get(partner, 0.0) + sum(r.compute_s[:advanced])
            bytes_sent[partner] = bytes_sent.get(partner, 0) + sum(r.bytes_sent[:advanced])
            bytes_local[partner] = bytes_local.get(partner, 0) + sum(r.bytes_local[:advanced])
        batches = self.privacy.batches(self.batch_sizes)
        self.ledger.record_steps(advanced, batches, counts, compute_s, bytes_sent, bytes_local)
        self.step += advanced
        for message in self.privacy.record(self.ledger, self.step, self.step - advanced):
            self._log(message)
        self._stop_if_budget_spent()
        self.ledger.export_metrics()
        now = time.time()
        self.chunk_rates.append((advanced * sum(batches[p] for p, c in counts.items()
                                                if c), now - t_chunk))
        self.worker_seconds += sum(counts.values()) * (now - t_chunk)
        self.timeline.append((now - self.t_start, self.step, sum(counts.values()),
                              self._throughput()))
        metrics.JOB_STEP.set(self.step, tags=self._tags)
        metrics.JOB_SAMPLES_PER_S.set(self._throughput(), tags=self._tags)
        if advanced:
            self.record.add(
                "progress", self.step, workers=counts, samples_per_s=self._throughput(),
                loss=float(np.nanmean(step_losses)) if np.isfinite(step_losses).any()
                else None,
                epsilon={p: e.epsilon for p, e in self.ledger.partners.items()
                         if e.epsilon is not None})
        if advanced and self.step % self.spec.runtime.log_every_steps < advanced:
            loss = "private (DP)" if self.loss_private else f"{self.losses[-1]:.4f}"
            self._log(f"step {self.step}/{self.spec.steps} loss {loss} "
                      f"{self._throughput():.0f} samples/s {self._describe_counts()}")
        return done

    def _step_losses(self, reports: dict, steps: int) -> list[float]:
        """The job's mean training loss of each step. All workers report the same global loss
        under allreduce; under local SGD each reports its partner's, combined here weighted by
        samples (partners under differential privacy keep their loss to themselves: NaN)."""
        full = [r for r in reports.values() if r.steps_done >= steps]
        if self.group.replica_cfg.fusion is None:
            return max(full, key=lambda r: r.steps_done).loss[:steps]
        per_partner = {}
        for member_id, r in reports.items():
            if r.steps_done >= steps:
                per_partner.setdefault(self.group.members[member_id].partner, r)
        out = []
        for i in range(steps):
            pairs = [(r.loss[i], r.samples[i]) for r in per_partner.values()
                     if r.samples[i] and np.isfinite(r.loss[i])]
            n = sum(w for _, w in pairs)
            out.append(sum(v * w for v, w in pairs) / n if n else float("nan"))
        return out

    # -- faults ------------------------------------------------------------------------------
    def _recover(self, lost: list[str]) -> None:
        """A worker died or a collective failed: re-form on the survivors and go on."""
        self._set_state(JobState.RESCALING)
        event = RescaleEvent("recovery", f"lost {', '.join(lost) or 'a collective'}", time.time())
        for member_id in lost:
            self.group.mark_dead(member_id)
        self._count_deaths()
        for p in self.spec.partners:  # a warm spare takes a lost worker's place at once
            missing = p.workers.min - len(self.group.active(p.name))
            for spare in self.group.with_state(MemberState.SPARE, p.name)[:max(0, missing)]:
                spare.state = MemberState.ACTIVE
                self.executor.spares_to_refill.append(p.name)
                self._log(f"spare {spare.id} joins to keep {p.name} at its minimum")
        self._reform(event)
        self._keep_minimums()
        for p in self.spec.partners:
            if not self.group.active(p.name) and p.on_no_room == "skip":
                self._log(f"partner {p.name} has no live worker: its samples are skipped")
        self._set_state(JobState.RUNNING)

    # A step's aggregate can leave before the step completes everywhere (a ring all-reduce hands
    # out summed segments, masked ones included, before it ends); a step run again on the same
    # rows with fresh noise then releases that batch twice, which the accountant must count
    # (PartnerPrivacy.note_failed_steps). Three ways a step runs again: a failed chunk, a
    # re-formation that restarts from a survivor behind the job's step, and a resume from a
    # checkpoint behind what the stopped run had attempted (its journal, _journal_attempt).
    def _failed_steps(self, reached: int, end: int) -> range:
        """The steps of a failed chunk (ending at `end`) that may have left without completing,
        the job having completed `reached`: the next step, or under local SGD what the chunk
        held of the round it belongs to, whose fusion is what crosses partners."""
        if self.group.replica_cfg.fusion is None:
            return range(reached, min(reached + 1, end))
        return range(reached, min(round_end(reached, self.spec.aggregation.local_steps), end))

    def _note_released(self, took_part: set[str], steps: range, accounted: bool = False) -> None:
        """`steps` may have released the batches of the DP partners in `took_part`, and run
        again: account them so (PartnerPrivacy.note_failed_steps)."""
        if not self.privacy.enabled or not steps:
            return
        for message in self.privacy.note_failed_steps(took_part, steps, self.ledger,
                                                      accounted):
            self._log(message)
        self._stop_if_budget_spent()

    def _stop_if_budget_spent(self) -> None:
        """Stop the job if a partner's spent budget asks for it (on_budget_spent: stop_job)."""
        if self.privacy.stop_job and not self._stop.is_set():
            self.stop_reason = "a partner's privacy budget is spent"
            self._stop.set()

    def _journal_attempt(self, first: int, end: int, took_part: set[str]) -> None:
        """Before steps [first, end) run under DP: record durably that `took_part` attempt them,
        so that a resume after the driver stopped counts every attempt made after its
        checkpoint (PartnerPrivacy.restore). Contiguous attempts by the same partners extend
        one entry, never across a checkpoint (entries are numbered, and a checkpoint holds the
        number of the next one)."""
        if not self.privacy.enabled:
            return
        plans = self.privacy.plans
        partners = {p: plans[p].noise_multiplier for p in sorted(took_part & set(plans))}
        last = self._attempts[-1] if self._attempts else None
        if last is not None and not self._journal_break and last[2] == first \
                and last[3] == partners:
            last[2] = end
        else:
            self._attempts.append([self._attempt_seq, first, end, partners])
            self._attempt_seq += 1
        self._journal_break = False
        self.ckpt.write_attempts(self._attempts)

    def _keep_minimums(self) -> None:
        """Start workers for every partner below `workers.min`, counting those starting."""
        for p in self.spec.partners:
            starting = len(self.group.with_state(MemberState.STARTING, p.name))
            missing = p.workers.min - len(self.group.active(p.name)) - starting
            for _ in range(max(0, missing)):
                m = self.group.start(p, MemberState.ACTIVE)
                self._log(f"starting {m.id} to keep {p.name} at its minimum of {p.workers.min}")

    def _count_deaths(self) -> None:
        """Put every member that died into the ledger once, however its death was found: a
        failed call (_recover) or a re-formation after a decision, which finds a worker on a
        lost node dead before any step call does."""
        for m in self.group.members.values():
            if m.died and m.id not in self._deaths_counted:
                self._deaths_counted.add(m.id)
                self.ledger.record_failure(m.partner)
                self.record.add("failure", self.step, worker=m.id)
                self._log(f"worker {m.id} died at step {self.step}")

    def _reform(self, event: RescaleEvent) -> None:
        before = self.step
        try:
            self.step = self.group.reform(self.spec.runtime.collective_timeout_s)
        except GroupError as exc:
            raise GroupError(f"cannot go on at step {self.step}: {exc}") from exc
        finally:
            self._count_deaths()
        # The survivors are behind: the steps they redo were released, and accounted, already
        # (by partners that contributed then; conservatively, every one contributing now).
        self._note_released({p.name for p in self.spec.partners} - self.privacy.silenced,
                            range(self.step, before), accounted=True)
        event.t_ready, event.step = time.time(), self.step
        self.rescales.append(event)
        self._open_events.append(event)
        metrics.RESCALES.inc(tags={**self._tags, "kind": event.kind})
        self._export_worker_counts()

    def _close_events(self, t_first_step: float) -> None:
        self.executor.refill_spares()
        for e in self._open_events:
            e.t_first_step = t_first_step
            metrics.RESCALE_SECONDS.observe(e.latency_s, tags={**self._tags, "kind": e.kind})
            self.record.add("rescale", self.step, kind=e.kind, detail=e.detail,
                            latency_s=e.latency_s)
            self._log(f"{e.kind} ({e.detail}) took {e.latency_s:.2f} s to the first step")
        self._open_events.clear()

    # -- decisions ---------------------------------------------------------------------------
    def _apply_changes(self) -> None:
        """Between steps: take newcomers that are ready, then apply queued decisions."""
        changed: list[RescaleEvent] = []
        for m in self.group.poll_starting():
            if m.state is MemberState.ACTIVE:
                if m.replaces:
                    old = self.group.members.get(m.replaces)
                    if old is not None:
                        m.share = old.share  # a replacement takes over its share, as in the sim
                    self.group.retire(m.replaces)
                changed.append(self.executor.joined(m))
        while not self.decisions.empty():
            submitted, decision = self.decisions.get()
            if not isinstance(decision, Noop):
                self.record.add("decision", self.step, decision=describe(decision))
            event = self.executor.apply(submitted, decision)
            if event is not None:
                changed.append(event)
        # Rebalances are recorded first: a structural change made at the same time is the last
        # change (Snapshot.last_rescale_kind), and its stall is the one to wait out.
        for e in changed:
            if e.kind == "rebalance":
                e.t_ready, e.step = time.time(), self.step
                self.rescales.append(e)
                self._open_events.append(e)
        structural = [e for e in changed if e.kind != "rebalance"]
        if structural:
            self._set_state(JobState.RESCALING)
            t0 = min(e.t_decision for e in structural)
            merged = RescaleEvent("+".join(sorted({e.kind for e in structural})),
                                  "; ".join(e.detail for e in structural), t0)
            self._reform(merged)
            self._set_state(JobState.RUNNING)

    # -- checkpoints, evaluation, summary ----------------------------------------------------
    def _maybe_checkpoint(self, state: dict | None = None) -> None:
        """Write a durable checkpoint every `every_steps` steps, or now when `state` is given."""
        every = self.spec.checkpoint.every_steps
        due = state is not None or (every and self.step // every > self._last_due["ckpt"])
        if every:
            self._last_due["ckpt"] = self.step // every
        if not due or self.last_checkpoint_step == self.step:
            return
        self.last_checkpoint_step = self.step
        if state is None:
            state = ray.get(self.group.active()[0].actor.export_state.remote())
        self.privacy.update_epsilon(self.ledger, force=True)  # the checkpoint's ledger is exact
        path = self.ckpt.save(Checkpoint(
            self.step, state,
            sampler={"seed": self.spec.seed, "sizes": self.sizes,
                     "batch_sizes": self.batch_sizes},
            counters=self.ledger.to_dict(),
            privacy=self.privacy.state_dict(),
            journal_seq=self._attempt_seq,
        ))
        self._journal_break = True
        if self._attempts and self.ckpt.latest_step() == self.step:
            # A resume starts from this checkpoint, whose accountants hold every earlier entry.
            # (After a re-formation went back, a later-step checkpoint is the one a resume
            # uses: the entries since it are kept.)
            self._attempts = []
            self.ckpt.write_attempts([])
        self._log(f"checkpoint {path}")
        self.record.add("checkpoint", self.step, path=str(path))

    def _maybe_evaluate(self) -> dict | None:
        ev = self.spec.evaluation
        if ev is None or not ev.every_steps or \
                self.step // ev.every_steps <= self._last_due["eval"]:
            return None
        self._last_due["eval"] = self.step // ev.every_steps
        t0 = time.time()
        result = self._evaluate()
        self.evaluation_log.append({"step": self.step, "t": t0 - self.t_start,
                                    "seconds": time.time() - t0, **result})
        self.record.add("evaluation", self.step, seconds=time.time() - t0, **result)
        self._log(f"eval at step {self.step}: loss {result['loss']:.4f} "
                  f"accuracy {result['accuracy']:.3f}")
        return result

    def _evaluate(self, state: dict | None = None) -> dict:
        state_ref = state if state is not None else \
            self.group.active()[0].actor.export_state.remote()
        return ray.get(evaluate_remote.remote(self.group.replica_cfg, state_ref,
                                              self.spec.evaluation.model_dump()))

    def _finish(self) -> dict:
        self.privacy.finish(self.ledger)  # before the final checkpoint, which then holds it
        self.final_state = ray.get(self.group.active()[0].actor.export_state.remote())
        self._maybe_checkpoint(self.final_state)
        held_out = self._evaluate(self.final_state) if self.spec.evaluation else None
        summary = {
            "job": self.spec.name, "state": "finished", "steps": self.step,
            "stop_reason": self.stop_reason,
            "resumed_from_step": self.resumed_from,
            "final_loss": float(np.mean(list(self.losses)[-5:]))
            if self.losses and not self.loss_private else None,
            "loss_private": self.loss_private,
            "held_out": held_out,
            "partners": self.ledger.to_dict(),
            "batch_per_step": self.batch_sizes, "workers": self.group.counts(),
            "rescales": len(self.rescales), "wall_time_s": time.time() - self.t_start,
            "training_time_s": self._training_time(), "first_step_at_s": self._t_first_step,
            "worker_seconds": self.worker_seconds,
            "samples_per_s": self._throughput(), "data_warnings": self.data_warnings,
        }
        self.group.shutdown()
        self.record.add("finish", self.step, summary=summary)
        return summary

    # -- helpers -----------------------------------------------------------------------------
    def _set_state(self, state: JobState) -> None:
        self.state = state

    def _log(self, line: str) -> None:
        stamped = f"[{time.time() - self.t_start:7.1f}s] {line}"
        self.log_lines.append((self.n_logged, stamped))
        self.n_logged += 1
        log.info(line)

    def _training_time(self) -> float:
        """From the first step to the last (start-up and final evaluation excluded)."""
        if not self.timeline:
            return 0.0
        return self.timeline[-1][0] - self._t_first_step

    # progress() and snapshot() run on the actor's other threads while the training loop appends
    # to these deques: copy them in one C call (atomic under the GIL) before iterating in Python,
    # which would raise "deque mutated during iteration" if an append came in between.
    def _mean_step_time(self) -> float:
        times = tuple(self.step_times)
        return float(np.mean(times)) if times else 0.0

    def _throughput(self) -> float:
        """Samples per wall-clock second over the last chunks (includes every overhead)."""
        rates = tuple(self.chunk_rates)
        samples = sum(n for n, _ in rates)
        seconds = sum(t for _, t in rates)
        return samples / seconds if seconds else 0.0

    def _describe_counts(self) -> str:
        return " ".join(f"{k}:{v}" for k, v in self.group.counts().items())

    def _export_worker_counts(self) -> None:
        for partner, n in self.group.counts().items():
            metrics.WORKERS.set(n, tags={**self._tags, "partner": partner})

    def _live_by_partner(self) -> dict[str, int]:
        """Workers that hold or will hold CPUs: starting, spare or active."""
        live: dict[str, int] = {}
        for m in self.group.members.values():
            if m.state.alive:
                live[m.partner] = live.get(m.partner, 0) + 1
        return live

    def _sync_capacity(self) -> None:
        if self.capacity is not None:
            self.capacity.sync(self._live_by_partner())


class OnCreatorNode:
    """A Ray actor class whose actors start on the node of the process that creates them.

    The controller and the agent hold no data and use no CPU to speak of; what matters is that
    they do not die with a partner's node (a removed or failed node takes its actors with it). The
    driver's node is the one whose loss ends the job anyway.
    """

    def __init__(self, actor_class) -> None:
        self._actor_class = actor_class

    def options(self, **options):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return self._actor_class.options(**{"scheduling_strategy": here, **options})

    def remote(self, *args, **kwargs):
        return self.options().remote(*args, **kwargs)


RemoteJobController = OnCreatorNode(ray.remote(num_cpus=0, max_concurrency=8)(JobController))
