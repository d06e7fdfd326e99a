"""cluster.yaml and the AWS variant are valid Ray cluster-launcher configs that label partners."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "docs/cluster-aws.yaml"])
def test_cluster_launcher_config_is_valid(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))  # raises on any schema violation


def test_on_prem_workers_start_with_their_partner_label():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "local"
    start = " ".join(config["worker_start_ray_commands"])
    assert "--labels partner=" in start


def test_aws_node_types_carry_partner_labels():
    config = yaml.safe_load((ROOT / "docs/cluster-aws.yaml").read_text())
    labelled = {t: c.get("labels", {}).get("partner")
                for t, c in config["available_node_types"].items() if t != "head"}
    assert labelled == {"alpha": "alpha", "beta": "beta", "gamma": "gamma"}
