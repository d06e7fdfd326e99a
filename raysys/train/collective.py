"""Gloo process groups, one per generation of the elastic group.

The controller hosts one TCPStore for the whole job. Each generation (a fixed set of workers with
ranks 0..n-1) rendezvouses under its own key prefix in that store, so re-forming the group after a
rescale needs no new port and no global torch.distributed state: a worker simply drops the old
ProcessGroupGloo object and builds the next one. Every collective carries a timeout, so a dead
or hung peer turns into a CollectiveError instead of a hang.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
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


class _Gloo:
    """One gloo process group with the collective timeout: in-place sums that turn a failure
    into a CollectiveError. None of it exists for a group of one."""

    def __init__(self, generation: int, rank: int, world: int, store: dist.Store,
                 timeout: timedelta, what: str) -> None:
        self.generation, self.rank, self.world, self.timeout = generation, rank, world, timeout
        self.pg = None
        if world > 1:
            try:
                self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
            except RuntimeError as exc:
                raise CollectiveError(f"generation {generation}: {what} rendezvous of rank "
                                      f"{rank}/{world} failed: {exc}") from exc

    def start(self, tensors: list[torch.Tensor],
              op: dist.ReduceOp = dist.ReduceOp.SUM) -> Callable[[], None]:
        """Start reducing `tensors` in place (sums unless `op` says otherwise), one async op per
        tensor; returns the function that waits for them, with the collective timeout. Failures
        on either side become a CollectiveError."""
        try:
            works = [self.pg.allreduce([t], op) for t in tensors]
        except RuntimeError as exc:
            raise self._error(exc) from exc

        def wait() -> None:
            try:
                for w in works:
                    w.wait(self.timeout)
            except RuntimeError as exc:
                raise self._error(exc) from exc

        return wait

    def all_reduce(self, tensors: list[torch.Tensor]) -> int:
        """Sum `tensors` in place across the group; returns the bytes this rank sent."""
        self.start(tensors)()
        return self.bytes_sent(sum(t.numel() * t.element_size() for t in tensors))

    def _error(self, exc: RuntimeError) -> CollectiveError:
        return CollectiveError(
            f"generation {self.generation}: all-reduce failed on rank {self.rank}: {exc}")

    def bytes_sent(self, payload: int) -> int:
        """What a ring all-reduce of `payload` bytes sends from one rank: 2 (n-1)/n of it."""
        return int(2 * (self.world - 1) / self.world * payload)


class GenerationGroup:
    """This worker's membership in one generation: rank, world size and the gloo group; under
    local SGD also a group of its own partner's workers (ranks of one partner are contiguous)."""

    def __init__(self, generation: int, rank: int, world: int, store_host: str, store_port: int,
                 timeout_s: float, partners: list[str] | None = None, secure: bool = False,
                 partner_group: bool = False, cross_partner_delay_s: float = 0.0,
                 mask_neighbours: int | None = None) -> None:
        """`partners` is the partner of every rank. `secure` turns on secure aggregation for
        the global group: keys are agreed here, once per generation, so every generation masks
        with fresh ones; `mask_neighbours` picks its sparse mask graph (see
        raysys.privacy.secagg.mask_peers; None: every peer of another partner).
        `partner_group` also forms the partner-local group (local_sgd): plain float sums, no
        delay (one site), no masks (one data owner). `cross_partner_delay_s`
        (testing aid) delays every global all-reduce that spans partners, emulating a slow
        inter-site link."""
        if (secure or partner_group) and (partners is None or len(partners) != world):
            raise ValueError("secure aggregation and partner groups need the partner of every rank")
        self.generation = generation
        self.rank = rank
        self.world = world
        timeout = timedelta(seconds=timeout_s)
        self._global: _Gloo | None = None
        self._local: _Gloo | None = None
        self._secure = None
        spans_partners = partners is None or len(set(partners)) > 1
        self._delay_s = cross_partner_delay_s if spans_partners else 0.0
        if world == 1:
            return
        try:
            client = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        except RuntimeError as exc:
            raise CollectiveError(
                f"generation {generation}: rendezvous of rank {rank}/{world} failed: {exc}"
            ) from exc
        store = dist.PrefixStore(f"gen-{generation}/", client)
        self._global = _Gloo(generation, rank, world, store, timeout, "job-wide")
        if secure:
            from raysys.privacy.secagg import SecureAggregator

            agg = SecureAggregator()
            agg.setup(store, rank, partners, generation, timeout_s, mask_neighbours)
            self._secure = agg if agg.masking else None  # one partner: nothing to hide
        if partner_group:
            mine = [r for r, p in enumerate(partners) if p == partners[rank]]
            local_store = dist.PrefixStore(f"gen-{generation}/partner-{partners[rank]}/", client)
            self._local = _Gloo(generation, mine.index(rank), len(mine), local_store, timeout,
                                "partner")

    def all_reduce_sum(self, buckets: list[torch.Tensor], step: int = 0) -> int:
        """Sum each flat bucket across the generation, in place: plainly, or under secure
        aggregation as masked fixed-point integers (`step` picks the masks). Returns the bytes
        this worker sent, as a ring all-reduce sends them: 2 (n-1)/n of the payload on the wire
        (for the contribution ledger)."""
        if self._global is None:
            return 0
        if self._delay_s:
            time.sleep(self._delay_s)
        if self._secure is not None:
            self._secure.all_reduce_sum(self._global.start, buckets, step)
            return self._global.bytes_sent(self._secure.last_payload_bytes)
        return self._global.all_reduce(buckets)

    @property
    def masked_peers(self) -> tuple[int, ...]:
        """Ranks this worker masks its contribution with (none without secure aggregation)."""
        return self._secure.masked_peers if self._secure is not None else ()

    def partner_all_reduce_sum(self, buckets: list[torch.Tensor]) -> int:
        """Sum across this worker's own partner only (local SGD steps); returns bytes sent."""
        if self._local is None or self._local.pg is None:
            return 0
        return self._local.all_reduce(buckets)

    def close(self) -> None:
        if self._secure is not None:
            self._secure.close()  # stops masks being drawn ahead for a step that never comes
        self._global = None
        self._local = None
