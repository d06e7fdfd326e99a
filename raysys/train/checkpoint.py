"""Durable checkpoints: for losing the driver or the whole cluster, never for rescaling.

A checkpoint is one file `<storage>/<job>/step-<step>.pt` holding model and optimizer state, the
step, the sampler state (seed, partner sizes and per-step batches: with them the samples of every
later step are determined), per-partner counters and, under differential privacy, each
partner's accountant history. It is written to a temporary name and then renamed, so a reader
never sees half a checkpoint, on a local folder or any pyarrow filesystem URI. Beside the
checkpoints, a job under DP keeps `dp-attempts.json`: the step ranges it attempted, numbered, with
the noise of each partner that took part, written before each chunk runs (entries older than
the checkpoint a resume would use are dropped). A resume counts every attempt made after its
checkpoint as a release.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

_NAME = re.compile(r"^step-(\d{9})\.pt$")
_ATTEMPTS = "dp-attempts.json"


@dataclass
class Checkpoint:
    step: int
    state: dict  # Replica.state(): model, optimizer, step
    sampler: dict  # seed, partner sizes, partner batch sizes
    counters: dict  # per partner: samples, skipped steps
    path: str = ""
    # Per DP partner its accountant's history (PartnerPrivacy.state_dict); None in checkpoints
    # written before it was kept.
    privacy: dict | None = None
    # The sequence number the next entry of the attempt journal gets (see write_attempts):
    # entries from it on were attempted after this checkpoint.
    journal_seq: int = 0


def _filesystem(storage_path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in storage_path:
        return pafs.FileSystem.from_uri(storage_path)
    return pafs.LocalFileSystem(), str(Path(storage_path).resolve())


class CheckpointStore:
    def __init__(self, storage_path: str, job: str, keep: int = 2) -> None:
        self.fs, root = _filesystem(storage_path)
        self.dir = f"{root.rstrip('/')}/{job}"
        self.keep = keep

    def save(self, ckpt: Checkpoint) -> str:
        buf = io.BytesIO()
        torch.save({"step": ckpt.step, "state": ckpt.state, "sampler": ckpt.sampler,
                    "counters": ckpt.counters, "privacy": ckpt.privacy,
                    "journal_seq": ckpt.journal_seq}, buf)
        final = self._write(f"step-{ckpt.step:09d}.pt", buf.getvalue())
        self._prune()
        return final

    def _write(self, name: str, data: bytes) -> str:
        """Write `name` in the job's folder under a temporary name, then rename it: atomic on
        POSIX, so readers see the old file or the new one, never half of one."""
        self.fs.create_dir(self.dir, recursive=True)
        final = f"{self.dir}/{name}"
        with self.fs.open_output_stream(f"{final}.tmp") as out:
            out.write(data)
        self.fs.move(f"{final}.tmp", final)
        return final

    def _steps(self) -> list[int]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        except FileNotFoundError:
            return []
        steps = []
        for info in infos:
            m = _NAME.match(Path(info.path).name)
            if m and info.type == pafs.FileType.File:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _prune(self) -> None:
        for step in self._steps()[: -self.keep]:
            self.fs.delete_file(f"{self.dir}/step-{step:09d}.pt")

    def write_attempts(self, attempts: list[list]) -> None:
        """Replace the journal of attempted step ranges (each [seq, first, end, {partner: noise
        multiplier}], seq increasing; a checkpoint's journal_seq tells which came after it),
        atomically; read back by attempts() on resume."""
        self._write(_ATTEMPTS, json.dumps(attempts).encode())

    def attempts(self) -> list[list]:
        """The journal write_attempts left ([] if none)."""
        path = f"{self.dir}/{_ATTEMPTS}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        with self.fs.open_input_stream(path) as f:
            return [[int(q), int(a), int(b), {str(k): float(v) for k, v in p.items()}]
                    for q, a, b, p in json.loads(f.read())]

    def latest_step(self) -> int | None:
        """The step of the checkpoint latest() would return (None without one)."""
        steps = self._steps()
        return steps[-1] if steps else None

    def latest(self) -> Checkpoint | None:
        step = self.latest_step()
        if step is None:
            return None
        path = f"{self.dir}/step-{step:09d}.pt"
        with self.fs.open_input_stream(path) as f:
            data = torch.load(io.BytesIO(f.read()), weights_only=False)
        return Checkpoint(data["step"], data["state"], data["sampler"], data["counters"], path,
                          data.get("privacy"), data.get("journal_seq", 0))
