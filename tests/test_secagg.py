"""Secure aggregation (raysys/privacy/secagg.py) over real gloo groups.

Ranks are threads of this process, each with its own ProcessGroupGloo over a shared HashStore or
a TCPStore (as workers use), so the tests exercise real integer all-reduces without Ray and
without spawning processes.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from raysys.privacy import secagg
from raysys.privacy.secagg import (
    STATUS_SLOTS,
    MaskReuseError,
    SecAggSetupError,
    SecureAggregator,
)
from raysys.train.collective import CollectiveError, GenerationGroup, StoreServer, _Gloo
from raysys.train.replica import Replica, ReplicaConfig

stats = pytest.importorskip("scipy.stats")

TIMEOUT_S = 20.0


def run_ranks(world: int, target: Callable[[int], object],
              timeout_s: float = 60.0) -> tuple[list, list[BaseException | None]]:
    """Run target(rank) for every rank in its own thread; (results, exceptions) by rank."""
    results: list = [None] * world
    errors: list[BaseException | None] = [None] * world

    def wrap(rank: int) -> None:
        try:
            results[rank] = target(rank)
        except BaseException as exc:  # handed to the test to assert on
            errors[rank] = exc

    threads = [threading.Thread(target=wrap, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


def ok(results_errors: tuple[list, list[BaseException | None]]) -> list:
    results, errors = results_errors
    for e in errors:
        if e is not None:
            raise e
    return results


def make_buckets(seed: int, sizes: list[int], n_samples: int = 32) -> list[torch.Tensor]:
    """Gradient-like buckets, magnitudes from 1e-6 to 1e2, ending in Replica's tail
    [loss_sum, loss_samples, samples]."""
    g = torch.Generator().manual_seed(seed)
    buckets = []
    for n in sizes:
        magnitude = 10.0 ** (torch.rand(n, generator=g) * 8 - 6)
        buckets.append((torch.randn(n, generator=g) * magnitude).float())
    buckets[-1][-3] = 57.125 + seed  # loss sum
    buckets[-1][-2] = float(n_samples)  # samples whose loss is in the loss sum
    buckets[-1][-1] = float(n_samples)
    return buckets


class Capture:
    """A StartAllReduce that records what this rank put on the ring before summing it (`sent`,
    in the order sent) and what it sent to the scale agreement (`agreed`, the
    MAX all-reduce)."""

    def __init__(self, start: Callable[..., Callable[[], None]]) -> None:
        self.start = start
        self.sent: list[torch.Tensor] = []
        self.agreed: list[torch.Tensor] = []

    def __call__(self, tensors: list[torch.Tensor],
                 op: dist.ReduceOp = dist.ReduceOp.SUM) -> Callable[[], None]:
        if op == dist.ReduceOp.SUM:
            self.sent += [t.clone() for t in tensors]
        else:
            self.agreed = [t.clone() for t in tensors]
        return self.start(tensors, op)

    def by_bucket(self, sizes: list[int]) -> list[torch.Tensor]:
        """What was sent, as whole buckets (the last one ends in the status slots)."""
        return list(torch.cat(self.sent).split([*sizes[:-1], sizes[-1] + STATUS_SLOTS]))


def secure_sum(store: dist.Store, generation: int, rank: int, partners: list[str],
               buckets: list[torch.Tensor], step: int = 0, wire_bits: int | None = None,
               neighbours: int | None = None,
               ) -> tuple[list[torch.Tensor], SecureAggregator, Capture]:
    """One rank: join generation `generation`, agree keys, securely sum a copy of `buckets`."""
    prefixed = dist.PrefixStore(f"gen-{generation}/", store)
    group = _Gloo(generation, rank, len(partners), prefixed, timedelta(seconds=TIMEOUT_S), "test")
    agg = SecureAggregator(wire_bits)
    agg.setup(prefixed, rank, partners, generation, TIMEOUT_S, neighbours)
    capture = Capture(group.start)
    out = [b.clone() for b in buckets]
    agg.all_reduce_sum(capture, out, step)
    return out, agg, capture


def reference_sum(inputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(b[i].double() for b in inputs) for i in range(len(inputs[0]))]


def segments(buckets: list[torch.Tensor]) -> list[torch.Tensor]:
    """What shares one scale: every bucket's gradients, then the loss sum, then the counts."""
    *front, last = buckets
    return [*front, last[:-3], last[-3:-2], last[-2:]]


def assert_within_quantization(out: list[torch.Tensor], ref: list[torch.Tensor],
                               agg: SecureAggregator | SimpleNamespace) -> None:
    """Each worker rounds to a step of 2^(e - P) of its segment (error <= half a step), then the
    float32 result rounds once more (relative 2^-24)."""
    pairs = zip(segments(out), segments(ref), agg.last_exponents, strict=True)
    for o, r, exponent in pairs:
        largest = float(r.abs().max())
        assert largest < agg.world * 2.0**exponent  # each rank's values are below 2^e
        step = 2.0 ** (exponent - agg.precision_bits)
        bound = agg.world * step / 2 + r.abs() * 2.0**-24 + 1e-30
        assert ((o.double() - r).abs() <= bound).all(), float((o.double() - r).abs().max())


def top_byte_uniformity(values: torch.Tensor, ring_bits: int) -> float:
    """p-value of a chi-square test that the top 8 bits of ring values are uniform."""
    top = (values.long() >> (ring_bits - 8)).numpy()
    counts = torch.bincount(torch.from_numpy(top), minlength=256).numpy()
    assert counts.size == 256, "values outside the ring"
    return float(stats.chisquare(counts).pvalue)


def ks_uniformity(values: torch.Tensor, ring_bits: int) -> float:
    return float(stats.kstest(values.double().numpy() / 2.0**ring_bits, "uniform").pvalue)


# -- (1) the aggregate is the float sum, within quantization error -----------------------------
@pytest.mark.parametrize("partners", [["a", "b"], ["a", "a", "b"], ["a", "b", "c", "d"]])
def test_aggregate_equals_float_sum(partners: list[str]) -> None:
    world = len(partners)
    sizes = [1000, 37, 513]
    inputs = [make_buckets(r, sizes) for r in range(world)]
    store = dist.HashStore()
    results = ok(run_ranks(world, lambda r: secure_sum(store, 1, r, partners, inputs[r])))
    ref = reference_sum(inputs)
    for out, agg, capture in results:
        assert agg.masking
        # Never the floats themselves; a 32-bit wire: the bytes of the plain float all-reduce.
        assert all(t.dtype == torch.int32 for t in capture.sent)
        assert sum(t.numel() for t in capture.sent) == sum(sizes) + STATUS_SLOTS
        assert_within_quantization(out, ref, agg)
        assert out[-1][-2:].tolist() == [32.0 * world] * 2  # the sample counts are exact
        assert abs(float(out[-1][-3]) - float(ref[-1][-3])) < 1e-4  # loss sum
        assert agg.last_nonfinite == 0
    # Every rank decodes the same aggregate.
    for out, _, _ in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][0], strict=True))


def test_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets are encoded and masked in cache-sized chunks; sizes around a chunk boundary,
    including a last chunk that holds only the status slots."""
    monkeypatch.setattr(secagg, "CHUNK", 64)
    partners = ["a", "b", "c"]
    sizes = [200, 63, 64, 130]  # the last bucket's last 2 values start a chunk of their own
    inputs = [make_buckets(r, sizes) for r in range(3)]
    store = dist.HashStore()
    results = ok(run_ranks(3, lambda r: secure_sum(store, 1, r, partners, inputs[r], step=2)))
    for out, agg, _ in results:
        assert_within_quantization(out, reference_sum(inputs), agg)
        assert float(out[-1][-1]) == 96.0
    agg, sent = results[0][1], results[0][2].by_bucket(sizes)
    for i, n in enumerate([*sizes[:-1], sizes[-1] + STATUS_SLOTS]):
        expected = (agg.encode(inputs[0])[i] + agg.pair_mask(1, 2, i, n)
                    + agg.pair_mask(2, 2, i, n)) & ((1 << agg.ring_bits) - 1)
        assert torch.equal(sent[i], expected)


def test_training_through_generation_group_matches_plain() -> None:
    """The worker's wiring: Replica + GenerationGroup over the controller's TCPStore."""
    server = StoreServer("127.0.0.1")
    partners = ["alpha", "beta"]
    cfg = ReplicaConfig("mlp", {"hidden": [16]}, 8, 3, 0, "sgd", 0.1, 0.9, 0.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5 + r, 8, generator=g), torch.randint(0, 3, (5 + r,), generator=g))
            for r in range(2)]

    def train(rank: int, secure: bool, generation: int, replica: Replica) -> torch.Tensor:
        group = GenerationGroup(generation, rank, 2, *server.address, TIMEOUT_S, partners,
                                secure=secure)
        values = sum(b.numel() for b in replica.buckets)
        for step in range(4):
            replica.local_gradients(*data[rank])
            sent = group.all_reduce_sum(replica.buckets, replica.step)
            # A 32-bit wire: the plain float bytes plus 2 status words, and on a generation's
            # first step the scale agreement (one int64 per segment).
            extra = (4 * STATUS_SLOTS + (8 * (len(replica.buckets) + 2) if step == 0 else 0)
                     if secure else 0)
            assert sent == int(2 * (2 - 1) / 2 * (4 * values + extra))
            assert replica.apply()[1] == 11
        return replica.flat_parameters()

    # Replicas are built here, one after the other: build_model seeds torch's global RNG, which
    # threads building at the same time would share.
    plain_replicas = [Replica(cfg) for _ in range(2)]
    secure_replicas = [Replica(cfg) for _ in range(2)]
    plain = ok(run_ranks(2, lambda r: train(r, False, 1, plain_replicas[r])))
    secure = ok(run_ranks(2, lambda r: train(r, True, 2, secure_replicas[r])))
    assert torch.equal(secure[0], secure[1])
    assert torch.allclose(secure[0], plain[0], atol=1e-5), (secure[0] - plain[0]).abs().max()


# -- (2) one masked contribution looks uniform over the ring ----------------------------------
def test_masked_contribution_is_uniform_and_encoding_is_not() -> None:
    partners = ["a", "b", "c"]
    inputs = [[torch.randn(1 << 16, generator=torch.Generator().manual_seed(r)) * 0.01]
              for r in range(3)]
    for b in inputs:
        b[0][-1] = 16.0
    store = dist.HashStore()
    results = ok(run_ranks(3, lambda r: secure_sum(store, 3, r, partners, inputs[r])))
    sent = [capture.sent[0] for _, _, capture in results]
    bits = results[0][1].ring_bits
    ring = 1 << bits
    # What rank 0 put on the ring, and a partial sum an observer of the ring may see.
    for values in (sent[0], (sent[0] + sent[1]) & (ring - 1)):
        assert top_byte_uniformity(values, bits) > 1e-6
        assert ks_uniformity(values, bits) > 1e-6
    # The control: the same statistics reject the unmasked encoding outright, so the checks
    # above would fail if masks were off.
    plain = results[0][1].encode(inputs[0])[0]
    assert plain.min() >= 0 and plain.max() < ring
    assert top_byte_uniformity(plain, bits) < 1e-12
    assert ks_uniformity(plain, bits) < 1e-12
    # All that travels unmasked is the scale agreement of a generation's first step: one
    # exponent per segment (gradients, loss sum, counts), small integers.
    agreed = results[0][2].agreed
    mine = inputs[0][0]
    assert len(agreed) == 1 and agreed[0].tolist() == [
        math.frexp(float(mine[:-3].abs().max()))[1], math.frexp(float(mine[-3].abs()))[1],
        5]  # 16 < 2^5


def test_later_steps_reuse_the_aggregates_scale_and_redo_a_step_that_outgrows_it() -> None:
    """Only a generation's first step runs the scale agreement; later steps scale from the last
    aggregate (public to every rank) with headroom. A rank whose values outgrow that scale makes
    the step go again at agreed scales, under fresh masks, and the sum is still right."""
    partners = ["a", "b"]
    # Step 1 looks like step 0; at step 2 rank 1's gradients are 1000x larger.
    steps = [[make_buckets(10 * t + r, [300, 40]) for r in range(2)] for t in range(3)]
    for b in steps[2][1][:1]:
        b.mul_(1000.0)
    store = dist.HashStore()

    def three_steps(rank: int) -> list:
        prefixed = dist.PrefixStore("gen-1/", store)
        start = _Gloo(1, rank, 2, prefixed, timedelta(seconds=TIMEOUT_S), "test").start
        agg = SecureAggregator()
        agg.setup(prefixed, rank, partners, 1, TIMEOUT_S)
        seen = []
        for t, inputs in enumerate(steps):
            capture = Capture(start)
            out = [b.clone() for b in inputs[rank]]
            agg.all_reduce_sum(capture, out, t)
            seen.append((out, len(capture.agreed), len(capture.sent), agg.redone_steps,
                         list(agg.last_exponents)))
        return seen

    results = ok(run_ranks(2, three_steps))
    for t, inputs in enumerate(steps):
        out, agreed, sent, redone, exponents = results[0][t]
        assert all(torch.equal(a, b) for a, b in zip(results[1][t][0], out, strict=True))
        scales = SimpleNamespace(world=2, precision_bits=26, last_exponents=exponents)
        assert_within_quantization(out, reference_sum(inputs), scales)
        # step 0: agreed; step 1: cached, one sum; step 2: cached, overflowed, agreed, resent.
        assert (agreed, sent, redone) == [(1, 2, 0), (0, 2, 0), (1, 4, 1)][t]
    # The cached scale of step 1 came from step 0's aggregate, with HEADROOM_BITS of room.
    step0_max = float(reference_sum(steps[0])[0].abs().max())
    assert results[0][1][4][0] == math.frexp(step0_max)[1] + secagg.HEADROOM_BITS


# -- (3) re-keying ------------------------------------------------------------------------------
def test_new_generation_new_keys_new_masks() -> None:
    partners = ["a", "b"]
    inputs = [make_buckets(r, [4096]) for r in range(2)]
    store = dist.HashStore()
    gen1 = ok(run_ranks(2, lambda r: secure_sum(store, 1, r, partners, inputs[r], step=7)))
    gen2 = ok(run_ranks(2, lambda r: secure_sum(store, 2, r, partners, inputs[r], step=7)))
    n = 4096 + STATUS_SLOTS
    m1 = gen1[0][1].pair_mask(1, 7, 0, n)
    m2 = gen2[0][1].pair_mask(1, 7, 0, n)
    # Both ends of a pair derive the same mask; a new generation derives a different one.
    assert torch.equal(m1, gen1[1][1].pair_mask(0, 7, 0, n))
    assert torch.equal(m2, gen2[1][1].pair_mask(0, 7, 0, n))
    assert (m1 != m2).float().mean() > 0.99
    # Same step, same gradients, different generation: different bytes on the ring.
    assert (gen1[0][2].sent[0] != gen2[0][2].sent[0]).float().mean() > 0.99
    # Another step or bucket of the same generation: another mask too.
    assert (m1 != gen1[0][1].pair_mask(1, 8, 0, n)).float().mean() > 0.99
    assert (m1 != gen1[0][1].pair_mask(1, 7, 1, n)).float().mean() > 0.99
    for out, agg, _ in gen1 + gen2:
        assert_within_quantization(out, reference_sum(inputs), agg)


def test_a_mask_is_aes_128_ctr_from_the_step_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keystream, derived here with OpenSSL independently of the aggregator: AES-128-CTR
    under the pair key from the counter block be64(step) || be64(attempt << 60 | bucket << 44),
    read as little-endian words, across chunks. Peers on two versions of this would not cancel
    each other's masks."""
    monkeypatch.setattr(secagg, "CHUNK", 64)
    partners = ["a", "b"]
    inputs = [make_buckets(r, [300]) for r in range(2)]
    store = dist.HashStore()
    aggs = [agg for _, agg, _ in ok(run_ranks(2, lambda r: secure_sum(store, 1, r, partners,
                                                                      inputs[r])))]
    key = aggs[0]._pair_keys[1].key
    assert len(key) == 16 and key == aggs[1]._pair_keys[0].key
    numel = 2 * 64 + 2  # two whole chunks and two words of a third
    counter = struct.pack(">QQ", 5, 1 << 60 | 3 << 44)
    stream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor().update(bytes(4 * numel))
    expected = torch.from_numpy(np.frombuffer(stream, dtype="<i4").copy()) & (
        (1 << aggs[0].ring_bits) - 1)
    assert torch.equal(aggs[0].pair_mask(1, 5, 3, numel, attempt=1), expected)


@pytest.mark.parametrize("lanes", [(4, 0, 2), (1, 2, 0)])
def test_ranks_drawing_masks_differently_still_cancel(monkeypatch: pytest.MonkeyPatch,
                                                      lanes: tuple[int, ...]) -> None:
    """Ranks on different CPUs draw the keystream with different code (512-, 256-, 128-bit AES
    instructions, or OpenSSL): the masks are the same, so the sum is still right."""
    by_thread: dict[str, int] = {}

    def lanes_of_this_rank() -> int:
        return by_thread[threading.current_thread().name]

    monkeypatch.setattr(secagg, "default_lanes", lanes_of_this_rank)
    partners = ["a", "b", "c"]
    inputs = [make_buckets(r, [500, 70]) for r in range(3)]
    store = dist.HashStore()

    def rank(r: int) -> tuple:
        by_thread[threading.current_thread().name] = lanes[r]
        return secure_sum(store, 1, r, partners, inputs[r])

    for r, (out, agg, _) in enumerate(ok(run_ranks(3, rank))):
        assert agg._lanes == lanes[r]
        assert_within_quantization(out, reference_sum(inputs), agg)


def test_a_step_is_never_masked_twice_in_a_generation() -> None:
    partners = ["a", "b"]
    inputs = [make_buckets(r, [64]) for r in range(2)]
    store = dist.HashStore()

    def twice(rank: int) -> None:
        _, agg, capture = secure_sum(store, 4, rank, partners, inputs[rank], step=3)
        with pytest.raises(MaskReuseError, match="step 3 was already masked"):
            agg.all_reduce_sum(capture, [b.clone() for b in inputs[rank]], 3)

    ok(run_ranks(2, twice))


# -- (4) who masks whom -------------------------------------------------------------------------
def test_same_partner_pairs_unmasked_cross_partner_pairs_masked() -> None:
    partners = ["a", "a", "b", "b"]
    inputs = [make_buckets(r, [2048]) for r in range(4)]
    store = dist.HashStore()
    results = ok(run_ranks(4, lambda r: secure_sum(store, 1, r, partners, inputs[r], step=5)))
    aggs = [agg for _, agg, _ in results]
    assert [a.masked_peers for a in aggs] == [(2, 3), (2, 3), (0, 1), (0, 1)]
    n = 2048 + STATUS_SLOTS
    assert aggs[0].pair_mask(1, 5, 0, n) is None and aggs[2].pair_mask(3, 5, 0, n) is None
    for i, j in [(0, 2), (0, 3), (1, 2), (1, 3)]:
        assert torch.equal(aggs[i].pair_mask(j, 5, 0, n), aggs[j].pair_mask(i, 5, 0, n))
    # What rank 0 sent is exactly its encoding plus m_02 + m_03 (it is the lower rank of both
    # pairs): no mask with rank 1, its own partner's worker.
    ring = 1 << aggs[0].ring_bits
    encoded = aggs[0].encode(inputs[0])[0]
    expected = (encoded + aggs[0].pair_mask(2, 5, 0, n) + aggs[0].pair_mask(3, 5, 0, n)) & (
        ring - 1)
    assert torch.equal(results[0][2].sent[0], expected)
    # And rank 2 subtracts the masks it shares with the lower ranks 0 and 1.
    encoded = aggs[2].encode(inputs[2])[0]
    expected = (encoded - aggs[2].pair_mask(0, 5, 0, n) - aggs[2].pair_mask(1, 5, 0, n)) & (
        ring - 1)
    assert torch.equal(results[2][2].sent[0], expected)
    assert_within_quantization(results[0][0], reference_sum(inputs), aggs[0])


LAYOUTS = [list("abcdefgh"), ["a"] * 6 + ["b"], ["a", "a", "b", "b"], list("aaaabbbb"),
           list("abacabad"), list("aabbbccccd"), ["a", "b"]]


@pytest.mark.parametrize("neighbours", [1, 2, 3])
@pytest.mark.parametrize("partners", LAYOUTS, ids="".join)
def test_sparse_mask_graph_is_symmetric_cross_partner_and_connected(
        partners: list[str], neighbours: int) -> None:
    """What makes a sparse graph safe against observers: both ends of every edge mask, only
    across partners, and no strict subset of the ranks is closed (its partial sum would be
    unmasked)."""
    world = len(partners)
    graph = {r: secagg.mask_peers(partners, r, neighbours) for r in range(world)}
    full = {r: secagg.mask_peers(partners, r) for r in range(world)}
    for r, peers in graph.items():
        assert set(peers) <= set(full[r])  # cross-partner pairs only
        assert all(r in graph[j] for j in peers)  # symmetric
        assert peers  # every rank masked
    reached, frontier = {0}, [0]
    while frontier:
        for j in graph[frontier.pop()]:
            if j not in reached:
                reached.add(j)
                frontier.append(j)
    assert reached == set(range(world))
    if len(set(partners)) == world:  # distinct partners: d after and d before
        assert all(len(p) == min(2 * neighbours, world - 1) for p in graph.values())


def test_sparse_masking_sums_right_and_masks_only_along_the_graph() -> None:
    partners = list("abcdef")
    sizes = [4096, 300]
    inputs = [make_buckets(r, sizes) for r in range(6)]
    store = dist.HashStore()
    results = ok(run_ranks(6, lambda r: secure_sum(store, 1, r, partners, inputs[r], step=4,
                                                   neighbours=1)))
    aggs = [agg for _, agg, _ in results]
    assert [a.masked_peers for a in aggs] == [(1, 5), (0, 2), (1, 3), (2, 4), (3, 5), (0, 4)]
    for out, agg, _ in results:
        assert_within_quantization(out, reference_sum(inputs), agg)
    # Rank 2 sent its encoding - m_21 + m_23, no mask with anyone else.
    ring = 1 << aggs[2].ring_bits
    n = sizes[-1] + STATUS_SLOTS
    sent = results[2][2].by_bucket(sizes)[-1]
    expected = (aggs[2].encode(inputs[2])[-1] - aggs[2].pair_mask(1, 4, 1, n)
                + aggs[2].pair_mask(3, 4, 1, n)) & (ring - 1)
    assert torch.equal(sent, expected)
    assert aggs[2].pair_mask(0, 4, 1, n) is None
    # A partial sum of neighbours on the ring (ranks 1-3, as a ring all-reduce forms them)
    # still has edges leaving it (to 0 and 4): uniform, while their encodings are not.
    first = [results[r][2].sent[0] for r in (1, 2, 3)]
    partial = sum(first) & (ring - 1)
    assert top_byte_uniformity(partial, aggs[0].ring_bits) > 1e-6
    plain = sum(aggs[r].encode(inputs[r])[0].clone() for r in (1, 2, 3)) & (ring - 1)
    assert top_byte_uniformity(plain, aggs[0].ring_bits) < 1e-12


def test_one_partner_needs_no_masks() -> None:
    partners = ["a", "a", "a"]
    inputs = [make_buckets(r, [100, 50]) for r in range(3)]
    store = dist.HashStore()
    results = ok(run_ranks(3, lambda r: secure_sum(store, 1, r, partners, inputs[r])))
    ref = [sum(b[i] for b in inputs) for i in range(2)]  # the plain float sum
    for out, agg, capture in results:
        assert not agg.masking and agg.masked_peers == ()
        assert all(t.dtype == torch.float32 for t in capture.sent)
        assert all(torch.allclose(o, r) for o, r in zip(out, ref, strict=True))


def test_a_mislabeled_peer_is_rejected() -> None:
    store = dist.HashStore()

    def setup(rank: int) -> None:
        # Rank 1 claims partner "a" in its key; the plan says "b".
        plan = ["a", "b"] if rank == 0 else ["a", "a"]
        SecureAggregator().setup(store, rank, plan, 1, 2.0)

    _, errors = run_ranks(2, setup)
    assert isinstance(errors[0], SecAggSetupError)
    assert "rank 1 published a key for partner 'a', the plan says 'b'" in str(errors[0])


# -- (5) dropout: a missing peer times out clearly; survivors re-key and sum correctly ----------
def test_missing_peer_times_out_then_survivors_sum_in_a_new_generation() -> None:
    server = StoreServer("127.0.0.1")
    partners = ["a", "b", "c"]
    inputs = [make_buckets(r, [300, 20]) for r in range(3)]

    def client() -> dist.TCPStore:  # one per rank, as each worker has its own
        return dist.TCPStore(*server.address, is_master=False, timeout=timedelta(seconds=10))

    aggs = [SecureAggregator() for _ in range(2)]

    def join_without_rank_2(rank: int) -> None:
        store = dist.PrefixStore("gen-5/", client())
        aggs[rank].setup(store, rank, partners, 5, timeout_s=0.5)

    t0 = time.monotonic()
    _, errors = run_ranks(2, join_without_rank_2)  # rank 2 died before publishing its key
    assert time.monotonic() - t0 < 10
    for e in errors:
        assert isinstance(e, SecAggSetupError) and isinstance(e, CollectiveError)
        assert "generation 5" in str(e) and "ranks [2]" in str(e) and "timed out" in str(e)
    for agg in aggs:  # a failed setup leaves no half-agreed keys behind
        assert agg.generation is None and not agg.masking
        with pytest.raises(CollectiveError, match="setup"):
            agg.all_reduce_sum(lambda ts: None, inputs[0], 0)

    survivors = partners[:2]
    results = ok(run_ranks(2, lambda r: secure_sum(client(), 6, r, survivors, inputs[r])))
    for rank, (out, agg, _) in enumerate(results):
        assert agg.generation == 6 and agg.masked_peers == (1 - rank,)
        assert_within_quantization(out, reference_sum(inputs[:2]), agg)


def test_peer_lost_mid_step_fails_the_step_then_survivors_re_key() -> None:
    store = dist.HashStore()
    partners = ["a", "b", "c"]
    inputs = [make_buckets(r, [256]) for r in range(3)]
    timeout = timedelta(seconds=2)

    def step_with_a_dead_peer(rank: int) -> torch.Tensor:
        prefixed = dist.PrefixStore("gen-8/", store)
        group = _Gloo(8, rank, 3, prefixed, timeout, "test")
        agg = SecureAggregator()
        agg.setup(prefixed, rank, partners, 8, TIMEOUT_S)
        if rank == 2:
            return agg.pair_mask(0, 0, 0, 256)  # joined, then dies before the all-reduce
        agg.all_reduce_sum(group.start, [b.clone() for b in inputs[rank]], 0)
        return None

    t0 = time.monotonic()
    _, errors = run_ranks(3, step_with_a_dead_peer)
    assert time.monotonic() - t0 < 30
    assert errors[2] is None
    assert all(isinstance(e, RuntimeError) for e in errors[:2])  # GenerationGroup: CollectiveError
    # The step is re-run by the survivors in generation 9: fresh keys, correct sum.
    results = ok(run_ranks(2, lambda r: secure_sum(store, 9, r, partners[:2], inputs[r])))
    for out, agg, _ in results:
        assert_within_quantization(out, reference_sum(inputs[:2]), agg)


# -- range and non-finite values ----------------------------------------------------------------
@pytest.mark.parametrize("wire_bits", [32, 64])
def test_scales_follow_the_values_from_tiny_to_huge(wire_bits: int) -> None:
    """Nothing is clipped whatever the magnitude: each segment is scaled to its largest value
    in the group. A bucket of 1e12-sized values, one of 1e-20-sized values, and a 1e9 loss sum
    all come back within quantization error, and the sample counts stay exact."""
    partners = ["a", "b", "c"]
    inputs = [make_buckets(r, [500, 64]) for r in range(3)]
    for r, b in enumerate(inputs):
        b[0].mul_(1e12 * (r + 1))
        b[1][:-3].mul_(1e-20)
        b[1][-3] = 1e9 + r
    store = dist.HashStore()
    results = ok(run_ranks(3, lambda r: secure_sum(store, 1, r, partners, inputs[r],
                                                   wire_bits=wire_bits)))
    ref = reference_sum(inputs)
    for out, agg, capture in results:
        assert capture.sent[0].dtype == (torch.int32 if wire_bits == 32 else torch.int64)
        assert agg.precision_bits == (26 if wire_bits == 32 else 58)
        assert_within_quantization(out, ref, agg)
        assert out[1][-2:].tolist() == [96.0, 96.0]
        assert agg.last_nonfinite == 0


def test_non_finite_gradient_poisons_the_step_like_the_plain_sum() -> None:
    partners = ["a", "b"]
    inputs = [make_buckets(r, [64, 16]) for r in range(2)]
    inputs[1][0][5] = float("nan")
    store = dist.HashStore()
    results = ok(run_ranks(2, lambda r: secure_sum(store, 1, r, partners, inputs[r])))
    for out, agg, _ in results:
        assert agg.last_nonfinite == 1
        assert torch.isnan(out[0]).all() and torch.isnan(out[1][:-2]).all()
        # The sample counts survive for apply() and the reports; the loss sum is NaN.
        assert out[1][-2:].tolist() == [64.0, 64.0]


def test_setup_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="at most 127 workers"):
        SecureAggregator().setup(dist.HashStore(), 0, [str(i) for i in range(128)], 1, 1.0)
    with pytest.raises(ValueError, match="a 32-bit wire supports at most 15 workers"):
        SecureAggregator(32).setup(dist.HashStore(), 0, [str(i) for i in range(16)], 1, 1.0)
    with pytest.raises(ValueError, match="wire_bits must be 32 or 64"):
        SecureAggregator(16)
    with pytest.raises(ValueError, match="rank 2 outside"):
        SecureAggregator().setup(dist.HashStore(), 2, ["a", "b"], 1, 1.0)
    with pytest.raises(CollectiveError, match="setup"):
        SecureAggregator().all_reduce_sum(lambda ts: None, [torch.zeros(3)], 0)
    # Joining one generation twice would leave peers holding the first key: refused.
    store = dist.HashStore()
    SecureAggregator().setup(store, 0, ["a", "a"], 3, 1.0)
    with pytest.raises(SecAggSetupError, match="rank 0 already published a key"):
        SecureAggregator().setup(store, 0, ["a", "a"], 3, 1.0)


WARM_CHECK = """
import torch.distributed as dist
from raysys.privacy.ringcodec import decode_into, encode_into
from raysys.privacy.secagg import SecureAggregator
import tests.test_secagg as t

assert not encode_into.signatures and not decode_into.signatures  # a fresh process
SecureAggregator.warm()
warmed = (list(encode_into.signatures), list(decode_into.signatures))
assert len(warmed[0]) == 2 and len(warmed[1]) == 2, warmed  # int32 and int64 words
for wire_bits in (32, 64):
    inputs = [t.make_buckets(r, [300, 40]) for r in range(2)]
    store = dist.HashStore()
    t.ok(t.run_ranks(2, lambda r: t.secure_sum(store, 1, r, ["a", "b"], inputs[r],
                                                wire_bits=wire_bits)))
assert (list(encode_into.signatures), list(decode_into.signatures)) == warmed
print("warm ok")
"""


def test_warm_readies_exactly_the_kernels_a_step_uses() -> None:
    """Workers of a secure job call warm() while loading so that their first step compiles
    nothing: in a fresh process, after warm(), steps on both wires add no kernel
    specialisation (in this process earlier tests have already compiled them)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", WARM_CHECK], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "warm ok" in done.stdout, done.stdout + done.stderr


# -- masks drawn ahead ----------------------------------------------------------------------------
def run_steps(store: dist.Store, rank: int, partners: list[str], steps: list[int],
              inputs: list[list[list[torch.Tensor]]],
              draw_delay_s: float = 0.0) -> tuple[list, SecureAggregator]:
    """One rank of a generation summing inputs[t][rank] at step number steps[t]; per step
    (output, what was sent, steps_masked_ahead so far, its encoding w/o masks, its scales),
    and the aggregator (still set up: close it). `draw_delay_s` holds up every drawing of
    masks ahead, so that a step arrives while its masks are still being drawn."""
    prefixed = dist.PrefixStore("gen-1/", store)
    start = _Gloo(1, rank, len(partners), prefixed, timedelta(seconds=TIMEOUT_S), "test").start
    agg = SecureAggregator()
    agg.setup(prefixed, rank, partners, 1, TIMEOUT_S)
    if draw_delay_s:
        draw = agg._mask

        def slow_draw(*args, **kwargs):
            if kwargs.get("into") or len(args) > 3:
                time.sleep(draw_delay_s)
            return draw(*args, **kwargs)
        agg._mask = slow_draw
    seen = []
    for step, step_inputs in zip(steps, inputs, strict=True):
        capture = Capture(start)
        out = [b.clone() for b in step_inputs[rank]]
        agg.all_reduce_sum(capture, out, step)
        encoding = [e.clone() for e in agg.encode(step_inputs[rank])]
        seen.append((out, capture.sent, agg.steps_masked_ahead, encoding,
                     list(agg.last_exponents)))
    return seen, agg


def expected_send(agg: SecureAggregator, rank: int, step: int, encoding: list[torch.Tensor],
                  attempt: int = 0) -> list[torch.Tensor]:
    """A rank's encoding plus its pair masks of (step, attempt), bucket by bucket."""
    ring = (1 << agg.ring_bits) - 1
    return [(enc + sum(agg.pair_mask(j, step, i, enc.numel(), attempt) * (1 if j > rank else -1)
                       for j in agg.masked_peers)) & ring
            for i, enc in enumerate(encoding)]


AHEAD_SIZES = [secagg.CHUNK + 100, 50]  # more than one chunk: the masks are drawn ahead


@pytest.mark.parametrize(("steps", "draw_delay_s"), [
    ([0, 1, 2], 0.0), ([0, 1, 2], 0.3), ([0, 5, 10], 0.0), ([0, 1, 7], 0.0)])
def test_masks_drawn_ahead_are_the_steps_own_and_a_wrong_guess_is_dropped(
        steps: list[int], draw_delay_s: float) -> None:
    """After a step, the next step's masks are drawn on another thread (same stride as the
    last two steps). What a rank sends at a step whose masks were drawn ahead is exactly its
    encoding plus its pair masks of that step, so the sum is right, also when the step has to
    wait for its masks (delayed drawing); a step that was not the one expected (0, 1, then 7)
    is masked inline, and nothing drawn for step 2 is ever sent."""
    partners = ["a", "b", "c"]
    inputs = [[make_buckets(100 * t + r, AHEAD_SIZES) for r in range(3)]
              for t in range(len(steps))]
    store = dist.HashStore()
    results = ok(run_ranks(3, lambda r: run_steps(store, r, partners, steps, inputs,
                                                  draw_delay_s)))
    expected_ahead = {(0, 1, 2): [0, 1, 2], (0, 5, 10): [0, 0, 1], (0, 1, 7): [0, 1, 1]}
    try:
        for t, step in enumerate(steps):
            ref = reference_sum(inputs[t])
            for rank, (seen, agg) in enumerate(results):
                out, sent, ahead, encoding, exponents = seen[t]
                assert ahead == expected_ahead[tuple(steps)][t]
                assert_within_quantization(out, ref, SimpleNamespace(
                    world=3, precision_bits=agg.precision_bits, last_exponents=exponents))
                for i, want in enumerate(expected_send(agg, rank, step, encoding)):
                    assert torch.equal(sent[i], want), (step, rank, i)
    finally:
        for _, agg in results:
            agg.close()


def test_drawn_ahead_masks_then_a_redo_or_an_agreement_send_the_right_masks() -> None:
    """Two paths that meet masks drawn ahead. Step 2 outgrows the cached scale: its first send
    (attempt 0) used the masks drawn ahead, its redo (attempt 1) fresh ones drawn inline. Step
    4 follows a NaN step, so it agrees on scales again, with masks drawn ahead."""
    partners = ["a", "b"]
    inputs = [[make_buckets(10 * t + r, AHEAD_SIZES) for r in range(2)] for t in range(5)]
    for b in inputs[2][1][:1]:
        b.mul_(1000.0)
    inputs[3][0][1][7] = float("nan")
    store = dist.HashStore()
    results = ok(run_ranks(2, lambda r: run_steps(store, r, partners, list(range(5)), inputs)))
    try:
        for rank, (seen, agg) in enumerate(results):
            assert [s[2] for s in seen] == [0, 1, 2, 3, 4]  # every later step had them ready
            assert agg.redone_steps == 1
            out, sent, _, encoding, exponents = seen[2]
            assert len(sent) == 4  # two buckets, twice
            for i, want in enumerate(expected_send(agg, rank, 2, encoding, attempt=1)):
                assert torch.equal(sent[2 + i], want), (rank, i)
            assert_within_quantization(out, reference_sum(inputs[2]), SimpleNamespace(
                world=2, precision_bits=agg.precision_bits, last_exponents=exponents))
            assert torch.isnan(seen[3][0][0]).all()  # the NaN step poisoned its sum
            out, sent, _, encoding, exponents = seen[4]
            for i, want in enumerate(expected_send(agg, rank, 4, encoding)):
                assert torch.equal(sent[i], want), (rank, i)
            assert_within_quantization(out, reference_sum(inputs[4]), SimpleNamespace(
                world=2, precision_bits=agg.precision_bits, last_exponents=exponents))
    finally:
        for _, agg in results:
            agg.close()


def test_a_failed_drawing_falls_back_inline_and_close_stops_a_drawing() -> None:
    """If drawing masks ahead fails, the step draws its own inline and sums right. close()
    (a new generation, or the group's end) stops a drawing in progress and ends its thread."""
    partners = ["a", "b"]
    inputs = [[make_buckets(10 * t + r, AHEAD_SIZES) for r in range(2)] for t in range(3)]
    store = dist.HashStore()

    def broken_then_blocked(rank: int) -> tuple[list, SecureAggregator, list]:
        prefixed = dist.PrefixStore("gen-1/", store)
        start = _Gloo(1, rank, 2, prefixed, timedelta(seconds=TIMEOUT_S), "test").start
        agg = SecureAggregator()
        agg.setup(prefixed, rank, partners, 1, TIMEOUT_S)
        draw, calls = agg._mask, []

        def failing_or_blocking(step, attempt, buckets=None, into=None):
            if into is not None:
                calls.append(step)
                if step == 1:
                    raise OSError("keystream failed")  # the draw for step 1 fails
                into.cancel.wait(10)  # the draw for step 3 runs until it is stopped
            return draw(step, attempt, buckets, into)
        agg._mask = failing_or_blocking
        seen = []
        for step in range(3):
            capture = Capture(start)
            out = [b.clone() for b in inputs[step][rank]]
            agg.all_reduce_sum(capture, out, step)
            seen.append((out, capture.sent, [e.clone() for e in agg.encode(inputs[step][rank])],
                         list(agg.last_exponents), agg.steps_masked_ahead))
        return seen, agg, calls

    before = {t for t in threading.enumerate() if t.name.startswith("secagg-masks")}
    results = ok(run_ranks(2, broken_then_blocked))
    for rank, (seen, agg, calls) in enumerate(results):
        deadline = time.monotonic() + 10  # the drawing of step 3 starts on the pool's thread
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [1, 2, 3]
        assert [s[4] for s in seen] == [0, 0, 1]  # step 1 drawn inline, step 2 ahead
        for step in (1, 2):
            out, sent, encoding, exponents, _ = seen[step]
            for i, want in enumerate(expected_send(agg, rank, step, encoding)):
                assert torch.equal(sent[i], want), (rank, step, i)
            assert_within_quantization(out, reference_sum(inputs[step]), SimpleNamespace(
                world=2, precision_bits=agg.precision_bits, last_exponents=exponents))
    for _, agg, _ in results:
        agg.close()  # the drawing of step 3 is blocked until close() stops it
        assert agg._pool is None and agg._ahead is None
    deadline = time.monotonic() + 10
    while any(t.name.startswith("secagg-masks") and t not in before
              for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a mask-drawing thread outlived close()"
        time.sleep(0.05)
