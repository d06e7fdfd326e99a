"""Local SGD across partners (aggregation: local_sgd), live: the same parameters as the
single-process reference through hierarchy, failures and secure aggregation; budgets; bytes."""

from __future__ import annotations

import ray
from conftest import make_spec
from opacus.accountants import RDPAccountant
from test_elastic import final_parameters, wait_for

from raysys.data.sources import load_partner_table
from raysys.spec import JobSpec
from raysys.train.fusion import FusionConfig, fusion_config
from raysys.train.reference import max_relative_difference, reference_local_sgd
from raysys.train.replica import ReplicaConfig

TOLERANCE = 1e-5


def local_sgd(spec: dict, **aggregation) -> dict:
    spec["aggregation"] = {"mode": "local_sgd", **aggregation}
    return spec


def local_sgd_reference(spec: dict):
    s = JobSpec.model_validate(spec)
    tables = {p.name: load_partner_table(p.name, p.data.path, None, "label") for p in s.partners}
    cfg = ReplicaConfig(s.model.name, dict(s.model.kwargs), 12, 4, s.seed, s.optimizer.name,
                        s.optimizer.lr, s.optimizer.momentum, s.optimizer.weight_decay,
                        fusion=fusion_config(s))
    replica = reference_local_sgd(cfg, tables, s.seed, s.global_batch_size, s.steps)
    return replica.flat_parameters().numpy()


def test_hierarchical_partners_match_the_reference_and_count_bytes_apart(
        run, two_partner_data, tmp_path):
    # alpha's 2 workers all-reduce every step inside alpha; partners fuse every 4 steps. 26
    # steps: the last round is 2 steps long.
    spec = local_sgd(make_spec(two_partner_data, tmp_path, steps=26, alpha_workers=2),
                     local_steps=4)
    controller, done = run(spec)
    params = final_parameters(controller, done)
    assert max_relative_difference(params, local_sgd_reference(spec)) <= TOLERANCE
    ledger = ray.get(controller.progress.remote())["ledger"]
    assert ledger["alpha"]["bytes_within_partner"] > 0  # two workers: they exchange locally
    assert ledger["beta"]["bytes_within_partner"] == 0  # one worker: nothing to exchange
    # 7 fusions of the whole model, nothing across partners in between: each of beta's
    # fusions sends 2 (3 - 1) / 3 of the buckets.
    n_params = params.size + 3  # + the tail slots
    assert ledger["beta"]["bytes_exchanged"] == 7 * int(4 / 3 * n_params * 4)


def test_one_local_step_equals_allreduce_live(run, two_partner_data, tmp_path):
    base = make_spec(two_partner_data, tmp_path, steps=20, alpha_workers=2)
    base["optimizer"]["momentum"] = 0.0
    controller, done = run(base)
    plain = final_parameters(controller, done)
    fused_spec = local_sgd(make_spec(two_partner_data, tmp_path, steps=20, alpha_workers=2),
                           local_steps=1)
    fused_spec["optimizer"]["momentum"] = 0.0
    fused_spec["name"] = "t2"
    controller, done = run(fused_spec)
    fused = final_parameters(controller, done)
    assert max_relative_difference(fused, plain) <= TOLERANCE


def test_lost_worker_mid_round_reruns_the_round_under_secure_aggregation(
        run, two_partner_data, tmp_path):
    spec = local_sgd(make_spec(two_partner_data, tmp_path, steps=60, beta_workers=2),
                     local_steps=5, server_optimizer="fedavgm", server_momentum=0.5,
                     proximal_mu=0.1)
    spec["secure_aggregation"] = True
    spec["partners"][1]["workers"]["min"] = 1
    controller, done = run(spec)
    wait_for(controller, lambda p: p["step"] >= 10)
    ray.kill(ray.get_actor("raysys:t:beta:1"))
    params = final_parameters(controller, done)
    events = [e["kind"] for e in ray.get(controller.rescale_events.remote())]
    assert "recovery" in events
    # The round in flight was rolled back and re-run by the survivors on the same samples.
    assert max_relative_difference(params, local_sgd_reference(spec)) <= TOLERANCE


def test_privacy_budget_ends_a_round_early_and_is_accounted_per_local_step(
        run, two_partner_data, tmp_path):
    """alpha: sigma 2, target epsilon 2 lasts 34 steps at its sampling rate 19/150; rounds of
    5 steps, so its budget ends inside a round: that round fuses at step 34."""
    spec = local_sgd(make_spec(two_partner_data, tmp_path, steps=50, alpha_workers=2),
                     local_steps=5)
    spec["partners"][0]["privacy"] = {"dp": {"noise_multiplier": 2.0, "target_epsilon": 2.0,
                                             "max_grad_norm": 1.0, "delta": 1e-5}}
    controller, done = run(spec)
    summary = ray.get(done)
    alpha = summary["partners"]["alpha"]
    direct = RDPAccountant()
    for _ in range(34):
        direct.step(noise_multiplier=2.0, sample_rate=19 / 150)
    assert alpha["steps_participated"] == 34 and alpha["skipped_steps"] == 16
    assert alpha["epsilon"] == direct.get_epsilon(1e-5) <= 2.0
    assert summary["steps"] == 50 and summary["final_loss"] == summary["final_loss"]  # not NaN


def test_non_iid_partners_reach_centralised_accuracy(run, tmp_path):
    """Digits split Dirichlet(0.1) over 4 partners: after the same samples, allreduce, fedavg
    (H = 5) and fedavg with server momentum each end within 2 points of centralised training
    (one replica on all the rows, the same optimizer and batch). fedavg runs live; allreduce
    and fedavgm are their single-process references, which live jobs equal to 1e-5
    (tests/test_elastic.py; in this file, fedavgm through a killed worker), to keep the suite's
    time down."""
    import dataclasses

    import numpy as np
    import torch

    from raysys.data.demo import write_digits_demo
    from raysys.train.reference import reference_replica

    names = ["p0", "p1", "p2", "p3"]
    paths = write_digits_demo(tmp_path / "digits", names, alpha=0.1, seed=0)
    steps, batch = 1000, 64
    spec = {
        "name": "noniid", "model": {"name": "mlp", "kwargs": {"hidden": [128, 64]}},
        "optimizer": {"name": "sgd", "lr": 0.1}, "global_batch_size": batch, "steps": steps,
        "seed": 0, "num_classes": 10,
        "partners": [{"name": n, "data": {"path": str(paths[n])}, "cpus_per_worker": 0.25,
                      "workers": {"initial": 1, "min": 1, "max": 1}} for n in names],
        "evaluation": {"path": str(paths["test"])},
        "checkpoint": {"storage_path": str(tmp_path / "ckpt")},
        "agent": {"policy": "static"},
    }
    tables = {n: load_partner_table(n, str(paths[n]), None, "label") for n in names}
    central = dataclasses.replace(tables["p0"], x=np.concatenate([t.x for t in tables.values()]),
                                  y=np.concatenate([t.y for t in tables.values()]))
    test = load_partner_table("test", str(paths["test"]), None, "label")
    cfg = ReplicaConfig("mlp", {"hidden": [128, 64]}, 64, 10, 0, "sgd", 0.1, 0.0, 0.0)

    def accuracy_of(model) -> float:
        with torch.no_grad():
            return float((model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())

    centralised = accuracy_of(reference_replica(cfg, {"all": central}, 0, batch, steps).model)
    momentum = dataclasses.replace(cfg, fusion=FusionConfig(5, server_optimizer="fedavgm",
                                                            server_momentum=0.5))
    accuracy = {
        "allreduce": accuracy_of(reference_replica(cfg, tables, 0, batch, steps).model),
        "fedavgm": accuracy_of(reference_local_sgd(momentum, tables, 0, batch, steps).model),
    }
    _, done = run({**spec, "name": "fedavg",
                   "aggregation": {"mode": "local_sgd", "local_steps": 5}})
    summary = ray.get(done)
    assert summary["steps"] == steps
    accuracy["fedavg"] = summary["held_out"]["accuracy"]
    assert centralised > 0.93, centralised
    for label, acc in accuracy.items():
        assert acc >= centralised - 0.02, (label, acc, centralised)


def test_rescale_between_rounds_keeps_the_reference(run, two_partner_data, tmp_path):
    # Decisions apply between calls, and under local SGD calls end on round boundaries: a
    # newcomer gets the fused model, and what is learned does not change.
    from raysys.control.decisions import Scale

    spec = local_sgd(make_spec(two_partner_data, tmp_path, steps=40, alpha_workers=1),
                     local_steps=3, server_optimizer="fedadam")
    spec["partners"][0]["workers"]["spares"] = 1
    controller, done = run(spec)
    wait_for(controller, lambda p: p["step"] >= 6)
    ray.get(controller.submit.remote(Scale("alpha", +1)))
    last = wait_for(controller, lambda p: p["workers"]["alpha"] == 2 or p["state"] == "finished")
    assert last["step"] < 40, "the job ended before the rescale took effect"
    params = final_parameters(controller, done)
    assert max_relative_difference(params, local_sgd_reference(spec)) <= TOLERANCE
