"""Utility of differential privacy on the digits demo: held-out accuracy at several epsilons.

Runs the live three-partner digits job (jobs/configs/digits.yaml without agent or injected
faults) once without DP and once per target epsilon with every partner under DP (noise chosen
by Opacus' RDP accountant so the planned steps spend exactly the budget, delta 1e-5), in one
local cluster, and prints held-out accuracy and each partner's epsilon as spent.

    .venv/bin/python bench/dp_digits.py [--epsilons 1,3,7] [--steps 300] [--hidden 64] [--lr 1.0]
        [--momentum 0] [--global-batch 384]

Reference point (Opacus' MNIST example): 97% at epsilon 7 vs 99% non-private.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import yaml  # noqa: E402

from raysys.data.demo import write_digits_demo  # noqa: E402
from raysys.runner import attached, run_job  # noqa: E402
from raysys.spec import JobSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def job(data: Path, storage: str, args: argparse.Namespace, name: str,
        dp: dict | None) -> JobSpec:
    spec = yaml.safe_load((ROOT / "jobs/configs/digits.yaml").read_text())
    spec.update(name=name, steps=args.steps, chaos=[], agent={"policy": "static"},
                checkpoint={"storage_path": storage, "every_steps": 0})
    # DP noise grows with the square root of the parameter count while the clipped signal does
    # not: the private runs (and their non-private peer) use a smaller MLP than the demo's.
    spec["model"]["kwargs"]["hidden"] = [int(h) for h in args.hidden.split(",")]
    spec["optimizer"].update(lr=args.lr, momentum=args.momentum)
    spec["global_batch_size"] = args.global_batch
    spec["evaluation"]["path"] = str(data / "test.parquet")
    for p in spec["partners"]:
        p["data"]["path"] = str(data / f"{p['name']}.parquet")
        p["workers"] = {"initial": 1, "min": 1, "max": 1}
        if dp is not None:
            p["privacy"] = {"dp": dp}
    return JobSpec.model_validate(spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilons", default="1,3,7")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--hidden", default="64", help="MLP hidden widths, e.g. 64 or 512,256")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--global-batch", type=int, default=384)
    ap.add_argument("--out", default=str(ROOT / "bench/results/dp_digits.json"))
    args = ap.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        write_digits_demo(data)
        first = job(data, tmp, args, "dp-none", None)
        with attached(first, None):
            for eps in [None, *epsilons]:
                dp = None if eps is None else {"target_epsilon": eps, "max_grad_norm": args.clip,
                                               "delta": 1e-5}
                name = "dp-none" if eps is None else f"dp-eps{eps:g}".replace(".", "p")
                summary = run_job(job(data, tmp, args, name, dp), quiet=True)
                spent = {p: e["epsilon"] for p, e in summary["partners"].items()}
                rows.append({"target_epsilon": eps, "accuracy": summary["held_out"]["accuracy"],
                             "loss": summary["held_out"]["loss"], "epsilon_spent": spent,
                             "steps": summary["steps"], "wall_s": summary["wall_time_s"]})
                acc = summary["held_out"]["accuracy"]
                label = "non-private" if eps is None else f"epsilon {eps:g}"
                worst = "" if eps is None else f" (spent at most {max(spent.values()):.2f})"
                print(f"{label:>14}: held-out accuracy {acc:.3f}{worst}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "clip": args.clip,
                                          "hidden": args.hidden, "lr": args.lr,
                                          "momentum": args.momentum,
                                          "global_batch": args.global_batch,
                                          "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
