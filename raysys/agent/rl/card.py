"""Shipping a trained policy: copy its RLModule into the package and write its model card.

`raysys agent train --ship` ends here, so the shipped folder (raysys/agent/policies/default/)
and its MODEL_CARD.md always come from one run: the command, seed, scenarios, training budget
and evaluation table in the card are that run's, read back from its train.json and eval.md.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from raysys.agent.rl.policy import DEFAULT_CHECKPOINT


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def ship(run_dir: str | Path, dest: str | Path = DEFAULT_CHECKPOINT) -> Path:
    """Replace `dest` with the run's RLModule and a model card; returns the card's path."""
    run_dir, dest = Path(run_dir), Path(dest)
    module = run_dir / "module"
    if not (module / "class_and_ctor_args.pkl").is_file():
        raise FileNotFoundError(f"{module}: no RLModule to ship (did training finish?)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(module, dest)
    card = dest / "MODEL_CARD.md"
    card.write_text(model_card(run_dir, _folder_bytes(dest)))
    return card


def model_card(run_dir: Path, size_bytes: int) -> str:
    info = json.loads((run_dir / "train.json").read_text())
    cfg = info["config"]
    table = (run_dir / "eval.md").read_text() if (run_dir / "eval.md").exists() else "(none)"
    prior = info.get("prior") or {}
    held_out = ", ".join(cfg["exclude_traces"]) or "none"
    memory = " plus the 14 history features of raysys/agent/rl/history.py" if cfg["history"] else ""
    advised = bool(cfg.get("advisor"))
    advice = (
        " plus the advisor's 17 (raysys/agent/rl/advisor.py: goodput's proposal, one-hot); 18 "
        "logits, the last one 'follow the advisor', the others"
        if advised else "; 17 logits"
    )
    lines = [
        "# Model card: the shipped RL policy (`rl`, raysys/agent/policies/default)",
        "",
        "An RLlib RLModule (`raysys.agent.rl.module.MaskedActorCritic`): two MLP towers "
        f"{cfg['hidden']} (policy, value) over featurize()'s 141 features{memory}{advice} "
        "masked by Guardrails.mask; deterministic masked argmax at decision time. "
        f"{size_bytes / 1024:.0f} KiB on disk.",
        "",
        "## Training",
        "",
        f"- command: `{info.get('command') or command_for(cfg)}`; the same number of PPO "
        f"iterations whatever the machine's speed: `{command_for(cfg, info['iterations'])}`",
        f"- seed: {cfg['seed']}; PPO (RLlib new API stack): {info['iterations']} iterations, "
        f"{info['env_steps']:,} env steps, {info['train_seconds']:.0f} s of PPO, "
        f"{info['total_seconds']:.0f} s in all (2-core machine, one sampling process)",
        f"- scenarios: `{cfg['scenarios']}` (the shipped suite), held-out traces: {held_out}; "
        f"profiles swapped among the suite's: {cfg['swap_profiles']}, lambda x "
        f"{cfg['lambda_scales']}, scenarios as written in {cfg['original_weight']:.0%} of "
        "episodes; ClusterEnv's own randomisation (compute/sync lognormal, event times)",
        f"- reward: -(seconds + lambda * worker-seconds) per interval / {cfg['reward_scale_s']} "
        f"s, progress shaping {cfg['progress_shaping']} (potential-based, same optimum)",
        f"- PPO: lr {cfg['lr']}, gamma {cfg['gamma']}, GAE lambda {cfg['gae_lambda']}, clip "
        f"{cfg['clip_param']}, entropy {cfg['entropy_coeff']}, batch {cfg['train_batch_size']}, "
        f"minibatch {cfg['minibatch_size']}, {cfg['num_epochs']} epochs",
    ]
    if cfg.get("prior") == "advisor":
        lines += [
            "- **advisor prior**: the network was first behaviour-cloned to follow the advisor "
            f"in every state (DAgger rounds {cfg['prior_rounds']}, label smoothing "
            f"{cfg.get('prior_smoothing', 0.0)} over the other allowed actions), i.e. to start "
            "as goodput, then trained by PPO on the objective to deviate where that pays. The "
            "advisor (goodput's online fit) runs at decision time as part of the policy.",
        ]
    elif cfg.get("prior"):
        lines += [
            f"- **heuristic prior**: the network was first behaviour-cloned from the "
            f"`{cfg['prior']}` policy (DAgger rounds {cfg['prior_rounds']}, episodes x share "
            "driven by the student), then trained by PPO on the objective. The teacher is not "
            "used at decision time. Imitation accuracy on the teacher's non-Noop decisions: "
            f"{prior.get('accuracy_on_actions', float('nan')):.3f}.",
        ]
    else:
        lines.append("- no heuristic prior: PPO from a randomly initialised network")
    lines += [
        "",
        "## Evaluation (`raysys agent eval`, seeds 0..N-1, never used in training)",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "Limits and caveats: see docs/agent.md, section \"The RL policy\".",
        "",
    ]
    return "\n".join(lines)


def command_for(cfg: dict, iterations: int | None = None) -> str:
    """The `raysys agent train` line that reproduces a run's configuration."""
    parts = ["raysys agent train", f"--seed {cfg['seed']}"]
    if iterations is None:
        parts.append(f"--minutes {cfg['minutes']:g}")
    else:
        parts.append(f"--iterations {iterations} --minutes 1000")
    parts += [f"--exclude-trace {t}" for t in cfg["exclude_traces"]]
    if cfg.get("keep_excluded_layouts"):
        parts.append("--keep-excluded-layouts")
    parts += [f"--profile-csv {c}" for c in cfg["profile_csvs"]]
    parts.append("--advisor" if cfg.get("advisor", False) else "--no-advisor")
    parts.append(f"--prior {cfg['prior'] or 'none'}")
    return " ".join(parts)


def training_command() -> str:
    if sys.argv[1:2] == ["agent"]:
        return " ".join(["raysys", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])  # e.g. jobs/train_agent.py under ray job submit
