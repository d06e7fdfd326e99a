"""Small scenarios built in code, shared by the simulator, env, policy and evaluator tests.

Parametric profiles only, so these tests never need the Pollux traces.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from raysys.agent.scenarios import LoadedScenario, scenario_from_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "scenarios"

PROFILE = {"parametric": {"a": 0.02, "b": 0.002, "c": 0.05, "d": 0.005, "gamma": 1.5}}


def base_scenario(**overrides) -> dict:
    """Two partners, two 4-CPU nodes each, no events, no observation noise."""
    data = {
        "name": "tiny",
        "profile": copy.deepcopy(PROFILE),
        "episode": {"samples": 200_000, "interval_s": 10, "observation_noise": 0.0},
        "objective": {"cost_per_worker_second": 0.02},
        "partners": [
            {
                "name": "alpha",
                "batch_share": 128,
                "workers": 2,
                "max_workers": 6,
                "placement": {"site": "a"},
            },
            {
                "name": "beta",
                "batch_share": 64,
                "workers": 1,
                "max_workers": 4,
                "placement": {"site": "b"},
            },
        ],
        "nodes": [
            {"id": "a", "count": 2, "cpus": 4, "labels": {"site": "a"}},
            {"id": "b", "count": 2, "cpus": 4, "labels": {"site": "b"}},
        ],
    }
    data.update(overrides)
    return data


def tiny(**overrides) -> LoadedScenario:
    return scenario_from_dict(base_scenario(**overrides))


@pytest.fixture
def tiny_scenario() -> LoadedScenario:
    return tiny()


def test_tiny_scenario_is_valid(tiny_scenario: LoadedScenario) -> None:
    assert [p.name for p in tiny_scenario.spec.partners] == ["alpha", "beta"]
    assert len(tiny_scenario.spec.initial_nodes()) == 4
