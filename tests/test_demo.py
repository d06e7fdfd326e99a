"""`make demo`, as the README's quickstart runs it: the Makefile's demo recipe, command by
command, in a scratch directory (so a checkout's own data/, checkpoints/ and runs/ stay as they
are). It starts its own labelled local cluster beside the session's, as a user's would."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_recipe() -> list[list[str]]:
    """The commands under the Makefile's `demo:` target, with $(BIN) this venv's bin/."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        commands.append(shlex.split(line.strip().replace("$(BIN)", str(Path(sys.executable)
                                                                        .parent))))
    return commands


def test_make_demo_trains_and_shows_the_agent_dealing_with_the_straggler(tmp_path):
    recipe = demo_recipe()
    config = recipe[-1][-1]
    assert recipe[-1][1:] == ["run", config]  # the demo's last command trains its config
    (tmp_path / config).parent.mkdir(parents=True)
    shutil.copy(REPO / config, tmp_path / config)
    spec = yaml.safe_load((REPO / config).read_text())
    printed = ""
    for command in recipe:
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, (command, out.stdout[-4000:], out.stderr[-4000:])
        printed += out.stdout

    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["steps"] == spec["steps"]
    assert summary["held_out"]["accuracy"] >= 0.85
    assert set(summary["partners"]) == {"alpha", "beta", "gamma"}
    # The straggler is injected at its step, and the agent acts on it after that step.
    (chaos,) = spec["chaos"]
    decisions = summary["agent"]["decisions"]
    assert summary["agent"]["policy"] == spec["agent"]["policy"]
    assert any(d["step"] >= chaos["at_step"] and "beta" in d["applied"] for d in decisions), \
        "\n".join([*(f"{d['step']}: {d['wanted']} -> {d['applied']}" for d in decisions),
                   printed[-6000:]])
    # What the user sees: progress, the decisions, and the summary with them.
    assert chaos["worker"] in printed and "held-out accuracy" in printed
    assert all(f"agent at step {d['step']}" in printed for d in decisions)
    # The README's next command: a report of that run, with its plots.
    report = subprocess.run([*recipe[-1][:1], "report", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    html = (run_dir / "report.html").read_text()
    assert f"{summary['held_out']['accuracy']:.2%}" in html
    for plot in ("throughput.png", "training.png", "contribution.png"):
        assert (run_dir / plot).stat().st_size > 0
