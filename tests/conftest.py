"""Shared fixtures: one real local Ray cluster for the session, with labelled "nodes" on this host.

Tests set RAY_AUTH_MODE=disabled for themselves only (a fresh local cluster would otherwise write
~/.ray/auth_token and require token auth from every client).
"""

from __future__ import annotations

import os
import socket

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402

from raysys.data.demo import write_blobs_table as write_table  # noqa: E402


def free_metrics_port() -> int:
    """A free port outside Ray's worker port range (10002-19999)."""
    for port in range(20000 + os.getpid() % 5000, 30000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port for metrics")


@pytest.fixture(scope="session")
def ray_cluster():
    """Head (2 CPUs) plus one node labelled partner=alpha and one partner=beta (4 CPUs each)."""
    import ray
    from ray.cluster_utils import Cluster

    port = free_metrics_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "metrics_export_port": port, "include_dashboard": False})
    cluster.add_node(num_cpus=4, labels={"partner": "alpha"})
    cluster.add_node(num_cpus=4, labels={"partner": "beta"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.metrics_port = port
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def run(ray_cluster):
    """Start a controller for a spec; the test steers it; parameters are read before shutdown."""
    started = []

    def start(spec: dict, **kwargs):
        from raysys.control.controller import RemoteJobController

        controller = RemoteJobController.remote(spec, **kwargs)
        started.append(controller)
        return controller, controller.run.remote()

    yield start
    import ray

    for c in started:
        ray.kill(c)


@pytest.fixture
def two_partner_data(tmp_path):
    """Small synthetic tables of two partners of different sizes, plus a held-out table."""
    return {
        "alpha": write_table(tmp_path / "alpha.parquet", 150, 12, 4, seed=1),
        "beta": write_table(tmp_path / "beta.parquet", 90, 12, 4, seed=2),
        "test": write_table(tmp_path / "test.parquet", 60, 12, 4, seed=3),
    }


def make_spec(data: dict, tmp_path, steps: int = 24, alpha_workers: int = 1,
              beta_workers: int = 1, **overrides) -> dict:
    spec = {
        "name": "t",
        "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "global_batch_size": 30,
        "steps": steps,
        "seed": 7,
        "num_classes": 4,
        "partners": [
            {"name": "alpha", "data": {"path": data["alpha"]}, "placement": {"partner": "alpha"},
             "workers": {"initial": alpha_workers, "min": 0, "max": 4}, "cpus_per_worker": 0.25},
            {"name": "beta", "data": {"path": data["beta"]}, "placement": {"partner": "beta"},
             "workers": {"initial": beta_workers, "min": 0, "max": 4}, "cpus_per_worker": 0.25},
        ],
        "checkpoint": {"storage_path": str(tmp_path / "ckpt"), "every_steps": 0},
        "runtime": {"collective_timeout_s": 20, "steps_per_call": 1},
        # Tests that steer with an agent say so; the default (rl) would start one per run_job.
        "agent": {"policy": "static"},
    }
    for key, value in overrides.items():
        spec[key] = value
    return spec
