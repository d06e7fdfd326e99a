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
                 timeout_s: float, secure_partners: list[str] | None = None) -> None:
        """`secure_partners` (the partner of every rank) turns on secure aggregation: keys are
        agreed here, once per generation, so every generation masks with fresh ones."""
        self.generation = generation
        self.rank = rank
        self.world = world
        self.timeout = timedelta(seconds=timeout_s)
        self._pg = None
        self._secure = None
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
            if secure_partners is not None:
                from raysys.privacy.secagg import SecureAggregator

                agg = SecureAggregator()
                agg.setup(store, rank, secure_partners, generation, timeout_s)
                self._secure = agg if agg.masking else None  # one partner: nothing to hide

    def all_reduce_sum(self, buckets: list[torch.Tensor], step: int = 0) -> int:
        """Sum each flat bucket across the generation, in place: plainly, or under secure
        aggregation as masked fixed-point integers (`step` picks the masks). Returns the bytes
        this worker sent, as a ring all-reduce sends them: 2 (n-1)/n of the payload on the wire
        (for the contribution ledger)."""
        if self._pg is None:
            return 0
        if self._secure is not None:
            self._secure.all_reduce_sum(self._all_reduce, buckets, step)
            payload = sum(b.numel() for b in buckets) * 8  # int64 ring elements on the wire
        else:
            self._all_reduce(buckets)
            payload = sum(b.numel() * b.element_size() for b in buckets)
        return int(2 * (self.world - 1) / self.world * payload)

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """One batch of async all-reduce ops, each with the collective timeout."""
        try:
            works = [self._pg.allreduce([t]) for t in tensors]
            for w in works:
                w.wait(self.timeout)
        except RuntimeError as exc:
            raise CollectiveError(
                f"generation {self.generation}: all-reduce failed on rank {self.rank}: {exc}"
            ) from exc

    def close(self) -> None:
        self._pg = None
