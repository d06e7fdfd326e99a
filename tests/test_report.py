"""`raysys report`: HTML and PNGs from a synthetic events.jsonl. No Ray: the record is written here
as the driver would write it (see RunRecord in raysys/control/events.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from raysys.report import ReportError, RunDirError, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB = "digits-demo"
BATCH = {"alpha": 64, "beta": 32}
STEPS = 60
BUDGET_STEP = 40  # beta's privacy budget is spent here; it is skipped afterwards
DECISION = "scale alpha to 3 workers"


def synthetic_events(accuracy: float = 0.9312, dp: bool = True, finish: bool = True) -> list:
    ev = [{"type": "start", "t": 2.0, "step": 0, "job": JOB, "steps": STEPS,
           "partners": {"alpha": 2, "beta": 2}, "batch_per_step": BATCH,
           "aggregation": "allreduce"}]
    t, alpha = 2.0, 2
    for step in range(2, STEPS + 1, 2):  # 30 progress events
        t += 0.9 if step <= 30 else 1.6  # beta slowed 3x at step 30
        if step == 16:
            ev.append({"type": "decision", "t": t, "step": step, "decision": DECISION})
        if step == 20:
            alpha = 3
            ev.append({"type": "rescale", "t": t, "step": step, "kind": "scale_up",
                       "detail": "alpha 2 -> 3", "latency_s": 1.84})
        if step == 30:
            ev.append({"type": "chaos", "t": t, "step": step, "worker": "beta/1",
                       "fault": "slow 3x"})
        eps = {"beta": round(0.05 * min(step, BUDGET_STEP), 3)} if dp else {}
        ev.append({"type": "progress", "t": t, "step": step, "workers": {"alpha": alpha,
                   "beta": 2}, "samples_per_s": 100.0 + 3 * step if step <= 30 else 80.0,
                   "loss": 2.3 * 0.96 ** step, "epsilon": eps})
        if step % 20 == 0:
            ev.append({"type": "evaluation", "t": t + 0.1, "step": step, "loss": 2.0 - step / 40,
                       "accuracy": 0.3 + step / 100, "rows": 360, "seconds": 0.12})
    if not finish:
        return ev
    ledger = {
        "alpha": {"samples": 64 * STEPS, "steps_participated": STEPS, "skipped_steps": 0,
                  "failures": 0, "compute_s": 41.5, "bytes_exchanged": 52_428_800,
                  "bytes_within_partner": 0, "epsilon": None, "budget_spent_at_step": None},
        "beta": {"samples": 32 * BUDGET_STEP, "steps_participated": BUDGET_STEP,
                 "skipped_steps": STEPS - BUDGET_STEP, "failures": 0, "compute_s": 30.25,
                 "bytes_exchanged": 34_952_533, "bytes_within_partner": 0,
                 "epsilon": 2.0 if dp else None,
                 "budget_spent_at_step": BUDGET_STEP if dp else None},
    }
    summary = {"job": JOB, "state": "finished", "steps": STEPS, "stop_reason": "steps",
               "resumed_from_step": None, "final_loss": 0.2154,
               "held_out": {"loss": 0.4411, "accuracy": accuracy, "rows": 360},
               "partners": ledger, "batch_per_step": BATCH, "workers": {"alpha": 3, "beta": 2},
               "rescales": 1, "wall_time_s": 80.4, "training_time_s": 75.0,
               "first_step_at_s": 2.5, "worker_seconds": 310.0, "samples_per_s": 123.4,
               "data_warnings": []}
    ev.append({"type": "finish", "t": t + 1.0, "step": STEPS, "summary": summary})
    return ev


def write_run(run_dir: Path, events: list, extra_lines: tuple[str, ...] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(e) for e in events] + list(extra_lines)
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_writes_pngs_and_html_from_the_record(tmp_path):
    run = write_run(tmp_path / "run", synthetic_events())
    paths = write_report(run)
    names = [p.name for p in paths]
    assert names == ["report.html", "throughput.png", "training.png", "contribution.png",
                     "epsilon.png"]
    for path in paths[1:]:
        assert_png(path)
    page = (run / "report.html").read_text()
    assert f"raysys report: {JOB}" in page
    assert "93.12%" in page
    assert "3,840" in page and "1,280" in page  # each partner's samples from the ledger
    assert DECISION in page
    assert "scale_up: alpha 2 -&gt; 3; first step at the new size after 1.84 s" in page
    assert "slow 3x beta/1" in page
    for name in names[1:]:
        assert f'src="{name}"' in page
    assert "not finished" not in page


@pytest.mark.parametrize("accuracy, shown", [(0.9312, "93.12%"), (0.5, "50.00%")])
def test_numbers_come_from_the_run(tmp_path, accuracy, shown):
    run = write_run(tmp_path, synthetic_events(accuracy=accuracy))
    write_report(run)
    page = (run / "report.html").read_text()
    other = {"93.12%", "50.00%"} - {shown}
    assert shown in page and other.pop() not in page


def test_no_epsilon_plot_without_dp(tmp_path):
    run = write_run(tmp_path, synthetic_events(dp=False))
    names = [p.name for p in write_report(run)]
    assert "epsilon.png" not in names and not (run / "epsilon.png").exists()
    assert "epsilon.png" not in (run / "report.html").read_text()


def test_truncated_run_still_renders(tmp_path):
    events = synthetic_events(finish=False)
    run = write_run(tmp_path, events[: len(events) // 2])  # crashed half-way
    names = [p.name for p in write_report(run)]
    assert names == ["report.html", "throughput.png", "training.png", "epsilon.png"]
    for name in names[1:]:
        assert_png(run / name)
    page = (run / "report.html").read_text()
    assert JOB in page and "not finished" in page and DECISION in page


def test_summary_json_is_preferred_and_unknown_events_are_ignored(tmp_path):
    events = synthetic_events()
    summary = dict(events[-1]["summary"], agent={"policy": "goodput", "warnings": ["w<1>"],
                                                 "decisions": [{"step": 16, "applied": "x"}]})
    run = write_run(tmp_path, events, ('{"type": "future_thing", "whatever": [1, 2]}',))
    (run / "summary.json").write_text(json.dumps(summary))
    write_report(run)
    page = (run / "report.html").read_text()
    assert "goodput, 1 decisions applied" in page and "w&lt;1&gt;" in page


def test_text_is_escaped(tmp_path):
    events = synthetic_events()
    events[0]["job"] = events[-1]["summary"]["job"] = "<b>evil</b>"
    run = write_run(tmp_path, events)
    write_report(run)
    page = (run / "report.html").read_text()
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page


@pytest.mark.parametrize("bad", ['{"type": "progress", "t": 1.0,', "[1, 2]", '{"t": 1, "step": 2}',
                                 '{"type": "chaos", "t": "soon", "step": 1}'])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    events = synthetic_events()
    run = write_run(tmp_path, events[:4], (bad,))
    with pytest.raises(ReportError, match=r"events\.jsonl line 5: "):
        write_report(run)


def test_missing_run_dir_or_events(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        write_report(tmp_path / "nope")
    with pytest.raises(RunDirError, match=r"events\.jsonl: not found"):
        write_report(tmp_path)


def raysys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysys.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_report(tmp_path):
    run = write_run(tmp_path / "run", synthetic_events())
    done = raysys("report", str(run))
    assert done.returncode == 0, done.stderr
    for name in ("report.html", "throughput.png", "training.png", "contribution.png",
                 "epsilon.png"):
        assert f"wrote {run / name}" in done.stdout
    missing = raysys("report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such run directory" in missing.stderr
    write_run(run, synthetic_events()[:3], ("not json",))
    bad = raysys("report", str(run))
    assert bad.returncode == 1 and "events.jsonl line 4" in bad.stderr
