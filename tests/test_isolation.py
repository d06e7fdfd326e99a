"""No raw row leaves a worker: every value any worker method returns and every argument it is
sent (both go through Ray's object store: what the controller puts there, such as a checkpoint's
state for a newcomer, reaches workers as arguments) is scanned for every row of every partner,
through a job that rescales, rebalances, replaces, loses a worker, checkpoints and evaluates; so
are what the controller hands the driver and the checkpoint files."""

from __future__ import annotations

import functools
import pickle
import sys

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.cloudpickle
import torch
from conftest import make_spec
from test_elastic import wait_for

from raysys.control.decisions import Rebalance, Replace, Scale
from raysys.train.worker import PartnerWorker

FEATURES = [f"f{i}" for i in range(12)]
# What a worker can be asked: every public method of PartnerWorker (ray.remote derives its own
# class from this one, whose methods must pass through untouched).
WORKER_METHODS = {n for n, v in vars(PartnerWorker).items()
                  if callable(v) and not n.startswith("_")}


def leaked_rows(value: object, rows: np.ndarray) -> list[int]:
    """Indices of `rows` whose feature bytes appear anywhere in the pickled `value`."""
    blob = pickle.dumps(value)
    return [i for i, row in enumerate(rows) if row.tobytes() in blob]


def audited(name: str, method):
    """`method` of PartnerWorker, failing if what it is sent or returns holds a row of any
    partner (ALL_ROWS)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        sent = leaked_rows((args, kwargs), self.ALL_ROWS)
        if sent:
            raise AssertionError(f"{name} was sent rows {sent[:5]}")
        result = method(self, *args, **kwargs)
        hits = leaked_rows(result, self.ALL_ROWS)
        if hits:
            raise AssertionError(f"{name} returned rows {hits[:5]}")
        self._audit_counts[name] = self._audit_counts.get(name, 0) + 1
        return result
    return wrapper


class AuditedWorker(PartnerWorker):
    """A PartnerWorker whose every public method's arguments and result are checked."""

    ALL_ROWS = np.zeros((0, len(FEATURES)), dtype=np.float32)  # every partner's, set per test

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._audit_counts: dict[str, int] = {}

    def audit_counts(self) -> dict[str, int]:
        """Calls audited per method, and under "rows" how many rows the audit looks for."""
        return {**self._audit_counts, "rows": len(self.ALL_ROWS)}


for _name in WORKER_METHODS:
    setattr(AuditedWorker, _name, audited(_name, getattr(PartnerWorker, _name)))


def test_the_audit_would_catch_a_leaked_row(two_partner_data):
    rows = pq.read_table(two_partner_data["alpha"]).select(FEATURES).to_pandas().to_numpy(
        dtype=np.float32)
    assert leaked_rows({"sum": rows.sum(0), "n": len(rows)}, rows) == []
    assert leaked_rows({"oops": [rows[7].copy()]}, rows) == [7]
    assert leaked_rows(torch.from_numpy(rows[3:4].copy()), rows) == [3]


def partner_rows(data: dict) -> np.ndarray:
    """Every row of every partner, as the float32 features a worker holds."""
    return np.concatenate([
        pq.read_table(data[p]).select(FEATURES).to_pandas().to_numpy(dtype=np.float32)
        for p in ("alpha", "beta")])


def test_no_row_crosses_a_worker_boundary(run, two_partner_data, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    rows = partner_rows(two_partner_data)
    worker_class = type("AuditedWorkerAllRows", (AuditedWorker,), {"ALL_ROWS": rows})
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=2)
    spec["checkpoint"]["every_steps"] = 10
    spec["evaluation"] = {"path": two_partner_data["test"], "every_steps": 20}
    spec["partners"][1]["workers"].update(min=1, spares=1)
    controller, done = run(spec, worker_class=worker_class)
    wait_for(controller, lambda p: p["step"] >= 5)
    ray.get(controller.submit.remote(Scale("beta", 1)))
    wait_for(controller, lambda p: p["workers"]["beta"] == 2)
    ray.get(controller.submit.remote(Rebalance("alpha", {"alpha/0": 0.7, "alpha/1": 0.3})))
    ray.get(controller.submit.remote(Replace("alpha/1")))
    ray.get(controller.submit.remote(Replace("alpha/1")))  # again, while the first is on its way
    events = wait_for(controller, lambda p: any("alpha/1 -> " in e and "took" in e
                                                for e in p["events"]))["events"]
    assert any("alpha/1 is already being replaced" in e for e in events), events
    victim = ray.get_actor(f"raysys:{spec['name']}:beta:0")
    ray.kill(victim, no_restart=True)
    wait_for(controller, lambda p: any("beta/0 died" in e for e in p["events"]))
    step = ray.get(controller.progress.remote())["step"]
    wait_for(controller, lambda p: p["step"] >= step + 25)
    ray.get(controller.parameters.remote())  # read from a live worker
    workers = [w for w in ray.get(controller.workers.remote()) if w["state"] != "gone"]
    # alpha/1's replacement took over its share of the 0.7 : 0.3 split (as in the simulator)
    alpha = {w["id"]: w["local_batch"] for w in workers if w["partner"] == "alpha"}
    newcomer = next(i for i in alpha if i != "alpha/0")
    assert alpha["alpha/0"] > alpha[newcomer] > 0, alpha
    audited = {}
    for w in workers:
        actor = ray.get_actor(f"raysys:{spec['name']}:{w['id'].replace('/', ':')}")
        audited[w["id"]] = ray.get(actor.audit_counts.remote())
    driver_sees = [ray.get(controller.progress.remote()), ray.get(controller.workers.remote()),
                   ray.get(controller.parameters.remote())]
    ray.get(controller.stop.remote())
    summary = ray.get(done)  # an AssertionError in any worker would have failed the job
    assert summary["steps"] >= step + 25
    checkpoints = sorted((tmp_path / "ckpt").rglob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        assert leaked_rows(torch.load(path, weights_only=False), rows) == [], path
    assert leaked_rows([*driver_sees, summary], rows) == []
    assert summary["workers"]["alpha"] == 2  # one replacement, not two
    # the audit saw the methods that carry results out of a worker
    assert all(counts.pop("rows") == len(rows) for counts in audited.values())  # not vacuous
    seen = set().union(*audited.values())
    assert {"load", "build", "join", "run_steps", "export_state", "import_state",
            "settle", "flat_parameters"} <= seen, audited
