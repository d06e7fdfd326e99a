"""Residency: a partner's workers run only on nodes matching its placement, including after a
replace and after their node is removed from the cluster."""

from __future__ import annotations

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys.control.controller import RemoteJobController
from raysys.control.decisions import Replace


def test_workers_stay_on_matching_nodes_through_replace_and_node_loss(
        ray_cluster, two_partner_data, tmp_path):
    extra = ray_cluster.add_node(num_cpus=2, labels={"partner": "alpha", "zone": "b"})
    ray_cluster.wait_for_nodes()
    labels = {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n["Alive"]}
    beta_node = next(n for n, lab in labels.items() if lab.get("partner") == "beta")
    spec = make_spec(two_partner_data, tmp_path, steps=100_000, alpha_workers=1)
    spec["partners"][0]["workers"]["min"] = 1
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    try:
        wait_for(controller, lambda p: p["step"] >= 3)
        # A replace onto a node outside alpha's placement is refused...
        ray.get(controller.submit.remote(Replace("alpha/0", node=beta_node)))
        # ...one onto the extra alpha node is carried out.
        ray.get(controller.submit.remote(Replace("alpha/0", node=extra.node_id)))
        wait_for(controller, lambda p: any("alpha/0 -> alpha/1" in e and "took" in e
                                           for e in p["events"]))
        workers = {w["id"]: w for w in ray.get(controller.workers.remote())}
        assert workers["alpha/1"]["node_id"] == extra.node_id
        assert workers["alpha/0"]["state"] == "gone"

        ray_cluster.remove_node(extra)  # alpha/1 dies with its node; min 1 brings a newcomer
        wait_for(controller, lambda p: p["workers"]["alpha"] == 1 and any(
            "alpha/2" in e and "took" in e for e in p["events"]), timeout_s=90)
        step = ray.get(controller.progress.remote())["step"]
        wait_for(controller, lambda p: p["step"] >= step + 3)
        workers = ray.get(controller.workers.remote())
        events = ray.get(controller.progress.remote())["events"]
        ray.get(controller.stop.remote())
        summary = ray.get(done)
    finally:
        ray.kill(controller)
    assert any("not a live node of alpha's placement" in e for e in events)
    assert summary["partners"]["alpha"]["failures"] == 1
    for w in workers:
        assert labels[w["node_id"]].get("partner") == w["partner"], w
    assert {w["id"] for w in workers if w["state"] == "active"} >= {"alpha/2", "beta/0"}
