"""A live run writes its run directory (spec.json, events.jsonl as it goes, summary.json), and
`raysys report` draws its plots and tables from exactly that."""

from __future__ import annotations

import json

from conftest import make_spec

from raysys.report import write_report
from raysys.runner import run_job
from raysys.spec import JobSpec


def test_a_run_writes_events_that_the_report_draws(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=40, beta_workers=2, name="rundir")
    spec["evaluation"] = {"path": two_partner_data["test"], "every_steps": 10}
    spec["chaos"] = [{"at_step": 12, "worker": "beta/1", "kill": True}]
    spec["partners"][1]["workers"]["min"] = 2
    run_dir = tmp_path / "run"
    summary = run_job(JobSpec.model_validate(spec), quiet=True, run_dir=run_dir)

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert {"progress", "evaluation", "chaos", "failure", "rescale"} <= set(kinds), kinds
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 40 and all(e["t"] >= 0 for e in events)
    assert [e["step"] for e in events if e["type"] == "evaluation"] == [10, 20, 30, 40]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == summary["steps"] == 40
    assert json.loads((run_dir / "spec.json").read_text())["name"] == "rundir"

    written = write_report(run_dir)
    html = (run_dir / "report.html").read_text()
    assert any(str(p).endswith("throughput.png") for p in written)
    for path in written:
        assert path.stat().st_size > 0
    final = events[-1]["summary"]
    assert f"{final['held_out']['accuracy']:.2%}" in html
    assert f"{final['partners']['alpha']['samples']:,}" in html
