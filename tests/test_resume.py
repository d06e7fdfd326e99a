"""Durable checkpoints: atomic files, and `raysys run --resume` after the driver was killed ends at
the parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from conftest import make_spec
from test_elastic import reference_for

from raysys.runner import NAMESPACE
from raysys.train.checkpoint import Checkpoint, CheckpointStore
from raysys.train.reference import max_relative_difference
from raysys.train.replica import Replica, ReplicaConfig


def test_checkpoint_store_keeps_latest_and_no_partial_files(tmp_path):
    store = CheckpointStore(str(tmp_path), "job", keep=2)
    for step in (10, 20, 30):
        store.save(Checkpoint(step, {"x": torch.ones(2) * step}, {"seed": 1}, {"a": {}}))
    names = sorted(os.listdir(tmp_path / "job"))
    assert names == ["step-000000020.pt", "step-000000030.pt"]
    latest = store.latest()
    assert latest.step == 30 and float(latest.state["x"][0]) == 30.0


def test_the_attempt_journal_round_trips(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    assert store.attempts() == []
    journal = [[0, 10, 14, {"beta": 1.5}], [1, 12, 14, {"alpha": 0.8, "beta": 1.5}]]
    store.write_attempts(journal)
    assert store.attempts() == journal
    store.write_attempts([])
    assert store.attempts() == []


def test_checkpoint_keeps_the_privacy_histories(tmp_path):
    """The DP accountants' histories travel with the checkpoint; a file written before they did
    loads with none (the controller then says how it accounts the steps)."""
    store = CheckpointStore(str(tmp_path), "job")
    history = {"beta": {"kind": "rdp", "noise_multiplier": 1.1, "sample_rate": 0.1,
                        "delta": 1e-5, "history": [[1.1, 0.1, 7]]}}
    store.save(Checkpoint(7, {}, {}, {}, privacy=history))
    assert store.latest().privacy == history
    old = tmp_path / "job" / "step-000000009.pt"
    torch.save({"step": 9, "state": {}, "sampler": {}, "counters": {}}, old)
    assert store.latest().step == 9 and store.latest().privacy is None


def test_checkpoint_store_accepts_a_filesystem_uri(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}", "job")
    store.save(Checkpoint(5, {"x": torch.zeros(1)}, {}, {}))
    assert CheckpointStore(str(tmp_path), "job").latest().step == 5


def _flat(path: Path, spec: dict) -> np.ndarray:
    data = torch.load(path, weights_only=False)
    s = spec
    cfg = ReplicaConfig("mlp", s["model"]["kwargs"], 12, 4, s["seed"], "sgd",
                        s["optimizer"]["lr"], s["optimizer"]["momentum"], 0.0)
    replica = Replica(cfg)
    replica.load_state(data["state"])
    return replica.flat_parameters().numpy()


def _killed_then_resumed(ray_cluster, spec: dict, tmp_path) -> tuple[dict, int, int]:
    """Run `spec` from the CLI, kill the driver after its first checkpoint, resume it to the
    end. Returns the resumed run's summary, the step it resumed from, and the journal of steps
    the killed run attempted after that checkpoint."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec))
    ckpt_dir = tmp_path / "ckpt" / "t"
    cmd = [sys.executable, "-m", "raysys.cli", "run", str(config), "--address",
           ray_cluster.address, "--quiet"]
    driver = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpt_dir.glob("step-*.pt")):
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run, after its first checkpoint
    driver.wait()
    # Ray reaps the dead driver's controller a moment later; until then it may train on (and
    # write checkpoints and marks), so look at what it left only once it is gone.
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ray.get_actor("raysys:t:controller", namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed driver's controller is still alive after 60 s")
    first = sorted(ckpt_dir.glob("step-*.pt"))
    assert first and int(first[-1].stem.split("-")[1]) < spec["steps"]
    store = CheckpointStore(str(tmp_path / "ckpt"), "t")
    after = store.latest().journal_seq
    attempts = [a[1:] for a in store.attempts() if a[0] >= after]  # as the resume reads it

    summary_path = tmp_path / "summary.json"
    resumed = subprocess.run(cmd + ["--resume", "--summary", str(summary_path)], timeout=300)
    assert resumed.returncode == 0
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == spec["steps"]
    assert summary["resumed_from_step"] == int(first[-1].stem.split("-")[1])
    return summary, summary["resumed_from_step"], attempts


def test_resume_after_driver_killed_matches_uninterrupted_run(ray_cluster, two_partner_data,
                                                              tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=60)
    spec["checkpoint"]["every_steps"] = 10
    summary, _, attempts = _killed_then_resumed(ray_cluster, spec, tmp_path)
    assert attempts == []  # no partner under DP: no journal
    # Samples counted before the crash were restored from the checkpoint, not lost.
    # The whole contribution ledger travels in checkpoints.
    for name, entry in summary["partners"].items():
        assert entry["samples"] == 60 * summary["batch_per_step"][name]
        assert entry["steps_participated"] == 60 and entry["skipped_steps"] == 0
        assert entry["compute_s"] > 0 and entry["bytes_exchanged"] > 0
        assert entry["epsilon"] is None  # no differential privacy asked for
    final = _flat(tmp_path / "ckpt" / "t" / "step-000000060.pt", spec)
    assert max_relative_difference(final, reference_for(spec)) <= 1e-5


def test_a_resumed_dp_job_accounts_the_steps_it_runs_again(ray_cluster, two_partner_data,
                                                          tmp_path):
    """The killed run may have released steps past its last checkpoint (its journal of
    attempts); the resumed run runs them again on the same rows, so each is accounted at
    sigma / sqrt(2)."""
    from opacus.accountants import RDPAccountant

    spec = make_spec(two_partner_data, tmp_path, steps=60)
    spec["checkpoint"]["every_steps"] = 10
    spec["runtime"]["steps_per_call"] = 4
    spec["partners"][1]["privacy"] = {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    summary, resumed_from, attempts = _killed_then_resumed(ray_cluster, spec, tmp_path)
    # One contiguous attempt by beta from the checkpoint on (no failure), never past the next
    # checkpoint, where chunks end; or none, if the driver died right after the checkpoint.
    assert attempts == [] or (len(attempts) == 1 and attempts[0][0] == resumed_from
                              and attempts[0][2] == {"beta": 1.0})
    again = attempts[0][1] - resumed_from if attempts else 0
    assert 0 <= again <= 10
    beta = summary["partners"]["beta"]
    q = summary["batch_per_step"]["beta"] / 90
    direct = RDPAccountant()
    direct.history = [(1.0, q, 60 - again), (1.0 / 2**0.5, q, again)]
    assert beta["steps_participated"] == 60
    assert beta["epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
