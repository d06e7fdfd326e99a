"""A 2-worker raysys run ends at the parameters torch DDP reaches on the same batches."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import ray
import torch
from conftest import make_spec

from raysys.control.controller import RemoteJobController
from raysys.data.sampler import partner_batch_sizes, split_indices, step_indices
from raysys.data.sources import load_partner_table
from raysys.models import build_model
from raysys.train.collective import free_port
from raysys.train.reference import max_relative_difference


def _ddp_rank(rank: int, port: int, spec: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    p = spec["partners"][0]
    table = load_partner_table("alpha", p["data"]["path"], None, "label")
    rows = int(table.y.shape[0])
    batch = partner_batch_sizes({"alpha": rows}, spec["global_batch_size"])["alpha"]
    model = DistributedDataParallel(build_model("mlp", {"hidden": [32]}, 12, 4, spec["seed"]))
    opt = torch.optim.SGD(model.parameters(), lr=spec["optimizer"]["lr"],
                          momentum=spec["optimizer"]["momentum"])
    for step in range(spec["steps"]):
        idx = split_indices(step_indices(spec["seed"], "alpha", rows, batch, step), [1, 1])[rank]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(table.x[idx])),
                                                 torch.from_numpy(table.y[idx]))
        loss.backward()  # DDP averages the two ranks' mean gradients: equal halves -> global mean
        opt.step()
    if rank == 0:
        flat = torch.cat([q.detach().reshape(-1) for q in model.module.parameters()])
        np.save(out, flat.numpy())
    dist.destroy_process_group()


def test_two_worker_run_matches_ddp(ray_cluster, two_partner_data, tmp_path):
    spec = make_spec(two_partner_data, tmp_path, steps=25, alpha_workers=2)
    spec["partners"] = spec["partners"][:1]  # one partner, two workers: equal halves of 30
    spec["global_batch_size"] = 30
    controller = RemoteJobController.remote(spec)
    ray.get(controller.run.remote())
    ours = ray.get(controller.parameters.remote())

    out = str(tmp_path / "ddp.npy")
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, spec, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert os.path.exists(out)
    assert max_relative_difference(ours, np.load(out)) <= 1e-5
