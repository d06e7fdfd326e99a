"""FedAvg with Flower's simulation engine on exactly what raysys' local SGD trains on.

A peer for comparing raysys (aggregation: local_sgd, server_optimizer fedavg) with Flower in the
same run. Needs its own venv (flwr pins another Ray): .venv-flwr/bin/python bench/flower_fedavg.py
--data DIR --partners p0,p1,p2,p3 --rounds R --local-steps H --global-batch B --lr LR
--hidden 128,64 --seed S --json OUT.json [--dump-params]

How it matches raysys (raysys.train.reference.reference_local_sgd computes the same numbers):
- model: raysys.models.build_model("mlp", {"hidden": ...}, features, 10, seed), so the same
  initial parameters; torch SGD(lr, momentum 0, weight decay 0), fresh each round; one thread.
- rows: b_p = partner_batch_sizes(rows of every partner, B)[p]; in round r (0-based) partner p's
  client takes H steps s = r*H .. r*H+H-1 on rows step_indices(seed, p, rows_p, b_p, s) with the
  mean cross-entropy (raysys' summed loss / the step's samples: the same for one partner).
- fusion: clients return their parameters and num-examples = b_p * H; Flower's FedAvg
  (flwr.serverapp.strategy) averages them weighted by it, which is raysys' fedavg at server_lr 1:
  w + sum_p n_p (w_p - w) / sum_p n_p. Every client trains every round. Only the Ray-free
  modules raysys.models and raysys.data.sampler are imported.

Measures: startup_s, from calling run_simulation until every virtual client answered a warm-up
query (Ray and the actors up, rows loaded, model and optimizer built: what a raysys worker does
before its first round); round_s[r], from the end of the centralized evaluation before round r
to the start of the one after it (sampling, messages, H local steps on every client, aggregation;
Flower's engine polls for messages every 0.1 s, which sets the floor); client_train_s[r], the
slowest client's time in its train handler; accuracy[r] on test.parquet after round r; wall_s,
the whole run_simulation call (start-up and shutdown included).
"""

# ruff: noqa: E402  (the environment and sys.path are set up before the imports)
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here; keep it off anyway
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for raysys

import flwr
import numpy as np
import pyarrow.parquet as pq
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.app import RecordDict as Rec
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

from raysys.data.sampler import partner_batch_sizes, step_indices
from raysys.models import build_model

LABEL = "label"
_tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per process: survives in each actor
_models: dict[tuple, nn.Module] = {}
S: dict = {"cold": 0}  # driver: settings and measurements; actor: table loads since warm-up


def load_table(path: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 features (every column but the label, in file order, as raysys) and int64 labels."""
    if path not in _tables:
        S["cold"] += 1
        t = pq.read_table(path)
        cols = [t.column(n).to_numpy().astype(np.float32) for n in t.column_names if n != LABEL]
        _tables[path] = (np.stack(cols, axis=1), t.column(LABEL).to_numpy().astype(np.int64))
    return _tables[path]


def model_for(c: ConfigRecord) -> nn.Module:
    key = (tuple(c["hidden"]), int(c["features"]), int(c["seed"]))
    if key not in _models:
        _models[key] = build_model("mlp", {"hidden": list(key[0])}, key[1], 10, key[2])
    return _models[key]


def _client(msg: Message, ctx: Context) -> tuple[ConfigRecord, str, int, np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    c = msg.content["config"]
    i = int(ctx.node_config["partition-id"])  # virtual client i is partner i of --partners
    x, y = load_table(os.path.join(c["data"], f"{c['partners'][i]}.parquet"))
    return c, c["partners"][i], int(c["batches"][i]), x, y


client_app = ClientApp()


@client_app.query()
def warm_up(msg: Message, ctx: Context) -> Message:
    """Start-up: load every partner's rows (the actor pool does not tie a partner to an actor),
    build the model and an optimizer (the first one imports torch._dynamo: seconds) and take a
    throwaway step; train() reloads the weights anyway."""
    c, _, b, x, y = _client(msg, ctx)
    for p in c["partners"]:
        load_table(os.path.join(c["data"], f"{p}.parquet"))
    model = model_for(c)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    nn.CrossEntropyLoss()(model(torch.from_numpy(x[:b])), torch.from_numpy(y[:b])).backward()
    opt.step()
    model.load_state_dict(ArrayRecord(model.state_dict()).to_torch_state_dict())
    S["cold"] = 0
    return Message(Rec({"m": MetricRecord({"pid": os.getpid()})}), reply_to=msg)


@client_app.train()
def train(msg: Message, ctx: Context) -> Message:
    t0 = time.perf_counter()
    c, partner, b, x, y = _client(msg, ctx)
    model = model_for(c)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=float(c["lr"]), momentum=0.0, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()  # mean over the step's rows
    h, r = int(c["local-steps"]), int(c["server-round"]) - 1
    for step in range(r * h, r * h + h):
        idx = step_indices(int(c["seed"]), partner, len(y), b, step)
        opt.zero_grad()
        loss_fn(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
        opt.step()
    metrics = {"num-examples": b * h, "pid": os.getpid(), "cold": S["cold"],
               "train-s": time.perf_counter() - t0}
    return Message(Rec({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord(metrics)}), reply_to=msg)


class StrictFedAvg(FedAvg):
    """Flower's FedAvg, failing loudly instead of averaging over fewer clients."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        bad = [m.error.reason for m in replies if m.has_error()]
        if bad or len(replies) != self.min_train_nodes:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, errors {bad}")
        metrics = [m.content["metrics"] for m in replies]
        S["client_s"].append(max(float(m["train-s"]) for m in metrics))
        S["pids"].append(sorted(int(m["pid"]) for m in metrics))
        S["cold_loads"] = max(S["cold_loads"], *(int(m["cold"]) for m in metrics))
        return super().aggregate_train(server_round, replies)


def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Centralized test accuracy; its timestamps delimit the rounds."""
    t0 = time.perf_counter()
    if server_round > 0:
        S["round_s"].append(t0 - S["t_last"])
    model, (x, y) = S["model"], S["test"]
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())
    S["accuracy"].append(acc)
    S["t_last"] = time.perf_counter()
    return MetricRecord({"accuracy": acc})


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    n, cfg = len(S["partners"]), S["config"]
    while len(nodes := list(grid.get_node_ids())) < n:
        time.sleep(0.01)
    replies = list(grid.send_and_receive([Message(
        Rec({"config": cfg}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]))
    if len(replies) != n or any(m.has_error() for m in replies):
        raise RuntimeError(f"warm-up failed: {[m.error.reason for m in replies if m.has_error()]}")
    S["t_ready"] = time.perf_counter()
    S["pids"].append(sorted(int(m.content["m"]["pid"]) for m in replies))
    strategy = StrictFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                            min_evaluate_nodes=0, min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(S["model"].state_dict()),
                            num_rounds=S["rounds"], train_config=cfg, evaluate_fn=evaluate)
    S["final"] = result.arrays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, kind in [("data", str), ("partners", str), ("rounds", int), ("local-steps", int),
                       ("global-batch", int), ("lr", float), ("json", str)]:
        ap.add_argument(f"--{name}", type=kind, required=True)
    ap.add_argument("--hidden", default="128,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client-cpus", type=float, default=0.5, help="Ray CPUs per virtual client")
    ap.add_argument("--dump-params", action="store_true", help="final flat parameters in OUT")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)

    partners, data = a.partners.split(","), str(Path(a.data).resolve())
    sizes = {p: pq.read_metadata(os.path.join(data, f"{p}.parquet")).num_rows for p in partners}
    batches = partner_batch_sizes(sizes, a.global_batch)
    test = load_table(os.path.join(data, "test.parquet"))
    cfg = ConfigRecord({"data": data, "partners": partners, "lr": a.lr, "seed": a.seed,
                        "batches": [batches[p] for p in partners], "local-steps": a.local_steps,
                        "hidden": [int(h) for h in a.hidden.split(",")],
                        "features": int(test[0].shape[1])})
    S.update(partners=partners, config=cfg, rounds=a.rounds, test=test, round_s=[],
             client_s=[], pids=[], cold_loads=0, accuracy=[], model=model_for(cfg))
    backend = {"client_resources": {"num_cpus": a.client_cpus, "num_gpus": 0.0},
               # a Ray instance of our own ("local": never a cluster someone else started here),
               # its session files apart from the default /tmp/ray that raysys' Ray uses
               "init_args": {"address": "local", "num_cpus": 2, "_temp_dir": "/tmp/ray_flwr",
                             "logging_level": logging.ERROR, "log_to_driver": False,
                             "object_store_memory": 200 * 2**20}}
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(partners),
                   backend_config=backend)
    wall = time.perf_counter() - t0

    import ray  # flwr's Ray, for its version

    acc, rs = S["accuracy"], S["round_s"]
    out = {"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
           "rounds": a.rounds, "local_steps": a.local_steps, "global_batch": a.global_batch,
           "partner_batches": batches, "startup_s": S["t_ready"] - t0, "round_s": rs,
           "client_train_s": S["client_s"], "client_pids": S["pids"],
           "cold_loads_in_rounds": S["cold_loads"], "initial_accuracy": acc[0],
           "accuracy": acc[1:], "final_accuracy": acc[-1], "wall_s": wall}
    if a.dump_params:
        model = S["model"]
        model.load_state_dict(S["final"].to_torch_state_dict())
        out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"flower fedavg: {a.rounds} rounds x {a.local_steps} steps,"
          f" startup {out['startup_s']:.2f}s, round mean {sum(rs) / len(rs):.3f}s"
          f" (min {min(rs):.3f} max {max(rs):.3f}), accuracy {acc[0]:.3f} -> {acc[-1]:.4f},"
          f" wall {wall:.2f}s -> {a.json}")
    return 0


if __name__ == "__main__":
    # Run as the module `flower_fedavg` (its folder is on sys.path, which flwr hands on to its
    # Ray workers), so the client functions pickle by reference and the caches above persist
    # between rounds in each client actor.
    import flower_fedavg

    sys.exit(flower_fedavg.main())
