"""Residency: a partner's workers run only on nodes matching its placement, including after a
replace, a scale-up and after their node is removed from the cluster; a partner without room
is skipped or holds the job (on_no_room), and is never placed elsewhere."""

from __future__ import annotations

import time
from contextlib import contextmanager

import ray
from conftest import make_spec
from test_elastic import wait_for

from raysys.control.controller import RemoteJobController
from raysys.control.decisions import Replace, Scale


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
        # Scale-ups place newcomers on matching nodes too (the unlabelled head has room).
        ray.get(controller.submit.remote(Scale("alpha", 1)))
        ray.get(controller.submit.remote(Scale("beta", 1)))
        wait_for(controller, lambda p: p["workers"] == {"alpha": 2, "beta": 2}, timeout_s=90)
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
    assert sum(w["state"] == "active" for w in workers) == 4


@contextmanager
def gamma_job(ray_cluster, data: dict, tmp_path, **gamma: object):
    """A running job with a third partner, gamma, whose one worker sits on the one gamma node
    (`first`), the node list being `nodes`: the test may remove and add gamma nodes; those left
    are removed at the end (the session cluster keeps only its own)."""
    nodes = [ray_cluster.add_node(num_cpus=2, labels={"partner": "gamma"})]
    ray_cluster.wait_for_nodes()
    spec = make_spec(data, tmp_path, steps=100_000)
    spec["partners"].append({
        "name": "gamma", "data": {"path": data["test"]}, "placement": {"partner": "gamma"},
        "cpus_per_worker": 0.25, "workers": {"initial": 1, "min": 1, "max": 2}, **gamma})
    controller = RemoteJobController.remote(spec)
    done = controller.run.remote()
    try:
        wait_for(controller, lambda p: p["step"] >= 3)
        yield controller, done, nodes
    finally:
        ray.kill(controller)
        for node in nodes:
            if node in ray_cluster.worker_nodes:  # not removed by the test already
                ray_cluster.remove_node(node)


def finish(controller, done) -> tuple[list[dict], list[str], dict]:
    """Workers and events as the job ends, and its summary."""
    workers = ray.get(controller.workers.remote())
    events = ray.get(controller.progress.remote())["events"]
    ray.get(controller.stop.remote())
    return workers, events, ray.get(done)


def test_a_partner_without_room_waits_skipped_and_is_never_placed_elsewhere(
        ray_cluster, two_partner_data, tmp_path):
    """gamma's only node goes away: its samples are skipped while its replacement waits for a
    gamma node (other nodes have room, and are not used); a gamma node joins and it resumes."""
    with gamma_job(ray_cluster, two_partner_data, tmp_path) as (controller, done, nodes):
        ray_cluster.remove_node(nodes[0])
        wait_for(controller, lambda p: p["workers"]["gamma"] == 0, timeout_s=60)
        skipped_from = ray.get(controller.progress.remote())["step"]
        wait_for(controller, lambda p: p["step"] >= skipped_from + 20)  # the others train on
        pending = [w for w in ray.get(controller.workers.remote())
                   if w["partner"] == "gamma" and w["state"] == "starting"]
        nodes.append(ray_cluster.add_node(num_cpus=2, labels={"partner": "gamma"}))
        wait_for(controller, lambda p: p["workers"]["gamma"] == 1, timeout_s=90)
        step = ray.get(controller.progress.remote())["step"]
        wait_for(controller, lambda p: p["step"] >= step + 3)
        workers, _, summary = finish(controller, done)
    assert pending and all(w["node_id"] is None for w in pending)  # waiting, not placed
    gamma = [w for w in workers if w["partner"] == "gamma" and w["node_id"]]
    assert {w["node_id"] for w in gamma} <= {n.node_id for n in nodes}
    assert any(w["node_id"] == nodes[1].node_id and w["state"] == "active" for w in gamma)
    assert summary["partners"]["gamma"]["skipped_steps"] >= 20
    assert summary["partners"]["gamma"]["failures"] == 1


def test_a_partner_that_waits_holds_the_job_until_it_has_room(
        ray_cluster, two_partner_data, tmp_path):
    """gamma (on_no_room: wait) loses its only node: no step runs without it, none is skipped;
    its replacement waits for a gamma node, and the job resumes once one joins."""
    with gamma_job(ray_cluster, two_partner_data, tmp_path, on_no_room="wait") as (
            controller, done, nodes):
        ray_cluster.remove_node(nodes[0])
        wait_for(controller, lambda p: any("the job waits" in e for e in p["events"]),
                 timeout_s=60)
        held = ray.get(controller.progress.remote())["step"]
        time.sleep(3)
        still = ray.get(controller.progress.remote())["step"]
        nodes.append(ray_cluster.add_node(num_cpus=2, labels={"partner": "gamma"}))
        wait_for(controller, lambda p: p["step"] >= held + 5, timeout_s=90)
        workers, events, summary = finish(controller, done)
    assert still == held  # nothing ran while gamma had no worker
    assert any("the job resumes after waiting" in e for e in events), events
    assert summary["partners"]["gamma"]["skipped_steps"] == 0
    assert summary["partners"]["gamma"]["steps_participated"] == summary["steps"]
    gamma = [w for w in workers if w["partner"] == "gamma" and w["node_id"]]
    assert {w["node_id"] for w in gamma} <= {n.node_id for n in nodes}
