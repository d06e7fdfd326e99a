"""Scenario files: every shipped one loads and runs; mistakes name file, field and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sim_fixtures import SHIPPED

from raysys.agent.evaluate import run_episode
from raysys.agent.policies import make_policy
from raysys.agent.scenarios import Scenario, load_scenario, needs_missing_traces
from raysys.agent.sim import Simulator
from raysys.yamlio import ConfigError, load_model

SHIPPED_FILES = sorted(SHIPPED.glob("*.yaml"))


def test_the_suite_covers_the_required_situations() -> None:
    assert len(SHIPPED_FILES) >= 12
    specs = [load_model(Scenario, f) for f in SHIPPED_FILES]
    kinds = {e.kind for s in specs for e in s.events} | {
        r.kind for s in specs for r in s.random_events
    }
    assert {
        "contention",
        "straggler",
        "node_failure",
        "node_join",
        "stragglers",
        "worker_failures",
    } <= kinds
    assert {s.profile.trace for s in specs} >= {"cifar10", "bert", "imagenet"}
    assert any(s.profile.parametric is not None for s in specs)
    assert len({s.name for s in specs}) == len(specs)


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.stem)
def test_every_shipped_scenario_loads_and_runs(path: Path) -> None:
    if needs_missing_traces(load_model(Scenario, path)):
        pytest.skip("Pollux traces not found (set RAYSYS_TRACES)")
    scenario = load_scenario(path)
    sim = Simulator(scenario, seed=0)
    sim.run_to_end()
    assert sim.finished, "the initial allocation must finish within max_time_s"
    result = run_episode(
        scenario,
        make_policy(
            "goodput", cost_per_worker_second=scenario.spec.objective.cost_per_worker_second
        ),
        seed=0,
    )
    assert result.decisions > 50 and result.score > 0


BROKEN = {
    "bounds": (
        """\
name: broken
profile: {parametric: {a: 0.02, b: 0.001, c: 0.05}}
episode: {samples: 1000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 1, max_workers: 4}
  - name: beta
    batch_share: 64
    workers: 5
    max_workers: 4
nodes:
  - {id: n, cpus: 8}
""",
        ":7: partners.1: need min_workers <= workers <= max_workers",
    ),
    "typo": (
        """\
name: broken
profile: {parametric: {a: 0.02, b: 0.001, c: 0.05}}
episode:
  samples: 1000
  intervall_s: 3
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 1, max_workers: 4}
nodes:
  - {id: n, cpus: 8}
""",
        ":5: episode.intervall_s: unknown key",
    ),
    "event": (
        """\
name: broken
profile: {parametric: {a: 0.02, b: 0.001, c: 0.05}}
episode: {samples: 1000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 1, max_workers: 4}
nodes:
  - {id: n, cpus: 8}
events:
  - {kind: straggler, at: 10, node: n, factor: 2}
  - {kind: straggler, at: 20, node: n, factor: 0.5}
""",
        ":11: events.1.straggler.factor: Input should be greater than 1",
    ),
    "random_factor": (
        """\
name: broken
profile: {parametric: {a: 0.02, b: 0.001, c: 0.05}}
episode: {samples: 1000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 1, max_workers: 4}
nodes:
  - {id: n, cpus: 8}
random_events:
  - {kind: stragglers, rate_per_hour: 10, factor: [0.2, 0.5]}
""",
        ":10: random_events.0.stragglers: factor must be a range [low, high] with "
        "1 < low <= high",
    ),
    "trace": (
        """\
name: broken
profile:
  trace: no-such-trace
episode: {samples: 1000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 1, max_workers: 4}
nodes:
  - {id: n, cpus: 8}
""",
        ":3: profile.trace: trace 'no-such-trace' not found",
    ),
    "capacity": (
        """\
name: broken
profile: {parametric: {a: 0.02, b: 0.001, c: 0.05}}
episode: {samples: 1000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 2, min_workers: 2, max_workers: 4,
     placement: {site: x}}
nodes:
  - {id: n, cpus: 8, labels: {site: y}}
""",
        ":1: <top level>: partner alpha: placement {'site': 'x'} fits 0 workers",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_scenario_names_file_field_and_line(case: str, tmp_path: Path) -> None:
    text, expected = BROKEN[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert f"{path}{expected}" in str(err.value)


def test_traces_folder_can_be_overridden(tmp_path: Path, monkeypatch) -> None:
    from raysys.agent.profile_fit import StepTimeModel, write_profile_csv

    true = StepTimeModel.parametric(0.01, 0.001, 0.05, 0.004, gamma=1.5)
    rows = []
    for placement in ("1", "2", "11", "22", "111", "1111", "4", "44"):
        n, k = sum(map(int, placement)), len(placement)
        for batch in (16, 32, 64, 128):
            compute, sync = true.compute_time(batch), true.sync_time(n, k)
            step = true.combine(compute, sync)
            rows.append((placement, batch, step, step - compute))
    write_profile_csv(rows, tmp_path / "mine" / "placements.csv")
    monkeypatch.setenv("RAYSYS_TRACES", str(tmp_path))
    scenario = tmp_path / "s.yaml"
    scenario.write_text("""\
name: mine
profile: {trace: mine}
episode: {samples: 100000}
objective: {cost_per_worker_second: 0.02}
partners:
  - {name: alpha, batch_share: 64, workers: 2, max_workers: 4}
nodes:
  - {id: n, count: 2, cpus: 2}
""")
    loaded = load_scenario(scenario)
    assert loaded.model.step_time(32, 4, 2) == pytest.approx(true.step_time(32, 4, 2), rel=0.02)
