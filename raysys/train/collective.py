"""Gloo process groups, one per generation of the elastic group.

The controller hosts one TCPStore for the whole job. Each generation (a fixed set of workers with
ranks 0..n-1) rendezvouses under its own key prefix in that store, so re-forming the group after a
rescale needs no new port and no global torch.distributed state: a worker simply drops the old
ProcessGroupGloo object and builds the next one. Every collective carries a timeout, so a dead
or hung peer turns into a CollectiveError instead of a hang.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer of this generation is gone or stuck."""


class StoreServer:
    """The job's rendezvous store, owned by the controller for the whole job."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = free_port()
        self._store = dist.TCPStore(
            host, self.port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class GenerationGroup:
    """This worker's membership in one generation: rank, world size and the gloo group."""

    def __init__(self, generation: int, rank: int, world: int, store_host: str, store_port: int,
                 timeout_s: float) -> None:
        self.generation = generation
        self.rank = rank
        self.world = world
        self.timeout = timedelta(seconds=timeout_s)
        self._pg = None
        if world > 1:
            try:
                client = dist.TCPStore(
                    store_host, store_port, is_master=False, timeout=self.timeout
                )
                store = dist.PrefixStore(f"gen-{generation}/", client)
                self._pg = dist.ProcessGroupGloo(store, rank, world, self.timeout)
            except RuntimeError as exc:
                raise CollectiveError(
                    f"generation {generation}: rendezvous of rank {rank}/{world} failed: {exc}"
                ) from exc

    def all_reduce_sum(self, buckets: list[torch.Tensor]) -> int:
        """Sum each flat bucket across the generation, in place, in one batch of async ops.
        Returns the bytes this worker sent, as a ring all-reduce sends them: 2 (n-1)/n of the
        payload (for the contribution ledger)."""
        if self._pg is None:
            return 0
        try:
            works = [self._pg.allreduce([b]) for b in buckets]
            for w in works:
                w.wait(self.timeout)
        except RuntimeError as exc:
            raise CollectiveError(
                f"generation {self.generation}: all-reduce failed on rank {self.rank}: {exc}"
            ) from exc
        payload = sum(b.numel() * b.element_size() for b in buckets)
        return int(2 * (self.world - 1) / self.world * payload)

    def close(self) -> None:
        self._pg = None
