"""Rescale latency: raysys vs Ray Train v2 elastic, in one run, on one local Ray cluster.

Latency is the wall-clock time from the trigger to the first training step completed at the new
size. Every time below is `time.time()` on this host (driver, controller and workers share it).

raysys (REPEATS times each, median shown), one partner, model and batch of bench/throughput.py:
  scale-up cold     submit Scale(+1) -> first step with the newcomer (actor start, data load,
                    replica build, state sync from a survivor, gloo re-form, one step)
  scale-up warm     the same with `workers.spares: 1`: a started, loaded, built spare joins
  scale-down        submit Scale(-1) -> first step without the retired (slowest) worker
  failure           ray.kill a worker of 2 (workers.min 2) -> first step re-formed without it,
                    and -> the replacement the controller starts has joined (re-formed, and its
                    first step done)
  The trigger time is taken in this script just before `controller.submit` / `ray.kill`; the
  step time is the controller's RescaleEvent.t_first_step (dispatch time of the call + the first
  step's measured compute and all-reduce). The controller's own `latency_s` starts later, when it
  dequeues the decision, so it is shown only for reference.

Ray Train v2 (TorchTrainer, ScalingConfig(num_workers=(1, 2)), label_selector pool=raytrain,
1 CPU per worker, checkpoint every RT_CHECKPOINT_EVERY steps and resume from it, as an elastic
job must): the loop logs time, world size, rank and pid per step to a file.
  grow      a labelled 1-CPU node is added (timed from `add_node` returning with the node alive)
            -> first step logged at world size 2
  failure   SIGKILL one of the 2 workers' processes -> first step of the new group at size 2
  shrink    that node is removed (`Cluster.remove_node`) -> first step logged at world size 1
  Ray Train runs once per event (each takes tens of seconds); RT_MONITOR_INTERVAL_S is set well
  below Ray's default of 60 s so the comparison is against its best case; other knobs are Ray's
  defaults (health check every 2 s, resource view refreshed by its AutoscalingCoordinator).

Usage: .venv/bin/python bench/rescale_latency.py [--repeats N] [--skip-ray-train] [--strict]
"""

from __future__ import annotations

from common import ray_env_defaults

ray_env_defaults()  # before Ray is imported: some of it is read at import time

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    MLP,
    NUM_CLASSES,
    PARTNER,
    machine_line,
    median,
    print_table,
    train_steps,
    worker_runtime_env,
    write_table,
)
from ray.cluster_utils import Cluster  # noqa: E402

from raysys.control.controller import RemoteJobController  # noqa: E402
from raysys.control.decisions import Scale  # noqa: E402
from raysys.data.sources import load_partner_table  # noqa: E402
from raysys.models import build_model  # noqa: E402

# -- parameters -------------------------------------------------------------------------------
CASE = MLP  # ~1M parameters: a newcomer's state sync moves ~8 MB (weights + momentum)
GLOBAL_BATCH = 128
ROWS = 8192
SEED = 0
LR, MOMENTUM = 0.05, 0.9
REPEATS = 3
CPUS_PER_WORKER = 0.5
RAYSYS_NODE_CPUS = 2  # logical CPUs of the partner=alpha node: room for 2 workers + 2 spares
STEADY_STEPS = 5  # steps at the current size before the next trigger
EVENT_TIMEOUT_S = 60.0  # a raysys event not done by then is reported as failed
POLL_S = 0.05
RT_MONITOR_INTERVAL_S = 1.0  # ScalingConfig.elastic_resize_monitor_interval_s (Ray default: 60)
RT_CHECKPOINT_EVERY = 20
RT_EVENT_TIMEOUT_S = 150.0
RT_LABEL = {"pool": "raytrain"}
GOAL_WARM_S, GOAL_DOWN_S, GOAL_COLD_S, GOAL_SPEEDUP = 1.0, 1.0, 3.0, 5.0


# -- raysys -----------------------------------------------------------------------------------
def raysys_spec(name: str, data: str, storage: str, initial: int, min_workers: int,
                max_workers: int, spares: int) -> dict:
    return {
        "name": name,
        "model": {"name": CASE.registry, "kwargs": CASE.kwargs},
        "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM},
        "global_batch_size": GLOBAL_BATCH,
        "steps": 10**9,  # stopped by the benchmark
        "seed": SEED,
        "num_classes": NUM_CLASSES,
        "partners": [{"name": PARTNER, "data": {"path": data}, "placement": {"partner": PARTNER},
                      "workers": {"initial": initial, "min": min_workers, "max": max_workers,
                                  "spares": spares},
                      "cpus_per_worker": CPUS_PER_WORKER}],
        "checkpoint": {"storage_path": storage, "every_steps": 0},
        # steps_per_call stays at its default (0: ~0.25 s of steps per call), as users run it.
        "runtime": {"collective_timeout_s": 30, "log_every_steps": 10**6},
    }


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_steady(controller: ray.actor.ActorHandle) -> None:
    """No worker still starting (a spare being refilled), then STEADY_STEPS more steps."""
    wait_for(lambda: all(w["state"] != "starting" for w in ray.get(controller.workers.remote())),
             EVENT_TIMEOUT_S, "starting workers to be ready")
    step = ray.get(controller.progress.remote())["step"]
    wait_for(lambda: ray.get(controller.progress.remote())["step"] >= step + STEADY_STEPS,
             EVENT_TIMEOUT_S, "steady steps")


def next_event(controller: ray.actor.ActorHandle, seen: int, kind: str,
               detail: Callable[[str], bool] = lambda d: True) -> tuple[dict, int]:
    """The first rescale event of `kind` (and matching `detail`) after index `seen`, once its
    first step is done; returns it and the index to search from next."""
    def find() -> tuple[dict, int] | None:
        events = ray.get(controller.rescale_events.remote())
        for i in range(seen, len(events)):
            e = events[i]
            if e["kind"] == kind and detail(e["detail"]) and e["t_first_step"] is not None:
                return e, i + 1
        return None

    return wait_for(find, EVENT_TIMEOUT_S, f"a {kind} event")


def raysys_scaling(data: str, storage: str, spares: int, repeats: int) -> dict[str, list[float]]:
    """REPEATS cycles of Scale(+1) then Scale(-1) between 1 and 2 workers."""
    name = f"lat-{'warm' if spares else 'cold'}"
    controller = RemoteJobController.remote(
        raysys_spec(name, data, storage, initial=1, min_workers=1, max_workers=2, spares=spares))
    done = controller.run.remote()
    out: dict[str, list[float]] = {"up": [], "up_ctrl": [], "down": [], "down_ctrl": []}
    seen = 0
    try:
        for _ in range(repeats):
            for delta, key, kind in ((+1, "up", "scale_up"), (-1, "down", "scale_down")):
                wait_steady(controller)
                t0 = time.time()
                ray.get(controller.submit.remote(Scale(PARTNER, delta)))
                event, seen = next_event(controller, seen, kind)
                out[key].append(event["t_first_step"] - t0)
                out[f"{key}_ctrl"].append(event["latency_s"])
                print(f"  raysys {name} {kind}: {out[key][-1]:.3f} s ({event['detail']})",
                      flush=True)
    finally:
        ray.get(controller.stop.remote())
        ray.get(done)
        ray.kill(controller)
    return out


def raysys_failures(data: str, storage: str, repeats: int) -> dict[str, list[float]]:
    """Kill one of 2 workers (min 2); the group re-forms on the survivor, then a newcomer joins."""
    name = "lat-fail"
    controller = RemoteJobController.remote(
        raysys_spec(name, data, storage, initial=2, min_workers=2, max_workers=2, spares=0))
    done = controller.run.remote()
    out: dict[str, list[float]] = {"detect": [], "survivors": [], "joined": [], "joined_step": []}
    seen = 0
    try:
        for i in range(repeats):
            wait_steady(controller)
            active = [w for w in ray.get(controller.workers.remote()) if w["state"] == "active"]
            victim = active[i % len(active)]["id"]  # alternate between rank 0 and rank 1
            handle = ray.get_actor(f"raysys:{name}:{PARTNER}:{victim.split('/')[1]}")
            t_kill = time.time()
            ray.kill(handle, no_restart=True)
            # Two events of kind "recovery": "lost alpha/i" (re-formed on the survivor), then
            # "alpha/j joined" (the replacement the controller started for workers.min).
            recovery, seen = next_event(controller, seen, "recovery",
                                        lambda d: d.startswith("lost"))
            joined, seen = next_event(controller, seen, "recovery",
                                      lambda d: d.endswith("joined"))
            out["detect"].append(recovery["t_decision"] - t_kill)
            out["survivors"].append(recovery["t_first_step"] - t_kill)
            out["joined"].append(joined["t_ready"] - t_kill)
            out["joined_step"].append(joined["t_first_step"] - t_kill)
            print(f"  raysys failure of {victim}: survivors step {out['survivors'][-1]:.3f} s, "
                  f"replacement joined {out['joined'][-1]:.3f} s ({joined['detail']})",
                  flush=True)
    finally:
        ray.get(controller.stop.remote())
        ray.get(done)
        ray.kill(controller)
    return out


# -- Ray Train v2 elastic ---------------------------------------------------------------------
def ray_train_elastic_loop(config: dict) -> None:
    """An elastic TorchTrainer loop: resume from the last checkpoint, log every step."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    table = load_partner_table(PARTNER, config["data"], None, "label")
    x, y = torch.from_numpy(table.x), torch.from_numpy(table.y)
    model = ray.train.torch.prepare_model(
        build_model(CASE.registry, CASE.kwargs, CASE.features, NUM_CLASSES, SEED))
    inner = getattr(model, "module", model)  # prepare_model skips DDP at world size 1
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted group continues where the last checkpoint left off
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - one line per step, flushed
    stop = Path(config["stop"])
    while True:
        train_steps(model, optimizer, x, y, SEED, GLOBAL_BATCH, rank, world, step, step + 1)
        step += 1
        log.write(f"{time.time():.6f} {world} {rank} {step} {os.getpid()}\n")
        # Every rank must leave at the same step, or the others would wait in DDP forever.
        flag = torch.tensor([1.0 if stop.exists() else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag)
        if flag.item() > 0:
            break
        if step % RT_CHECKPOINT_EVERY == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": inner.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step},
                               Path(d) / "state.pt")
                ray.train.report({"step": step}, checkpoint=(
                    ray.train.Checkpoint.from_directory(d) if rank == 0 else None))
    log.close()


def read_steps(path: Path) -> list[tuple[float, int, int, int, int]]:
    """(time, world, rank, step, pid) per logged step."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows.append((float(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]),
                         int(parts[4])))
    return rows


def first_step_after(path: Path, t0: float, world: int, exclude_pids: set[int],
                     timeout_s: float) -> float:
    """Time of the first step logged after t0 at `world` by a process not in exclude_pids."""
    def find() -> float | None:
        hits = [r[0] for r in read_steps(path)
                if r[0] > t0 and r[1] == world and r[4] not in exclude_pids]
        return min(hits) if hits else None

    return wait_for(find, timeout_s, f"a Ray Train step at world size {world}")


def ray_train_elastic(cluster: Cluster, data: str, tmp: Path) -> dict[str, float | str]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log, stop = tmp / "rt-steps.log", tmp / "rt.stop"
    out: dict[str, float | str] = {}
    node_a = cluster.add_node(num_cpus=1, labels=RT_LABEL)
    cluster.wait_for_nodes()
    trainer = TorchTrainer(
        ray_train_elastic_loop,
        train_loop_config={"data": data, "log": str(log), "stop": str(stop)},
        scaling_config=ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1},
                                     label_selector=RT_LABEL,
                                     elastic_resize_monitor_interval_s=RT_MONITOR_INTERVAL_S),
        run_config=RunConfig(name=f"elastic-{time.time_ns()}", storage_path=str(tmp / "rt"),
                             failure_config=FailureConfig(max_failures=10)),
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # reported in the table, with its message
            errors.append(exc)

    fit_thread = threading.Thread(target=fit, daemon=True)
    t_start = time.time()
    fit_thread.start()
    node_b = None
    try:
        first_step_after(log, t_start, 1, set(), RT_EVENT_TIMEOUT_S)
        out["start"] = first_step_after(log, t_start, 1, set(), 0.1) - t_start
        print(f"  Ray Train started at world size 1 in {out['start']:.1f} s", flush=True)
        time.sleep(2.0)  # a few steps at size 1

        t_call = time.time()
        node_b = cluster.add_node(num_cpus=1, labels=RT_LABEL)
        cluster.wait_for_nodes()
        t0 = time.time()
        t_step = first_step_after(log, t0, 2, set(), RT_EVENT_TIMEOUT_S)
        out["grow"], out["grow_from_call"] = t_step - t0, t_step - t_call
        print(f"  Ray Train grow 1 -> 2: {out['grow']:.1f} s", flush=True)
        time.sleep(2.0)

        group = {r[4] for r in read_steps(log) if r[1] == 2}
        victim = max(group)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        out["failure"] = first_step_after(log, t0, 2, group, RT_EVENT_TIMEOUT_S) - t0
        print(f"  Ray Train worker killed -> new group of 2: {out['failure']:.1f} s", flush=True)
        time.sleep(2.0)

        t0 = time.time()
        cluster.remove_node(node_b)
        node_b = None
        out["shrink"] = first_step_after(log, t0, 1, set(), RT_EVENT_TIMEOUT_S) - t0
        print(f"  Ray Train shrink 2 -> 1: {out['shrink']:.1f} s", flush=True)
    except TimeoutError as exc:
        out["error"] = f"{exc}" + (f"; fit() raised {errors[0]!r}" if errors else "")
        print(f"  Ray Train: {out['error']}", flush=True)
    finally:
        stop.touch()
        fit_thread.join(timeout=60)
        if node_b is not None:
            cluster.remove_node(node_b)
        cluster.remove_node(node_a)
    if errors and "error" not in out:
        out["error"] = f"fit() raised {errors[0]!r}"
    return out


# -- report -----------------------------------------------------------------------------------
def fmt(values: list[float]) -> str:
    return f"{median(values):.3f}" if values else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--skip-ray-train", action="store_true")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a goal falls short (default: report only, so that "
                             "`make bench` runs every benchmark)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    print(f"model {CASE.registry} {CASE.kwargs}, global batch {GLOBAL_BATCH}, "
          f"raysys repeats {args.repeats} (median shown)")

    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = write_table(tmp / "data.parquet", ROWS, CASE.features, NUM_CLASSES, seed=1)
        # Head with no CPUs: every worker of either system lands on a labelled node.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False})
        raysys_node = cluster.add_node(num_cpus=RAYSYS_NODE_CPUS, labels={"partner": PARTNER})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=worker_runtime_env())
        try:
            print("raysys, cold scale-up and scale-down:", flush=True)
            cold = raysys_scaling(data, str(tmp / "ckpt"), spares=0, repeats=args.repeats)
            print("raysys, warm-spare scale-up and scale-down:", flush=True)
            warm = raysys_scaling(data, str(tmp / "ckpt"), spares=1, repeats=args.repeats)
            print("raysys, worker killed:", flush=True)
            fail = raysys_failures(data, str(tmp / "ckpt"), repeats=args.repeats)
            rt: dict[str, float | str] = {}  # stays empty with --skip-ray-train
            if not args.skip_ray_train:
                # Ray Train sizes an elastic group from free CPUs on *every* node, whatever its
                # label_selector (seen here: "ready resources for 2 workers" with one matching
                # 1-CPU node, then 60 s start-up timeouts): only its own nodes may have CPUs.
                cluster.remove_node(raysys_node)
                print("Ray Train v2 elastic:", flush=True)
                rt = ray_train_elastic(cluster, data, tmp)
        finally:
            ray.shutdown()
            cluster.shutdown()

    down = cold["down"] + warm["down"]
    ours = {
        "scale-up, warm spare": (warm["up"], GOAL_WARM_S, "grow"),
        "scale-up, cold": (cold["up"], GOAL_COLD_S, "grow"),
        "scale-down": (down, GOAL_DOWN_S, "shrink"),
        # A failure shrinks the group at once (the shrink goal), and the replacement is a cold
        # start (the cold goal); Ray Train's only figure is kill -> new group training.
        "failure -> re-formed on survivors": (fail["survivors"], GOAL_DOWN_S, "failure"),
        "failure -> replacement joined": (fail["joined"], GOAL_COLD_S, "failure"),
        "failure -> first step with replacement": (fail["joined_step"], None, "failure"),
    }
    rows, ok = [], True
    for label, (values, goal, peer_key) in ours.items():
        value = median(values)
        peer = rt.get(peer_key)
        ratio = f"{peer / value:.1f}x" if isinstance(peer, float) else "n/a"
        holds = [value <= goal] if goal else []
        if isinstance(peer, float):
            holds.append(peer / value >= GOAL_SPEEDUP)
        ok &= all(holds)
        verdict = ("holds" if all(holds) else "FALLS SHORT") if holds else "-"
        rows.append([label, fmt(values), " / ".join(f"{v:.2f}" for v in values),
                     f"<= {goal:.0f}" if goal else "-",
                     f"{peer:.1f}" if isinstance(peer, float) else "n/a", ratio, verdict])
    print(f"\nraysys: median of {args.repeats} (scale-down: {len(down)}) in seconds; Ray Train "
          f"v2 elastic: one run each")
    print_table(["event", "raysys s", "raysys runs", "goal s", "Ray Train s",
                 "Ray Train / raysys", "goals"], rows)
    print(f"raysys controller's own latency_s (from dequeuing the decision): "
          f"warm up {fmt(warm['up_ctrl'])}, cold up {fmt(cold['up_ctrl'])}, "
          f"down {fmt(cold['down_ctrl'] + warm['down_ctrl'])}; "
          f"failure detected {fmt(fail['detect'])} s after the kill")
    if "start" in rt:
        print(f"Ray Train: first step {rt['start']:.1f} s after fit(); grow measured from "
              f"add_node() call: {rt.get('grow_from_call', float('nan')):.1f} s")
    if "error" in rt:
        print(f"Ray Train: {rt['error']}")
        ok = False
    elif args.skip_ray_train:
        print("Ray Train: skipped (--skip-ray-train); the speed-up goal is not checked")
    print(machine_line())
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
