"""Workers and the controller export ray.util.metrics that appear at the nodes' /metrics."""

from __future__ import annotations

import time
import urllib.request

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys.control.controller import RemoteJobController
from raysys.control.decisions import Scale

EXPECTED = [
    "ray_raysys_step_time_seconds_bucket",
    "ray_raysys_worker_samples_per_second",
    "ray_raysys_loss",
    "ray_raysys_job_samples_per_second",
    "ray_raysys_workers",
    "ray_raysys_rescales_total",
    "ray_raysys_rescale_seconds_bucket",
    "ray_raysys_worker_failures_total",
    # the contribution ledger (epsilon only for DP partners: alpha below)
    "ray_raysys_partner_samples",
    "ray_raysys_partner_compute_seconds",
    "ray_raysys_partner_bytes_sent",
    "ray_raysys_partner_bytes_within",
    "ray_raysys_partner_skipped_steps",
    "ray_raysys_partner_epsilon",
]


def scrape_all_nodes() -> str:
    text = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node["Alive"] or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{port}/metrics",
                                        timeout=5) as r:
                text.append(r.read().decode())
        except OSError:
            continue
    return "\n".join(text)


def test_training_metrics_reach_the_metrics_endpoint(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=1, beta_workers=2)
    spec["partners"][0]["workers"]["spares"] = 1
    spec["partners"][0]["privacy"] = {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    spec["name"] = "metrics"
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    try:
        wait_for(controller, lambda p: p["step"] >= 3)
        ray.get(controller.submit.remote(Scale("alpha", +1)))
        wait_for(controller, lambda p: p["workers"]["alpha"] == 2)
        ray.kill(ray.get_actor("raysys:metrics:beta:1"))
        wait_for(controller, lambda p: p["workers"]["beta"] == 1)
        deadline = time.time() + 60  # Ray exports every ~10 s
        missing = EXPECTED
        while time.time() < deadline and missing:
            text = scrape_all_nodes()
            missing = [m for m in EXPECTED if m not in text]
            time.sleep(2)
        ray.get(controller.stop.remote())
        ray.get(done)
    finally:
        ray.kill(controller)
    assert not missing, f"not exported: {missing}"
    assert 'job="metrics"' in text and 'partner="alpha"' in text
