"""The job spec rejects bad input before anything starts, naming the field path and line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_spec
from pydantic import ValidationError

from raysys.spec import JobSpec, check_against_cluster, load_spec
from raysys.yamlio import ConfigError


@pytest.fixture
def good(two_partner_data, tmp_path) -> dict:
    return make_spec(two_partner_data, tmp_path)


def write(tmp_path, spec: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def error_for(tmp_path, spec: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_spec(write(tmp_path, spec))
    return str(exc.value)


def test_a_good_spec_loads(good, tmp_path):
    spec = load_spec(write(tmp_path, good))
    assert [p.name for p in spec.partners] == ["alpha", "beta"]
    assert spec.partner("beta").workers.max == 4


def test_unknown_key_names_its_path_and_line(good, tmp_path):
    good["partners"][1]["workers"]["maximum"] = 3
    msg = error_for(tmp_path, good)
    assert "partners.1.workers.maximum: unknown key" in msg
    lines = (tmp_path / "job.yaml").read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines, 1) if "maximum" in line)
    assert f"job.yaml:{line_no}:" in msg


def test_wrong_type(good, tmp_path):
    good["global_batch_size"] = "many"
    assert "global_batch_size: Input should be a valid integer" in error_for(tmp_path, good)


def test_min_greater_than_max(good, tmp_path):
    good["partners"][0]["workers"] = {"initial": 2, "min": 3, "max": 2}
    assert "partners.0.workers: min (3) is greater than max (2)" in error_for(tmp_path, good)


def test_initial_outside_bounds(good, tmp_path):
    good["partners"][0]["workers"] = {"initial": 5, "min": 1, "max": 2}
    assert "initial (5) must lie between" in error_for(tmp_path, good)


def test_duplicate_partner_names(good, tmp_path):
    good["partners"][1]["name"] = "alpha"
    assert "partners: duplicate partner name 'alpha'" in error_for(tmp_path, good)


def test_missing_data_file(good, tmp_path):
    good["partners"][1]["data"]["path"] = str(tmp_path / "nope.parquet")
    msg = error_for(tmp_path, good)
    assert "partners.1.data" in msg and "nope.parquet' not found" in msg


def test_file_on_partner_nodes_is_not_checked_here(good, tmp_path):
    good["partners"][1]["data"] = {"path": "/srv/beta/only-there.parquet",
                                   "on_partner_nodes": True}
    assert load_spec(write(tmp_path, good)).partners[1].data.on_partner_nodes


def test_unknown_model_and_bad_optimizer(good, tmp_path):
    good["model"]["name"] = "resnet9000"
    good["optimizer"]["name"] = "lion"
    msg = error_for(tmp_path, good)
    assert "model.name: unknown model 'resnet9000'" in msg
    assert "optimizer.name" in msg


def test_all_problems_reported_at_once(good, tmp_path):
    good["steps"] = 0
    good["seed"] = "x"
    msg = error_for(tmp_path, good)
    assert "steps:" in msg and "seed:" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\npartners: [\n  - a: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(path)


def test_placement_label_no_node_carries(good):
    spec = JobSpec.model_validate(good)
    nodes = [{"Alive": True, "Labels": {"partner": "alpha", "ray.io/node-id": "n1"}},
             {"Alive": False, "Labels": {"partner": "beta"}}]  # beta's only node is dead
    with pytest.raises(ConfigError) as exc:
        check_against_cluster(spec, nodes)
    assert "partners.1.placement: no live node carries {'partner': 'beta'}" in str(exc.value)
    assert "partner=alpha" in str(exc.value)
    nodes[1]["Alive"] = True
    check_against_cluster(spec, nodes)


def test_spec_is_immutable_once_validated(good):
    spec = JobSpec.model_validate(copy.deepcopy(good))
    with pytest.raises(ValidationError, match="frozen"):
        spec.steps = 3


def test_cli_exits_2_with_the_error_and_starts_nothing(good, tmp_path):
    good["partners"][0]["cpus_per_worker"] = -1
    path = write(tmp_path, good)
    out = subprocess.run([sys.executable, "-m", "raysys.cli", "run", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "partners.0.cpus_per_worker" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_chaos_entries_are_checked(good, tmp_path):
    good["chaos"] = [{"at_step": 5, "worker": "delta/0", "slow": 3},
                     {"at_step": 5, "worker": "alpha/0", "slow": 3, "kill": True}]
    msg = error_for(tmp_path, good)
    assert "chaos.1: give exactly one of slow: FACTOR or kill: true" in msg
    good["chaos"] = [{"at_step": 5, "worker": "delta/0", "slow": 3}]
    assert "chaos.0.worker: no partner named 'delta'" in error_for(tmp_path, good)


def test_sparse_masking_needs_secure_aggregation_and_a_positive_count(good, tmp_path):
    good["secure_aggregation_neighbours"] = 2
    msg = error_for(tmp_path, good)
    assert "secure_aggregation_neighbours is set but secure_aggregation is false" in msg
    good["secure_aggregation"] = True
    assert load_spec(write(tmp_path, good)).secure_aggregation_neighbours == 2
    good["secure_aggregation_neighbours"] = 0
    assert "secure_aggregation_neighbours" in error_for(tmp_path, good)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "jobs/configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding what `raysys data demo` writes (the configs' data paths are
    relative to it; a fresh clone has no data/)."""
    from raysys.data.demo import write_digits_demo

    root = tmp_path_factory.mktemp("demo")
    write_digits_demo(root / "data/digits")
    return root


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path, demo_data: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples in jobs/configs stay in step with the spec (run for real by the demo and
    docs/privacy.md's example)."""
    monkeypatch.chdir(demo_data)
    spec = load_spec(path)
    assert spec.partners and spec.steps > 0


def test_the_private_example_uses_every_privacy_option(demo_data: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_data)
    spec = load_spec(next(p for p in SHIPPED_CONFIGS if p.name == "digits_private.yaml"))
    assert spec.secure_aggregation
    assert all(p.privacy.dp is not None and p.privacy.dp.target_epsilon for p in spec.partners)
