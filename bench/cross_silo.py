"""Cross-silo: time to a target accuracy for allreduce vs local SGD (FedAvg) over a slow link,
and raysys' FedAvg against Flower's simulation engine on the same data, model and samples.

Data: scikit-learn's digits split Dirichlet(0.1) over 4 partners (raysys.data.demo), one worker
each, mlp(64 -> 128 -> 64 -> 10), SGD lr 0.1, global batch 64, 1500 steps (~67 epochs).

1. Slow link: `runtime.cross_partner_delay_ms` (a testing aid) delays every exchange that
   crosses partners by DELAY_MS: each step's all-reduce under allreduce, each fusion under
   local_sgd. Runs: allreduce, local_sgd (fedavg) with H in {1, 5, 20}, and fedavg with server
   momentum 0.5 (fedavgm) with H in {5, 10}. Held-out accuracy every
   EVAL_EVERY steps; time to target = training time until the first evaluation at or above
   TARGET, evaluation time itself left out. Bytes = what crossed partners (the ledger's
   bytes_exchanged, summed over partners).
2. Flower: raysys local_sgd H = 5 with no delay against bench/flower_fedavg.py (Flower's
   simulation engine, FedAvg, the same samples per step; it runs in .venv-flwr, whose Ray pin
   differs from ours) for the same number of rounds: time per round and final accuracy.
   Skipped with a note when .venv-flwr is missing (see docs/benchmarks.md for its set-up).

    .venv/bin/python bench/cross_silo.py [--steps 1500] [--delay-ms 50] [--skip-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402
from common import machine_line, print_table  # noqa: E402

from raysys.control.controller import RemoteJobController  # noqa: E402
from raysys.data.demo import write_digits_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTNERS = ["p0", "p1", "p2", "p3"]
TARGET = 0.93
EVAL_EVERY = 25
SERVER_MOMENTUM = 0.5  # fedavgm runs
BATCH, LR, HIDDEN, SEED = 64, 0.1, [128, 64], 0


def job_spec(data: dict, name: str, steps: int, delay_ms: float, local_steps: int | None,
             storage: str, every: int | None = EVAL_EVERY, momentum: float = 0.0) -> dict:
    spec = {
        "name": name, "model": {"name": "mlp", "kwargs": {"hidden": HIDDEN}},
        "optimizer": {"name": "sgd", "lr": LR}, "global_batch_size": BATCH, "steps": steps,
        "seed": SEED, "num_classes": 10,
        "partners": [{"name": p, "data": {"path": str(data[p])}, "cpus_per_worker": 0.25,
                      "workers": {"initial": 1, "min": 1, "max": 1}} for p in PARTNERS],
        "evaluation": {"path": str(data["test"]), "every_steps": every},
        "checkpoint": {"storage_path": storage},
        "agent": {"policy": "static"},
        "runtime": {"cross_partner_delay_ms": delay_ms},
    }
    if local_steps is not None:
        spec["aggregation"] = {"mode": "local_sgd", "local_steps": local_steps}
        if momentum:
            spec["aggregation"].update(server_optimizer="fedavgm", server_momentum=momentum)
    return spec


def run_job(spec: dict) -> dict:
    controller = RemoteJobController.remote(spec)
    summary = ray.get(controller.run.remote())
    evals = ray.get(controller.evaluations.remote())
    ray.kill(controller)
    start = summary["first_step_at_s"]
    curve, eval_s = [], 0.0
    for e in evals:  # training time at each evaluation, evaluations before it left out
        curve.append((e["step"], e["t"] - start - eval_s, e["accuracy"]))
        eval_s += e["seconds"]
    to_target = next(((s, t) for s, t, a in curve if a >= TARGET), (None, None))
    return {"name": spec["name"], "training_time_s": summary["training_time_s"] - eval_s,
            "final_accuracy": summary["held_out"]["accuracy"],
            "steps_to_target": to_target[0], "time_to_target_s": to_target[1],
            "bytes_across": sum(p["bytes_exchanged"] for p in summary["partners"].values()),
            "curve": curve}


def run_flower(data_dir: Path, rounds: int, local_steps: int) -> dict | None:
    python = ROOT / ".venv-flwr" / "bin" / "python"
    if not python.exists():
        print("Flower: .venv-flwr missing, comparison skipped", flush=True)
        return None
    out = data_dir / "flower.json"
    cmd = [str(python), str(ROOT / "bench" / "flower_fedavg.py"), "--data", str(data_dir),
           "--partners", ",".join(PARTNERS), "--rounds", str(rounds), "--local-steps",
           str(local_steps), "--global-batch", str(BATCH), "--lr", str(LR),
           "--hidden", ",".join(map(str, HIDDEN)), "--seed", str(SEED), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "VIRTUAL"))}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--local-steps", default="1,5,20")
    parser.add_argument("--momentum-steps", default="5,10",
                        help="H values to run with server momentum (fedavgm) as well")
    parser.add_argument("--skip-flower", action="store_true")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "digits"
        data = write_digits_demo(data_dir, PARTNERS, alpha=0.1, seed=SEED)
        storage = str(Path(tmp) / "ckpt")
        ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False)
        try:
            runs = [("allreduce", None, 0.0)] + [
                (f"fedavg-h{h}", int(h), 0.0) for h in args.local_steps.split(",")] + [
                (f"fedavgm-h{h}", int(h), SERVER_MOMENTUM) for h in args.momentum_steps.split(",")
                if h]
            for name, h, momentum in runs:
                t0 = time.time()
                results.append(run_job(job_spec(data, name, args.steps, args.delay_ms, h,
                                                storage, momentum=momentum)))
                print(f"{name}: {time.time() - t0:.0f} s", flush=True)
            # Flower comparison: no emulated delay, evaluation only at the end.
            fed_h = 5
            raysys_fed = run_job(job_spec(data, "raysys-fedavg", args.steps, 0.0, fed_h,
                                          storage, every=None))
        finally:
            ray.shutdown()
        flower = None if args.skip_flower else run_flower(data_dir, args.steps // fed_h, fed_h)

    base = results[0]
    print(f"\nTime to {TARGET:.0%} held-out accuracy, {args.delay_ms:g} ms per cross-partner "
          f"exchange, {args.steps} steps:\n")
    rows = []
    for r in results:
        ttt = r["time_to_target_s"]
        speedup = (base["time_to_target_s"] / ttt) if ttt and base["time_to_target_s"] else None
        rows.append([r["name"], f"{r['training_time_s']:.1f}",
                     "not reached" if ttt is None else f"{ttt:.1f} (step {r['steps_to_target']})",
                     "-" if speedup is None else f"{speedup:.2f}x",
                     f"{r['final_accuracy']:.3f}",
                     f"{r['final_accuracy'] - base['final_accuracy']:+.3f}",
                     f"{r['bytes_across'] / 2**20:.1f}"])
    print_table(["mode", "train s", "time to target s", "vs allreduce", "final acc",
                 "acc - allreduce", "MiB across partners"], rows)
    rounds = args.steps // fed_h
    print(f"\nraysys vs Flower, FedAvg H={fed_h}, {rounds} rounds, no delay:\n")
    rows = [["raysys", f"{raysys_fed['training_time_s'] / rounds * 1000:.1f}", "-",
             f"{raysys_fed['final_accuracy']:.3f}"]]
    if flower:
        per_round = sum(flower["round_s"]) / len(flower["round_s"])
        rows.append([f"Flower {flower['flwr']}", f"{per_round * 1000:.1f}",
                     f"{flower['startup_s']:.1f}", f"{flower['final_accuracy']:.3f}"])
        ratio = per_round / (raysys_fed["training_time_s"] / rounds)
        print_table(["system", "ms per round", "start-up s", "final acc"], rows)
        print(f"\nraysys is {ratio:.1f}x faster per round")
    else:
        print_table(["system", "ms per round", "start-up s", "final acc"], rows)
    out = ROOT / "bench" / "results" / "cross_silo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": results, "raysys_fedavg": raysys_fed, "flower": flower},
                              indent=1))
    print(f"\nwrote {out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
