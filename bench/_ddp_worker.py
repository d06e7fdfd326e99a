"""One rank of the torchrun peers of bench/throughput.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/_ddp_worker.py \
        --model mlp --data /tmp/x.parquet --global-batch 128 --warmup 30 --windows 10 \
        --window-steps 15 [--ab]

Plain DDP (default): rank 0 prints one line `RESULT {"windows": [...]}`, the seconds of each
window of measured steps, timed inside the training loop after the warm-up steps (as the Ray
Train loop does).

--ab: the same processes also hold a raysys Replica joined to a raysys GenerationGroup (its own
gloo group over a TCPStore, as workers use), and alternate windows of DDP steps and raysys steps
on the same rows: `RESULT {"ddp": [...], "raysys": [...]}`. Both step implementations then see
the same processes and the same neighbours at almost the same moments, which separates the cost
of the step itself from launch, Ray and machine noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import MODELS, NUM_CLASSES, PARTNER, timed_ddp_run, train_steps  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from raysys.data.sampler import split_indices, step_indices  # noqa: E402
from raysys.data.sources import load_partner_table  # noqa: E402
from raysys.models import build_model  # noqa: E402
from raysys.train.collective import GenerationGroup, StoreServer  # noqa: E402
from raysys.train.replica import Replica, ReplicaConfig  # noqa: E402


def ab_windows(args: argparse.Namespace, ddp: torch.nn.Module, opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> dict[str, list[float]]:
    """Alternate DDP and raysys windows (order flipped every window so neither always goes
    first); each system continues its own step sequence."""
    case = MODELS[args.model]
    replica = Replica(ReplicaConfig(case.registry, case.kwargs, case.features, NUM_CLASSES,
                                    args.seed, "sgd", args.lr, args.momentum, 0.0))
    # The raysys controller hosts the store; here rank 0 does, and shares its port.
    port = torch.tensor([0])
    if rank == 0:
        store = StoreServer("127.0.0.1")
        port[0] = store.port
    dist.broadcast(port, 0)
    group = GenerationGroup(1, rank, world, "127.0.0.1", int(port[0]), timeout_s=60)
    rows = int(y.shape[0])

    def raysys_steps(first: int, last: int) -> None:  # PartnerWorker.run_steps, minus reports
        for step in range(first, last):
            idx = step_indices(args.seed, PARTNER, rows, args.global_batch, step)
            mine = torch.from_numpy(split_indices(idx, [1.0] * world)[rank])
            replica.local_gradients(x[mine], y[mine])
            group.all_reduce_sum(replica.buckets)
            replica.apply()

    def ddp_steps(first: int, last: int) -> None:
        train_steps(ddp, opt, x, y, args.seed, args.global_batch, rank, world, first, last)

    runs = {"ddp": ddp_steps, "raysys": raysys_steps}
    for fn in runs.values():
        fn(0, args.warmup)
    out: dict[str, list[float]] = {"ddp": [], "raysys": []}
    for w in range(args.windows):
        first = args.warmup + w * args.window_steps
        for name in (("ddp", "raysys") if w % 2 == 0 else ("raysys", "ddp")):
            dist.barrier()  # both ranks start the window together
            t0 = time.perf_counter()
            runs[name](first, first + args.window_steps)
            out[name].append(time.perf_counter() - t0)
    group.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--window-steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--ab", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # rank, world and rendezvous come from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()
    case = MODELS[args.model]
    table = load_partner_table(PARTNER, args.data, None, "label")
    x, y = torch.from_numpy(table.x), torch.from_numpy(table.y)
    model = DistributedDataParallel(
        build_model(case.registry, case.kwargs, case.features, NUM_CLASSES, args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if args.ab:
        result: dict = ab_windows(args, model, optimizer, x, y, rank, world)
    else:
        result = {"windows": timed_ddp_run(model, optimizer, x, y, args.seed, args.global_batch,
                                           rank, world, args.warmup, args.windows,
                                           args.window_steps)}
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
