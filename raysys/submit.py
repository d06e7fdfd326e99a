"""`raysys submit CONFIG`: run a job on a cluster through Ray's Jobs API (what `ray job submit`
does, with the runtime_env a raysys job needs), return its job id, optionally wait for it.

The spec is validated here first, so a bad file costs no cluster time; the job's driver is
jobs/train.py, which validates again against the live cluster (placement labels) and streams
the same progress and summary as `raysys run` into the job's logs. The working directory (the
repository by default) is uploaded to the cluster, minus virtual environments, run outputs and
checkpoints, so relative paths and jobs/train.py resolve there as they do here. Ray honours
.gitignore in the upload, so the repository's data/ does not travel: partner data belongs on the
partner's own nodes (`data.on_partner_nodes: true`, docs/deploy.md), never in an upload to the head.

Token authentication (on by default for new local clusters in Ray 2.60) is Ray's business: the
client reads RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raysys.spec import load_spec

# Never uploaded: environments, outputs, caches (the upload is capped at a few hundred MiB).
EXCLUDES = [".venv", ".venv-*", ".git", "runs", "checkpoints", "**/__pycache__",
            ".pytest_cache", ".ruff_cache", "bench/results"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90  # how long a fresh cluster may take to accept jobs


def dashboard_address(address: str | None) -> str:
    """The Jobs API lives on the dashboard (default port 8265)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or \
        os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    return address if "://" in address else f"http://{address}"


def submit(config: str, address: str | None = None, working_dir: str = ".",
           job_id: str | None = None) -> tuple[object, str]:
    """Validate `config`, submit jobs/train.py with it; returns (client, submission id)."""
    from ray.job_submission import JobSubmissionClient

    spec = load_spec(config)
    root = Path(working_dir).resolve()
    rel = Path(config).resolve()
    try:
        rel = rel.relative_to(root)
    except ValueError:
        raise ValueError(f"{config}: the config must lie inside the working directory {root}, "
                         "which is what the cluster receives") from None
    client = JobSubmissionClient(dashboard_address(address))
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            submission_id = client.submit_job(
                entrypoint=f"python jobs/train.py --config {rel.as_posix()}",
                submission_id=job_id,
                runtime_env={"working_dir": str(root), "excludes": EXCLUDES,
                             "env_vars": {"OMP_NUM_THREADS": "1"}},
                metadata={"raysys_job": spec.name},
            )
            return client, submission_id
        except RuntimeError as exc:
            # Right after `ray start` the dashboard answers before a node's job agent has
            # registered; Ray says "try again later", so we do, for a while.
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def wait(client, submission_id: str, timeout_s: float | None = None,
         poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or the timeout); returns the status."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL or (deadline is not None and time.time() > deadline):
            return status
        time.sleep(poll_s)
