"""`raysys status`: a running job's progress, workers and ledger, found by its actor's name."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys.control.controller import RemoteJobController
from raysys.runner import NAMESPACE


def raysys_cli(*args: str) -> subprocess.CompletedProcess:
    """The `raysys` command, as an operator types it (wide output: no wrapped table rows)."""
    return subprocess.run([sys.executable, "-m", "raysys.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_status_and_stop_from_the_command_line(ray_cluster, two_partner_data, tmp_path):
    """`raysys status JOB --address` and `raysys stop JOB --address` against a running job
    (its controller named in the raysys namespace, as `raysys run` and jobs/train.py name it)."""
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=2)
    spec["name"] = "seen"
    controller = RemoteJobController.options(
        name="raysys:seen:controller", namespace=NAMESPACE).remote(spec)
    done = controller.run.remote()
    address = ray_cluster.address
    try:
        wait_for(controller, lambda p: p["step"] >= 5)
        shown = raysys_cli("status", "seen", "--address", address)
        assert shown.returncode == 0, shown.stderr
        other = raysys_cli("status", "other", "--address", address)
        assert other.returncode == 2
        assert re.search(r"no running job 'other'.*running: seen", other.stderr), other.stderr
        stopped = raysys_cli("stop", "seen", "--address", address)
        assert stopped.returncode == 0, stopped.stderr
        assert "job seen stops after the steps in flight" in stopped.stdout
        summary = ray.get(done, timeout=120)
    finally:
        ray.kill(controller)
    assert summary["state"] == "finished" and summary["steps"] >= 5
    text = shown.stdout
    assert re.search(r"workers alpha\s.*2 \(on ", text), text
    assert "partner beta" in text and "samples" in text and "sent" in text
    assert raysys_cli("stop", "seen", "--address", address).returncode == 2  # gone now

