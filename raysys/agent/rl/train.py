"""`raysys agent train`: PPO (RLlib new API stack) on raysys/ClusterEnv-v0, then an evaluation.

Reads top to bottom: the scenario distribution (distribution.py), the optional teacher prior
(prior.py), PPO iterations within a wall-clock budget with TensorBoard logging, the RLlib
checkpoint, and the evaluation table against the heuristic baselines. Hyperparameters are the
fields of TrainConfig, all in one place. Outputs under `out`:

    algorithm/   the full RLlib Algorithm checkpoint (algo.save_to_path), to resume or inspect
    module/      the RLModule alone (what RLPolicy and the live AgentActor load)
    tb/          TensorBoard event files (`tensorboard --logdir out/tb`)
    train.json   the config, timings and per-iteration metrics
    eval.json, eval.md   every evaluation episode and the table vs threshold and goodput
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raysys.agent.rl.policy import MODULE_IN_ALGORITHM


@dataclass
class TrainConfig:
    # -- run ------------------------------------------------------------------------------------
    out: str = "runs/agent-train"
    seed: int = 0
    minutes: float = 25.0  # wall-clock budget for the PPO iterations
    max_iterations: int = 10_000  # stop earlier if reached
    num_cpus: int = 2  # for a local Ray (ignored when Ray is already up, e.g. ray job submit)
    # -- scenario distribution (distribution.py) -------------------------------------------------
    scenarios: str = "scenarios"
    exclude_traces: tuple[str, ...] = ()  # held out: train on the others, evaluate on these
    keep_excluded_layouts: bool = False  # their scenarios stay, with the other profiles only
    swap_profiles: bool = True
    lambda_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    original_weight: float = 0.75  # share of episodes on the scenarios as written
    profile_csvs: tuple[str, ...] = ()  # measured live profiles (raysys profile) to swap in
    # -- environment -------------------------------------------------------------------------
    history: bool = True  # append the policy's memory of its rescales (history.py)
    # goodput's proposal as features and as one action (advisor.py); the shipped policy has it
    advisor: bool = True
    reward_scale_s: float = 10.0  # rewards in units of one decision interval
    progress_shaping: bool = True  # potential-based; same optimum (docs/agent.md)
    # -- PPO -----------------------------------------------------------------------------------
    lr: float = 1e-4
    gamma: float = 0.99  # ~100 intervals (17 minutes) of horizon
    gae_lambda: float = 0.95
    clip_param: float = 0.2
    entropy_coeff: float = 0.001
    vf_loss_coeff: float = 0.5
    vf_clip_param: float = 1e4  # returns reach ~100 intervals: no value clipping
    kl_coeff: float = 0.0
    train_batch_size: int = 4000
    minibatch_size: int = 500
    num_epochs: int = 4
    num_env_runners: int = 0  # sample in the driver: the machine has 2 cores
    num_envs_per_env_runner: int = 8
    hidden: tuple[int, ...] = (64, 64)
    noop_bias: float = 2.0
    # -- teacher prior (prior.py); None trains PPO from a random network --------------------------
    # "advisor" (follow the advisor everywhere; needs advisor=True), a heuristic to imitate
    # (goodput) or None: PPO from a random network (prior.py).
    prior: str | None = "advisor"
    prior_rounds: tuple[tuple[int, float], ...] = ((150, 0.0), (100, 0.5))
    prior_epochs: int = 20
    prior_smoothing: float = 0.1  # target share spread over the other allowed actions
    # -- evaluation after training ------------------------------------------------------------
    eval_seeds: int = 10
    eval_baselines: tuple[str, ...] = ("threshold", "goodput")
    max_partners: int = 4
    max_workers_per_partner: int = 8


@dataclass
class TrainResult:
    out: Path
    module: Path
    algorithm: Path
    iterations: int
    env_steps: int
    train_seconds: float
    total_seconds: float
    history: list[dict] = field(default_factory=list)
    eval_table: str = ""


def check_prior(cfg: TrainConfig) -> None:
    """A prior that cannot run is an error before anything starts."""
    from raysys.agent.policies import available_policies
    from raysys.agent.rl.prior import ADVISOR

    if cfg.prior == ADVISOR and not cfg.advisor:
        raise ValueError("prior: 'advisor' needs the advisor (--advisor); without it use "
                         "--prior goodput (or none)")
    if cfg.prior not in (None, ADVISOR) and cfg.prior not in available_policies():
        raise ValueError(f"prior: unknown teacher {cfg.prior!r}; known: "
                         f"{', '.join([ADVISOR, *available_policies()])}, or none")


def env_config(cfg: TrainConfig, scenarios: list) -> dict[str, Any]:
    return {
        "scenarios": scenarios,
        "randomize": True,
        "reward_scale": cfg.reward_scale_s,
        "progress_shaping": cfg.progress_shaping,
        "max_partners": cfg.max_partners,
        "max_workers_per_partner": cfg.max_workers_per_partner,
        "history": cfg.history,
        "advisor": cfg.advisor,
    }


def module_spec(cfg: TrainConfig):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from raysys.agent.rl.module import MaskedActorCritic

    return RLModuleSpec(
        module_class=MaskedActorCritic,
        model_config={
            "hidden": list(cfg.hidden),
            "noop_bias": cfg.noop_bias,
            "max_workers_per_partner": cfg.max_workers_per_partner,
            "history": cfg.history,  # RLPolicy must rebuild the same observation
            "advisor": cfg.advisor,  # ... and the same actions
        },
    )


def ppo_config(cfg: TrainConfig, env_cfg: dict[str, Any]):
    from ray.rllib.algorithms.ppo import PPOConfig

    from raysys.agent.rl.env import HistoryEnv

    return (
        PPOConfig()
        .environment(env=HistoryEnv, env_config=env_cfg)
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            rollout_fragment_length="auto",
        )
        .training(
            lr=cfg.lr,
            gamma=cfg.gamma,
            lambda_=cfg.gae_lambda,
            clip_param=cfg.clip_param,
            entropy_coeff=cfg.entropy_coeff,
            vf_loss_coeff=cfg.vf_loss_coeff,
            vf_clip_param=cfg.vf_clip_param,
            kl_coeff=cfg.kl_coeff,
            use_kl_loss=cfg.kl_coeff > 0,
            train_batch_size_per_learner=cfg.train_batch_size,
            minibatch_size=cfg.minibatch_size,
            num_epochs=cfg.num_epochs,
        )
        .rl_module(rl_module_spec=module_spec(cfg))
        .debugging(seed=cfg.seed)
    )


def _scalars(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of RLlib's nested result dict, as 'a/b/c' -> value."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
            out[name] = float(value)
    return out


# What the console line and train.json keep of each iteration (TensorBoard gets everything).
_SUMMARY = {
    "return": "env_runners/episode_return_mean",
    "length": "env_runners/episode_len_mean",
    "policy_loss": "learners/default_policy/policy_loss",
    "vf_loss": "learners/default_policy/vf_loss",
    "entropy": "learners/default_policy/entropy",
    "kl": "learners/default_policy/mean_kl_loss",
    "env_steps": "env_runners/num_env_steps_sampled_lifetime",
}


def _start_ray(cfg: TrainConfig) -> bool:
    """Connect to a running Ray (ray job submit) or start a small local one; True if started."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    # address="local": a new private cluster, never one another process started on this host.
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _pretrain(cfg: TrainConfig, algo, scenarios: list, log: Callable[[str], None]) -> dict:
    """Behaviour-clone the teacher into a fresh module and load it into the Algorithm."""
    from raysys.agent.rl.env import HistoryEnv
    from raysys.agent.rl.module import MaskedActorCritic
    from raysys.agent.rl.prior import pretrain

    env = HistoryEnv(env_config(cfg, scenarios))
    spec = module_spec(cfg)
    module = MaskedActorCritic(
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=spec.model_config,
    )
    stats = pretrain(
        module, env, cfg.prior, list(cfg.prior_rounds), cfg.prior_epochs, cfg.gamma, cfg.seed, log,
        smoothing=cfg.prior_smoothing,
    )
    # Kept beside the trained module: evaluating it shows what PPO added to the imitation.
    prior_dir = (Path(cfg.out) / "prior_module").resolve()
    shutil.rmtree(prior_dir, ignore_errors=True)
    module.save_to_path(str(prior_dir))
    algo.restore_from_path(str(prior_dir), component=MODULE_IN_ALGORITHM.as_posix())
    return stats


def train(
    cfg: TrainConfig, log: Callable[[str], None] = print, command: str = ""
) -> TrainResult:
    """Train, save the checkpoints, evaluate; `command` is recorded for the model card."""
    import torch
    from tensorboardX import SummaryWriter

    # Batch-8 forwards of a 64-wide MLP: extra threads only spin (measured 5 ms vs 40 us per
    # layer on this 2-core machine with 2 threads vs 1).
    torch.set_num_threads(1)
    check_prior(cfg)

    from raysys.agent.env import resolve_scenarios
    from raysys.agent.rl.distribution import training_distribution

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = resolve_scenarios(cfg.scenarios)
    scenarios = training_distribution(
        shipped,
        exclude_traces=cfg.exclude_traces,
        swap_profiles=cfg.swap_profiles,
        lambda_scales=cfg.lambda_scales,
        original_weight=cfg.original_weight,
        extra_csvs=cfg.profile_csvs,
        keep_excluded_layouts=cfg.keep_excluded_layouts,
    )
    log(f"training distribution: {len(scenarios)} entries from {len(shipped)} scenarios")
    started_ray = _start_ray(cfg)
    import ray

    history: list[dict] = []
    writer = SummaryWriter(str(out / "tb"))
    algo = None
    prior_stats: dict = {}
    try:
        algo = ppo_config(cfg, env_config(cfg, scenarios)).build_algo()
        if cfg.prior:
            prior_stats = _pretrain(cfg, algo, scenarios, log)
            for key, value in prior_stats.items():
                writer.add_scalar(f"prior/{key}", value, 0)
        ppo_start = time.perf_counter()
        deadline = ppo_start + cfg.minutes * 60
        iteration = 0
        while iteration < cfg.max_iterations and time.perf_counter() < deadline:
            result = algo.train()
            iteration += 1
            scalars = _scalars(result)
            steps = int(scalars.get(_SUMMARY["env_steps"], 0))
            for name, value in scalars.items():
                writer.add_scalar(name, value, steps)
            row = {k: scalars.get(v) for k, v in _SUMMARY.items()}
            row.update(iteration=iteration, seconds=round(time.perf_counter() - ppo_start, 1))
            history.append(row)
            log(
                f"iter {iteration:4d}  {row['seconds']:7.1f}s  steps {steps:8d}  "
                f"return {_fmt(row['return'])}  len {_fmt(row['length'])}  "
                f"entropy {_fmt(row['entropy'])}  kl {_fmt(row['kl'], 4)}"
            )
        train_seconds = time.perf_counter() - ppo_start
        algorithm_dir = out / "algorithm"
        module_dir = out / "module"
        for d in (algorithm_dir, module_dir):
            shutil.rmtree(d, ignore_errors=True)
        algo.save_to_path(str(algorithm_dir.resolve()))
        algo.get_module().save_to_path(str(module_dir.resolve()))
        env_steps = int(history[-1]["env_steps"] or 0) if history else 0
    finally:
        writer.close()
        if algo is not None:
            algo.stop()
        if started_ray:
            ray.shutdown()
    result = TrainResult(
        out, module_dir, algorithm_dir, iteration, env_steps, train_seconds, 0.0, history
    )
    if cfg.eval_seeds > 0:
        result.eval_table = evaluate_policy(
            module_dir, cfg.scenarios, cfg.eval_seeds, cfg.eval_baselines, out
        )
        log(result.eval_table)
    result.total_seconds = time.perf_counter() - start
    (out / "train.json").write_text(
        json.dumps(
            {
                "command": command,
                "config": asdict(cfg),
                "prior": prior_stats,
                "iterations": iteration,
                "env_steps": env_steps,
                "train_seconds": round(train_seconds, 1),
                "total_seconds": round(result.total_seconds, 1),
                "history": history,
            },
            indent=1,
        )
    )
    return result


def evaluate_policy(
    checkpoint: Path,
    scenarios: str,
    seeds: int,
    baselines: tuple[str, ...] = ("threshold", "goodput"),
    out: Path | None = None,
    only: Callable[[Any], bool] | None = None,
) -> str:
    """The evaluator's table (and eval.json/eval.md under `out`) for rl vs the baselines."""
    import raysys.agent.rl.policy  # noqa: F401  (registers "rl")
    from raysys.agent.env import resolve_scenarios
    from raysys.agent.evaluate import default_builder, evaluate

    loaded = [s for s in resolve_scenarios(scenarios) if only is None or only(s)]
    builders = {name: default_builder(name) for name in baselines}
    builders["rl"] = default_builder("rl", checkpoint=str(Path(checkpoint).resolve()))
    report = evaluate(loaded, builders, list(range(seeds)))
    table = report.table()
    if out is not None:
        report.to_json(out / "eval.json")
        (out / "eval.md").write_text(table + "\n")
    return table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
