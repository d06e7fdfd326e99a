"""Secure aggregation overhead: step time with masked fixed-point all-reduce vs the plain one.

For each group size (default 2, 4, 8) the script starts that many processes on this host, one
torch thread each, joined to a raysys GenerationGroup (gloo over the TCPStore a StoreServer
hosts, as workers are). Every process holds a raysys Replica per model and runs steps of

    Replica.local_gradients(own rows)  +  all-reduce of the gradient buckets

either plainly (a GenerationGroup's float32 all-reduce) or through a GenerationGroup with secure
aggregation (SecureAggregator: scales agreed on a generation's first step, then taken from the
previous sum; fixed point; pairwise AES-128-CTR masks drawn and added in one pass; integer
all-reduce, int32 on the wire up to 15 workers). The two kinds alternate window by window in the
same processes, so both see the same neighbours at almost the same moments; the ratio of the
medians is the figure. The secure steps are numbered on across windows, as a job's steps are, so
each one's masks are drawn ahead on a background thread as in a job (`--no-mask-ahead`: inline);
the drawing of the next secure window's first masks is finished and timed at the end of each
secure window, so it never runs in a plain one. apply() runs after every step but outside the
timed part (it is the same on both sides). Rank 0's clock times a step (the all-reduce keeps the
ranks in lock step). Rank 0's process CPU time per step is reported too: it is what a step costs
the worker, and neighbours on a busy host inflate it less than wall time.

Partners: by default every worker is a different partner (`--partners distinct`), the worst
case: every rank masks with all w-1 others, so the masking work per rank grows with w.
`--partners two` splits the workers between two partners (each rank masks with w/2 peers).
`--neighbours N` masks along the sparse graph of the spec's secure_aggregation_neighbours (~2N
peers per rank) instead.

Models: the digits MLP (mlp(64, 10, hidden=(128, 64)), ~17k parameters) and the ~1.06M-parameter
MLP of bench/common.py. The global batch (default 128) is split evenly among the workers, as
raysys splits a step's batch.

Honesty note: this host has 2 cores, so 4 and 8 processes oversubscribe it. Oversubscription
multiplies per-process CPU work (masking is per-process work that grows with w) into wall time,
which a deployment with one worker per host would not see; the plain side is measured under the
same oversubscription, but the 4- and 8-worker ratios here are pessimistic.

Usage: .venv/bin/python bench/secagg_overhead.py [--workers 2,4,8] [--models digits,mlp]
       [--partners distinct|two] [--neighbours N] [--no-mask-ahead] [--windows N]
       [--window-steps N] [--strict]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import queue  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import MLP, NUM_CLASSES, machine_line, median, print_table  # noqa: E402

from raysys.models import build_model, count_parameters  # noqa: E402
from raysys.train.collective import GenerationGroup, StoreServer  # noqa: E402
from raysys.train.replica import Replica, ReplicaConfig  # noqa: E402

# name -> (registry model, kwargs, features)
MODELS = {
    "digits": ("mlp", {"hidden": [128, 64]}, 64),
    "mlp": (MLP.registry, MLP.kwargs, MLP.features),
}
GOAL = 1.3  # secure / plain step time, for every group size up to 8
SEED = 0
TIMEOUT_S = 120.0


def partner_names(world: int, layout: str) -> list[str]:
    if layout == "two":
        return [f"p{r % 2}" for r in range(world)]
    return [f"p{r}" for r in range(world)]


class Bench:
    """One model in one worker process: the replica, its rows, the group and the aggregator."""

    def __init__(self, name: str, generation: int, rank: int, world: int, port: int,
                 args: argparse.Namespace) -> None:
        registry, kwargs, features = MODELS[name]
        cfg = ReplicaConfig(registry, kwargs, features, NUM_CLASSES, SEED, "sgd", 0.01, 0.9, 0.0)
        self.replica = Replica(cfg)
        local = args.global_batch // world
        g = torch.Generator().manual_seed(1000 + rank)
        self.x = torch.randn(local, features, generator=g)
        self.y = torch.randint(0, NUM_CLASSES, (local,), generator=g)
        # Two groups in the same processes: the plain one and the secure one (its own
        # generation, so its own keys), exactly as a worker joins them.
        self.plain = GenerationGroup(2 * generation, rank, world, "127.0.0.1", port, TIMEOUT_S)
        t0 = time.perf_counter()
        self.secure = GenerationGroup(2 * generation + 1, rank, world, "127.0.0.1", port,
                                      TIMEOUT_S, partner_names(world, args.partners),
                                      secure=True, mask_neighbours=args.neighbours)
        self.setup_s = time.perf_counter() - t0
        self.aggregator = self.secure._secure  # None with one partner
        if self.aggregator is not None:
            self.aggregator.mask_ahead = not args.no_mask_ahead
        # The secure group's steps are numbered on, window after window, as a job's are (its
        # masks are drawn ahead for the next step); the plain group's numbers do not matter.
        self.steps = {False: 0, True: 0}
        self.window_steps = args.window_steps

    def all_reduce(self, buckets: list[torch.Tensor], secure: bool) -> None:
        (self.secure if secure else self.plain).all_reduce_sum(buckets, self.steps[secure])
        self.steps[secure] += 1

    def accuracy(self) -> tuple[float, float]:
        """(max abs difference, max abs value) of the two paths on the same local gradients."""
        self.replica.local_gradients(self.x, self.y)
        plain = [b.clone() for b in self.replica.buckets]
        self.all_reduce(plain, secure=False)
        self.all_reduce(self.replica.buckets, secure=True)
        pairs = zip(plain, self.replica.buckets, strict=True)
        return (max(float((a - b).abs().max()) for a, b in pairs),
                max(float(b.abs().max()) for b in plain))

    def window(self, secure: bool) -> tuple[float, float]:
        """Mean (wall, CPU) seconds of local_gradients + all-reduce over a window of steps.

        CPU time is this process's, all threads (gloo's included): what the step costs the
        worker, which the neighbours on an oversubscribed host do not inflate as they do wall
        time.
        """
        wall = cpu = 0.0
        for _ in range(self.window_steps):
            t, c = time.perf_counter(), time.process_time()
            self.replica.local_gradients(self.x, self.y)
            self.all_reduce(self.replica.buckets, secure)
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            self.replica.apply()
        if secure and self.aggregator is not None:
            # The masks of the next secure step are being drawn now: that work is the secure
            # side's, so it finishes (and is timed) here, not during the plain window next.
            t, c = time.perf_counter(), time.process_time()
            self.aggregator.settle()
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
        return wall / self.window_steps, cpu / self.window_steps

    def close(self) -> None:
        self.plain.close()
        self.secure.close()


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace,
              results: mp.Queue) -> None:
    """One worker process: per model, alternate plain and secure windows; rank 0 reports."""
    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    for generation, name in enumerate(args.models):
        bench = Bench(name, generation, rank, world, port, args)
        err, scale = bench.accuracy()
        for _ in range(args.warmup_windows):
            bench.window(secure=False)
            bench.window(secure=True)
        times: dict[str, list[float]] = {"plain": [], "secure": [], "plain_cpu": [],
                                         "secure_cpu": []}
        for w in range(args.windows):
            # Alternate which kind goes first, so neither always follows the other.
            order = ("plain", "secure") if w % 2 == 0 else ("secure", "plain")
            for kind in order:
                wall, cpu = bench.window(secure=kind == "secure")
                times[kind].append(wall)
                times[f"{kind}_cpu"].append(cpu)
        out[name] = {**times, "setup_s": bench.setup_s, "err": err, "scale": scale,
                     "masked_peers": len(bench.secure.masked_peers)}
        bench.close()
    if rank == 0:
        results.put(out)


def run_group(world: int, args: argparse.Namespace) -> dict[str, dict]:
    server = StoreServer("127.0.0.1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, server.port, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=args.timeout_s)
    except queue.Empty:
        raise RuntimeError(f"{world} workers: no result within {args.timeout_s}s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()  # only the processes this script started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4,8")
    parser.add_argument("--models", default="digits,mlp")
    parser.add_argument("--partners", choices=("distinct", "two"), default="distinct")
    parser.add_argument("--neighbours", type=int, default=None,
                        help="sparse masking: the spec's secure_aggregation_neighbours "
                             "(default: every peer of another partner)")
    parser.add_argument("--no-mask-ahead", action="store_true",
                        help="draw each step's masks inline, not ahead on another thread")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window-steps", type=int, default=10)
    parser.add_argument("--warmup-windows", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a ratio exceeds the goal (default: report only)")
    args = parser.parse_args()
    args.models = args.models.split(",")
    worlds = [int(w) for w in args.workers.split(",")]
    for w in worlds:
        if args.global_batch % w:
            parser.error(f"--global-batch {args.global_batch} does not split over {w} workers")
    torch.set_num_threads(1)
    print(machine_line())
    graph = f"sparse, {args.neighbours} neighbours" if args.neighbours else "all peers"
    graph += "; drawn inline" if args.no_mask_ahead else "; drawn ahead"
    print(f"partners: {args.partners}; masks: {graph}; global batch {args.global_batch}; "
          f"{args.windows} windows of {args.window_steps} steps per kind, alternating; "
          f"{os.cpu_count()} cores, so groups above {os.cpu_count()} workers oversubscribe "
          "the host")
    rows = []
    ok = True
    for world in worlds:
        res = run_group(world, args)
        for name in args.models:
            r = res[name]
            plain, secure = median(r["plain"]), median(r["secure"])
            pairs = [s / p for s, p in zip(r["secure"], r["plain"], strict=True)]
            ratio = secure / plain
            cpu_ratio = median(r["secure_cpu"]) / median(r["plain_cpu"])
            ok &= ratio <= GOAL
            registry, kwargs, features = MODELS[name]
            params = count_parameters(build_model(registry, kwargs, features, NUM_CLASSES, SEED))
            rows.append([name, f"{params:,}", str(world), str(r["masked_peers"]),
                         f"{plain * 1e3:.1f}", f"{secure * 1e3:.1f}", f"{ratio:.2f}x",
                         f"{min(pairs):.2f}-{max(pairs):.2f}x", f"{cpu_ratio:.2f}x",
                         f"{r['setup_s'] * 1e3:.1f}",
                         f"{r['err'] / r['scale']:.1e}"])
            print(f"{world} workers {name}: plain {plain * 1e3:.1f} ms, secure "
                  f"{secure * 1e3:.1f} ms ({ratio:.2f}x; CPU {cpu_ratio:.2f}x)", flush=True)
    print()
    print_table(["model", "params", "workers", "masked peers/rank", "plain ms/step",
                 "secure ms/step", "ratio", "window ratios", "CPU ratio", "setup ms",
                 "rel. err"], rows)
    print("ratio: median wall time per step (rank 0), the goal's figure; window ratios: range "
          "over paired windows; CPU ratio: rank 0's process CPU time per step; setup: key "
          "agreement incl. the secure group's rendezvous and waiting for the slowest peer; "
          "rel. err: max |secure - plain| / max |plain| on one step")
    print(f"goal: secure/plain wall time <= {GOAL}x at every size: "
          f"{'holds' if ok else 'FALLS SHORT'}")
    print(machine_line())
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
