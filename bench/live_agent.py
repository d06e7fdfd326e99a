"""End-to-end: the digits demo with a persistent straggler and a capacity change at fixed times, run
under each policy in the same session. Prints time to finish, the objective score and ratios;
writes bench/results/live_agent.json and docs/img/live_agent.png (workers and throughput over time).

    .venv/bin/python bench/live_agent.py [--policies static,threshold,goodput,rl] [--steps N]
        [--global-batch N] [--straggler-step N]

Score = training time + LAMBDA * worker-seconds (docs/agent.md's objective, measured live).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from raysys.agent.actor import RemoteAgentActor  # noqa: E402
from raysys.agent.policies import available_policies  # noqa: E402
from raysys.control.controller import RemoteJobController  # noqa: E402
from raysys.data.demo import write_digits_demo  # noqa: E402

# -- the experiment, fixed for every policy ------------------------------------------------------
# A global batch of 960 makes a step compute-bound (~25 ms of compute per worker against ~10 ms
# of synchronisation), so a 3x straggler halves the job's throughput, as it would on real
# hardware. At 96 a step was mostly synchronisation and the straggler cost a few ms of it.
STEPS = 500
GLOBAL_BATCH = 960
STRAGGLER_STEP = 100  # beta/1 is 3x slower from this step to the end
# A second node labelled partner=alpha joins this long after the first training step, so it lands
# mid-job whatever the host's speed (25 s after the driver started missed the job on a fast one).
CAPACITY_AFTER_S = 6.0
LAMBDA = 0.01  # cost of one worker-second against one second of waiting
INTERVAL_S = 2.0
ROOT = Path(__file__).resolve().parents[1]


def job_spec(data: dict, policy: str, storage: str, steps: int, global_batch: int,
             straggler: dict) -> dict:
    partner = {"workers": {"initial": 1, "min": 1, "max": 3}, "cpus_per_worker": 0.5}
    return {
        "name": f"live-{policy}",
        "model": {"name": "mlp", "kwargs": {"hidden": [512, 256]}},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "global_batch_size": global_batch, "steps": steps, "seed": 0, "num_classes": 10,
        "partners": [  # beta starts with two workers: one of them becomes the straggler
            {"name": "alpha", "data": {"path": str(data["alpha"])},
             "placement": {"partner": "alpha"}, **partner},
            {"name": "beta", "data": {"path": str(data["beta"])}, "placement": {"partner": "beta"},
             **{**partner, "workers": {"initial": 2, "min": 1, "max": 3}}},
            {"name": "gamma", "data": {"path": str(data["gamma"])},
             "placement": {"partner": "gamma"}, **partner},
        ],
        "checkpoint": {"storage_path": storage, "every_steps": 0},
        "agent": {"policy": policy, "interval_s": INTERVAL_S, "cooldown_s": 2 * INTERVAL_S,
                  "cost_per_worker_second": LAMBDA},
        "chaos": [straggler],
    }


def straggler(args: argparse.Namespace) -> dict:
    return {"at_step": args.straggler_step, "worker": "beta/1", "slow": 3.0}


def run_one(policy: str, data: dict, storage: str, args: argparse.Namespace) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # beta runs on two machines, so a straggler of beta's can be replaced on the other one.
    for p in ("alpha", "beta", "beta", "gamma"):
        cluster.add_node(num_cpus=2, labels={"partner": p})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        spec = job_spec(data, policy, storage, args.steps, args.global_batch,
                        straggler(args))
        controller = RemoteJobController.remote(spec)
        done = controller.run.remote()
        agent = RemoteAgentActor.remote(controller, spec) if policy != "static" else None
        capacity_at = add_capacity_mid_job(cluster, controller, done)
        if capacity_at is not None:
            print(f"{policy}: added an alpha node at job time {capacity_at:.1f} s", flush=True)
        summary = ray.get(done)
        history = ray.get(controller.history.remote())
        decisions = ray.get(agent.wait.remote(30))["decisions"] if agent else []
    finally:
        ray.shutdown()
        cluster.shutdown()
    score = summary["training_time_s"] + LAMBDA * summary["worker_seconds"]
    return {"policy": policy, "training_time_s": summary["training_time_s"],
            "worker_seconds": summary["worker_seconds"], "score": score,
            "final_loss": summary["final_loss"], "held_out": summary["held_out"],
            "decisions": [f"step {d['step']}: {d['applied']}" for d in decisions],
            "history": history, "capacity_at_s": capacity_at}


def add_capacity_mid_job(cluster: Cluster, controller, done: ray.ObjectRef) -> float | None:
    """Add the alpha node CAPACITY_AFTER_S after the first step; returns the job time then
    (as in the controller's history), or None if the job ended first. Ray's add_node installs
    signal handlers, so it must run here, in the main thread."""
    first_step_at = None
    while not ray.wait([done], timeout=0.1)[0]:
        progress = ray.get(controller.progress.remote())
        if first_step_at is None and progress["step"] >= 1:
            first_step_at = time.time()
        if first_step_at is not None and time.time() - first_step_at >= CAPACITY_AFTER_S:
            cluster.add_node(num_cpus=2, labels={"partner": "alpha"})
            return ray.get(controller.progress.remote())["elapsed_s"]
    return None


def plot(results: list[dict], path: Path, chaos: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_t) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in results:
        t = [h[0] for h in r["history"]]
        ax_w.step(t, [h[2] for h in r["history"]], where="post", label=r["policy"])
        line, = ax_t.plot(t, [h[3] for h in r["history"]], label=r["policy"])
        if r.get("capacity_at_s") is not None:  # when this policy's run got the alpha node
            ax_w.axvline(r["capacity_at_s"], color=line.get_color(), ls=":", lw=1)
    ax_w.set_ylabel("live workers")
    ax_t.set_ylabel("samples/s")
    ax_t.set_xlabel("job time (s)")
    ax_w.legend(loc="upper left")
    ax_w.set_title(f"digits, straggler {chaos['worker']} x{chaos['slow']:g} from step "
                   f"{chaos['at_step']}, alpha node added {CAPACITY_AFTER_S:g} s after the "
                   "first step (dotted)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default="static,threshold,goodput,rl")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--straggler-step", type=int, default=STRAGGLER_STEP)
    args = parser.parse_args()
    known = set(available_policies())
    policies = [p for p in args.policies.split(",") if p in known]
    skipped = [p for p in args.policies.split(",") if p not in known]
    if skipped:
        print(f"skipping unknown policies: {skipped}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_demo(Path(tmp) / "digits")
        for policy in policies:
            t0 = time.time()
            results.append(run_one(policy, data, str(Path(tmp) / "ckpt"), args))
            print(f"{policy}: done in {time.time() - t0:.0f} s", flush=True)
    static = next((r for r in results if r["policy"] == "static"), None)
    heuristics = [r for r in results if r["policy"] in ("threshold", "goodput")]
    best_heuristic = min((r["score"] for r in heuristics), default=None)
    print(f"\n{'policy':<10} {'train s':>8} {'worker-s':>9} {'score':>8} {'speed-up':>9} "
          f"{'score/best heuristic':>21}  held-out acc")
    for r in results:
        speedup = static["training_time_s"] / r["training_time_s"] if static else float("nan")
        vs_best = r["score"] / best_heuristic if best_heuristic else float("nan")
        acc = r["held_out"]["accuracy"] if r["held_out"] else float("nan")
        print(f"{r['policy']:<10} {r['training_time_s']:8.1f} {r['worker_seconds']:9.1f} "
              f"{r['score']:8.1f} {speedup:8.2f}x {vs_best:21.3f}  {acc:.3f}")
        for d in r["decisions"]:
            print(f"    {d}")
    out = ROOT / "bench" / "results" / "live_agent.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, ROOT / "docs" / "img" / "live_agent.png", straggler(args))
    print(f"\nwrote {out} and docs/img/live_agent.png")


if __name__ == "__main__":
    main()
