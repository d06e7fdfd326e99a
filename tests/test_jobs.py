"""Jobs API, end to end: a real local Ray head with the dashboard and token authentication on (as
Ray 2.60 defaults for new local clusters), jobs submitted with `raysys submit` (the CLI, in a
subprocess, authenticating the way Ray clients do) and watched with JobSubmissionClient."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_table

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` in its own process group; SIGTERM to the group stops exactly
    this cluster (never `ray stop`, which would stop every Ray on the host)."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # As if the venv were activated before `ray start`: a job's `python` is the cluster's.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    gcs, dash, metrics = _free_port(), _free_port(), 20000 + os.getpid() % 5000 + 7
    temp_dir = f"/tmp/rayjobs-{os.getpid()}"  # short: Ray's socket paths must stay < 108 bytes
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=4", f"--metrics-export-port={metrics}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}",
         # Ports that default to fixed numbers and that the session cluster's head (same host)
         # already holds: without these the head's job agent never comes up.
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.time() + 180
    while True:  # up when a first job can be submitted (the head's job agent has registered)
        try:
            client = JobSubmissionClient(address, headers=headers)
            client.submit_job(entrypoint="true")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
            time.sleep(1)
    work = tmp_path_factory.mktemp("jobdir")
    shutil.copytree(REPO / "jobs", work / "jobs")
    (work / "data").mkdir()
    for i, name in enumerate(("alpha", "beta")):
        write_table(work / "data" / f"{name}.parquet", 80, 8, 3, seed=i)
    yield {"address": address, "env": env, "client": client, "work": work, "token": token,
           "gcs": f"127.0.0.1:{gcs}"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    # Anything of this cluster that left the process group (Ray starts some processes in new
    # sessions) still names its temp dir on its command line.
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
    shutil.rmtree(temp_dir, ignore_errors=True)


def write_config(work: Path, name: str, steps: int, **extra) -> str:
    spec = {
        "name": name, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "global_batch_size": 16, "steps": steps, "num_classes": 3,
        "partners": [{"name": p, "data": {"path": f"data/{p}.parquet"}, "cpus_per_worker": 0.25,
                      "workers": {"initial": 1, "min": 1, "max": 1}} for p in ("alpha", "beta")],
        # A real agent per job (threshold: no checkpoint to load), so that two jobs at once
        # also means two agents at once; min = max leaves it nothing to change.
        "agent": {"policy": "threshold", "interval_s": 1}, "runtime": {"steps_per_call": 5},
        **extra,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path.name


def raysys_submit(head, config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "raysys"), "submit", config, "--address", head["address"], "--working-dir",
         str(head["work"]), *args], env=head["env"], capture_output=True, text=True,
        timeout=300, cwd=head["work"])


def wait_status(client, job_id: str, timeout_s: float = 180) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s")


def test_the_cluster_refuses_clients_without_the_token(head):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)auth|401|token"):
        JobSubmissionClient(head["address"], headers={"Authorization": "Bearer wrong"}
                            ).list_jobs()


def test_broken_config_fails_with_the_validation_message(head):
    from ray.job_submission import JobSubmissionClient

    work = head["work"]
    bad = work / "broken.yaml"
    bad.write_text(Path(work / write_config(work, "broken", steps=5)).read_text()
                   .replace("global_batch_size: 16", "global_batch_size: -3"))
    # `raysys submit` validates first and refuses it without touching the cluster ...
    refused = raysys_submit(head, "broken.yaml")
    assert refused.returncode == 2 and "global_batch_size" in refused.stderr
    # ... so submit it the raw way, with `ray job submit` as the README shows: the job's driver
    # refuses it, and the job FAILED says why.
    raw = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir",
         str(work), "--no-wait", "--", "python", "jobs/train.py", "--config", "broken.yaml"],
        env=head["env"], capture_output=True, text=True, timeout=120, cwd=work)
    assert raw.returncode == 0, raw.stdout + raw.stderr
    job_id = re.search(r"Job '([^']+)' submitted", raw.stdout + raw.stderr).group(1)
    client = JobSubmissionClient(head["address"],
                                 headers={"Authorization": f"Bearer {head['token']}"})
    assert wait_status(client, job_id) == "FAILED"
    logs = client.get_job_logs(job_id)
    assert "global_batch_size" in logs and "greater than or equal to 1" in logs


def test_two_jobs_at_once_and_ray_job_stop_leaves_nothing_behind(head):
    """A long job runs while `raysys submit --wait` runs a short one to the end beside it: each
    has its own controller and agent, the short one SUCCEEDS with its summary in its logs, the
    long one goes on with the same workers, and `ray job stop` then leaves no actor or
    placement group of either behind."""
    client = head["client"]
    # The long job only has to stay up: a slow emulated link (each exchange waits 0.2 s) keeps it
    # from spinning on the host's two cores while the short job starts and runs.
    long_id = raysys_submit(head, write_config(
        head["work"], "long", steps=100_000,
        runtime={"steps_per_call": 5, "cross_partner_delay_ms": 200})).stdout.strip()
    long_actors = {"raysys:long:controller", "raysys:long:agent", "raysys:long:alpha:0",
                   "raysys:long:beta:0"}
    deadline = time.time() + 180
    while not long_actors <= set(_alive_raysys_actors(head)):
        assert time.time() < deadline, _alive_raysys_actors(head)
        time.sleep(1)
    short = raysys_submit(head, write_config(head["work"], "short", steps=40), "--wait",
                          "--timeout", "240")
    assert short.returncode == 0, short.stdout + short.stderr
    short_id = short.stdout.splitlines()[0].strip()
    assert str(client.get_job_status(short_id).value) == "SUCCEEDED"
    assert str(client.get_job_status(long_id).value) == "RUNNING"  # undisturbed by the other
    logs = client.get_job_logs(short_id)
    assert "raysys job 'short' finished" in logs and "raysys:long" not in logs
    assert "partner alpha" in logs and "partner beta" in logs  # the summary's ledger rows
    assert "agent policy" in logs and "threshold" in logs  # the short job's own agent
    assert logs in short.stdout  # --wait printed them
    alive = _alive_raysys_actors(head)
    # The long job's controller, agent and workers are the very ones from before: same names
    # (a replaced worker would get a new index), nothing of the short job's left.
    assert long_actors == {a for a in alive if a.startswith("raysys:long:")}, alive
    # `raysys status` from another client, through the token-authenticated GCS.
    status = subprocess.run([str(BIN / "raysys"), "status", "long", "--address", head["gcs"]],
                            env=head["env"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "alpha" in status.stdout and "beta" in status.stdout
    assert not any(a.startswith("raysys:short:") for a in alive), alive

    client.stop_job(long_id)
    assert wait_status(client, long_id) == "STOPPED"
    deadline = time.time() + 60
    while _alive_raysys_actors(head) or _alive_placement_groups(head):
        assert time.time() < deadline, (_alive_raysys_actors(head),
                                        _alive_placement_groups(head))
        time.sleep(1)


def _state(head, kind: str) -> list[dict]:
    """`ray list KIND` on the jobs cluster, through its state API, as dicts."""
    args = [str(BIN / "ray"), "list", kind, "--address", head["address"], "--format", "json",
            "--limit", "1000"]
    out = subprocess.run(args, env=head["env"], capture_output=True, text=True, timeout=60,
                         check=True)
    start = out.stdout.find("[")  # a warning may precede the JSON
    rows = json.loads(out.stdout[start:]) if start >= 0 else []
    return [r for r in rows if isinstance(r, dict)]


def _alive_raysys_actors(head) -> list[str]:
    return [a.get("name") or "" for a in _state(head, "actors")
            if (a.get("name") or "").startswith("raysys:") and a.get("state") != "DEAD"]


def _alive_placement_groups(head) -> list[str]:
    return [pg["placement_group_id"] for pg in _state(head, "placement-groups")
            if pg.get("state") not in ("REMOVED",)]
