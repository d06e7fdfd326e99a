"""`raysys status`: a running job's progress, workers and ledger, found by its actor's name."""

from __future__ import annotations

import io

import pytest
import ray
from conftest import make_spec
from rich.console import Console
from test_elastic import wait_for

from raysys.control.controller import RemoteJobController
from raysys.status import job_status, print_status, running_jobs, stop_job


def test_status_shows_a_running_jobs_workers_and_ledger(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=2)
    spec["name"] = "seen"
    controller = RemoteJobController.options(name="raysys:seen:controller").remote(spec)
    done = controller.run.remote()
    try:
        wait_for(controller, lambda p: p["step"] >= 5)
        assert "seen" in running_jobs()
        status = job_status("seen")
        out = io.StringIO()
        print_status(status, Console(file=out, width=200))
        with pytest.raises(ValueError, match="no running job 'other'.*running: seen"):
            job_status("other")
        stop_job("seen")  # what `raysys stop seen` does
        summary = ray.get(done)
    finally:
        ray.kill(controller)
    assert summary["state"] == "finished" and summary["steps"] >= 5
    text = out.getvalue()
    assert status["progress"]["workers"] == {"alpha": 2, "beta": 1}
    assert status["progress"]["ledger"]["alpha"]["samples"] > 0
    assert "workers alpha" in text and "2 (on " in text
    assert "partner beta" in text and "samples" in text and "sent" in text
