"""Workers and the controller export ray.util.metrics that appear at the nodes' /metrics."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys.agent.actor import RemoteAgentActor
from raysys.control.controller import RemoteJobController
from raysys.control.decisions import Scale

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def documented_series() -> list[str]:
    """The `exported as` column of docs/metrics.md's reference table."""
    series = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`ray_raysys_"):
            series.append(cells[1].strip("`"))
    return series


def test_the_metrics_doc_lists_every_metric_the_code_defines():
    from raysys.control import metrics

    defined = set(re.findall(r'"(raysys_[a-z_]+)"', Path(metrics.__file__).read_text()))
    documented = {s.removeprefix("ray_").removesuffix("_bucket") for s in documented_series()}
    assert defined == documented, (defined ^ documented)


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
    # An agent whose RL checkpoint is missing: it falls back to static (counted) and goes on
    # deciding (timed and counted), so the agent's metrics are exported too.
    spec["agent"] = {"policy": "rl", "checkpoint": str(tmp_path / "missing"), "interval_s": 1}
    expected = documented_series()
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    agent = RemoteAgentActor.remote(controller, spec)
    try:
        wait_for(controller, lambda p: p["step"] >= 3)
        ray.get(controller.submit.remote(Scale("alpha", +1)))
        wait_for(controller, lambda p: p["workers"]["alpha"] == 2)
        ray.kill(ray.get_actor("raysys:metrics:beta:1"))
        # Only the failure's metrics matter here (fault handling has its own tests).
        wait_for(controller, lambda p: p["workers"]["beta"] < 2)
        deadline = time.time() + 60  # Ray exports every ~10 s
        missing = expected
        while time.time() < deadline and missing:
            text = scrape_all_nodes()
            missing = [m for m in expected if m not in text]
            time.sleep(2)
        ray.get(controller.stop.remote())
        ray.get(done)
    finally:
        ray.kill(agent)
        ray.kill(controller)
    assert len(expected) >= 18
    assert not missing, f"not exported: {missing}"
    assert 'job="metrics"' in text and 'partner="alpha"' in text
