"""Secure aggregation: pairwise-masked fixed-point gradients whose masks cancel in the all-reduce.

With `secure_aggregation: true` a worker never puts its own gradient on the ring. It encodes the
flat float buckets (gradient sums over its local batch, plus Replica's tail [loss_sum,
loss_samples, samples] at the end of the last bucket) as fixed-point integers in the ring
Z_{2^k}, adds one pseudo-random mask per worker of a *different* partner, and all-reduces the
result. Every pair (i, j) derives the same mask m_ij; rank i adds it when j > i and subtracts it
when j < i, so the masks cancel exactly in the sum and the aggregate is the plain sum up to
fixed-point rounding. What a peer or an observer of the ring sees (one contribution, or any
partial sum short of the full group) is uniform over the ring: any strict subset of the ranks is
cut by at least one cross-partner pair, whose mask nobody outside that pair knows.

Threat model. Honest-but-curious workers and ring observers. Workers of the same partner trust
each other (same data owner), so they do not mask each other; a group of one partner needs no
masks at all and takes the plain float all-reduce. Public keys are exchanged through the
controller's rendezvous store unauthenticated: a malicious controller could substitute keys
(man in the middle); signing keys per partner would need a PKI and is out of scope. The SUM is
revealed by design, so with exactly two partners each learns the other's aggregate gradient
(inherent to any secure aggregation); dropout recovery does not reveal anything either, because
a failed step is re-run in a new generation with new keys (see below), never unmasked.

Ring and fixed point, scaled per segment:
  * A group of w ranks works in the ring Z_{2^k} with k = W - 1 - bitlen(w), where the wire
    word W is 32 bits for w <= WORD32_MAX_WORLD (15) and 64 bits above (up to MAX_WORLD = 127).
    w values of [0, 2^k) sum to less than 2^(W-1), so gloo's signed integer sum never
    overflows (signed overflow is undefined in C++, so we rely on wrap-around nowhere; masks
    are added on unsigned views, where numpy defines it); the sum is reduced mod 2^k
    afterwards. Negative values are two's complement in the ring, and the decoded aggregate is
    the signed representative in [-2^(k-1), 2^(k-1)).
  * Segments share a scale: every bucket's gradients, the loss sum, the two sample counts (so a
    large loss cannot coarsen the gradients, and counts stay exact). A segment whose values are
    below 2^e is scaled by 2^(P - e) with P = k - 1 - bitlen(w): each encoded value has
    |x| <= 2^P and the sum of w of them stays inside the ring's signed half. Scaling by a power
    of two is exact in float32.
  * Where e comes from. A generation's first step agrees it: each rank's exponent of its
    largest |value| per segment, one tiny MAX all-reduce (its latency hidden behind the mask
    generation). Later steps take e from the previous step's decoded aggregate, which every
    rank holds, plus HEADROOM_BITS: no extra round trip. A rank whose values outgrow that
    scale clamps them (nothing wraps) and counts them in a masked status slot; the group sees
    the count in the sum and sends the step again at agreed scales under fresh masks (attempt
    1 of the step) before decoding anything. So no value is ever clipped in a result.
  * Precision: P bits against the segment's scale (26 bits for 2-3 workers, 24 for 4-7, 22 for
    8-15, >= 48 on the 64-bit wire), less the headroom on cached steps: a rounding error of at
    most 2^(e-P-1) per value and worker. Small gradients next to a large one of the same bucket
    lose relative precision, as any fixed point does; ~20 bits against the bucket's largest
    value is far below what an SGD step resolves. Counts below 2^P get scale >= 1: exact.
  * Why 32 bits: a 32-bit wire moves the same bytes as the float32 all-reduce (a fixed 56-bit
    ring on int64, this module's first design, doubled them) and halves the keystream and every
    pass over the encoded values. Measured in bench/secagg_overhead.py.
  * What travels unmasked: the agreement of a generation's first step and of a redone step.
    Ring neighbours see there, per segment, the power of two above another rank's largest
    |value| (one small integer, e.g. "below 2^-3"), never a value. Non-finite values are
    counted in the other masked status slot: if any rank had a NaN/Inf the whole decoded step
    is NaN (except the sample counts), so divergence shows in the loss as with the plain sum.
  Fixed-point sums are associative, so the aggregate no longer depends on the reduction order;
  it does depend (at the 2^(e-P) level) on how samples are split, because each worker rounds its
  own local sum: secure aggregation equals the plain path within quantization error, not bit
  for bit.

Keys and masks:
  * Per generation every worker makes a fresh X25519 key pair and publishes the public key with
    its partner name under f"secagg/gen-{g}/{rank}" in the generation's store. The partner of
    every rank comes from the controller's plan; a published name that disagrees is an error (a
    worker cannot opt out of masking by claiming to be a peer's partner).
  * Pair key: HKDF-SHA256(X25519 shared secret, info = generation, both ranks, both partners,
    both public keys) -> a 128-bit AES key. New generation => new key pairs => new masks.
  * Mask of (pair, step, attempt, bucket): the AES-128-CTR keystream under the pair key from
    the counter block be64(step) || be64(attempt << 60 | bucket << 44), read as little-endian
    wire words (mod 2^k); raysys.privacy.aesctr draws it and adds it in the same pass, and
    documents the layout and why it is pseudo-random. (numpy's PCG64/Philox are not PRGs:
    their output reveals their state.)
  * A (generation, step) pair is masked at most once: re-running a step in the same generation
    with different inputs would let a peer subtract two contributions masked alike and see the
    difference of the gradients, so it raises MaskReuseError instead. After a failure the
    controller forms a new generation anyway, which re-keys. (A redone step's second attempt
    has masks of its own: the attempt is part of the counter.)

Dropout: setup() polls the store until the keys of all cross-partner peers are there and raises
SecAggSetupError (a CollectiveError) naming the missing ranks when `timeout_s` passes, so a peer
that died between the plan and the rendezvous fails the join instead of hanging it. A peer lost
in the middle of a step makes the integer all-reduce fail as it would without masks.

Cost per step and worker: per masked peer one AES keystream, drawn and added to the send buffer
in one pass (aesctr: on 512-bit vector AES where the CPU has it, ~22 GB/s here, against ~16 GB/s
plus an addition pass for OpenSSL's fastest mode); one encode pass (scale, range check, clamp,
round, convert, add to the masks, reduce: raysys.privacy.ringcodec.encode_into) run on each
CHUNK right after its masks, while both are in cache; one decode pass after the sum (reduce,
sign, convert, scale, and the peak that sets the next step's scale: decode_into). On the 32-bit
wire the all-reduce moves the bytes of the plain one.
Masking work grows with the number of cross-partner peers, so the overhead is highest when every
worker is its own partner. The masks do not depend on the gradients: as soon as a step is summed,
the next step's are drawn on a background thread (into a second set of buffers) while the
worker computes that step's gradients, and a step whose masks are ready only encodes; a worker
with a spare core hides the keystream that way. This is skipped for groups without masks and
for buckets of less than CHUNK values in all, whose keystream costs less than the hand-off.
See bench/secagg_overhead.py.

Wiring (worker): `agg.setup(store, rank, partners, generation, timeout_s)` right after the
generation's GenerationGroup is formed, with `store` = PrefixStore(f"gen-{generation}/", own
TCPStore client) (one client per worker: a client is not safe to share between threads), and
`agg.all_reduce_sum(start, replica.buckets, replica.step)` in place of the plain all-reduce of
`replica.buckets`, where start(tensors, op) starts reducing in place (SUM, or MAX for the
agreement) and returns the function that waits for it, and `agg.close()` when the generation
ends (it stops masks being drawn ahead); GenerationGroup does this wiring.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raysys.privacy.aesctr import (
    BLOCK_BYTES,
    MAX_BLOCKS,
    MAX_BUCKETS,
    PairKey,
    default_lanes,
    keystream_into,
)
from raysys.privacy.ringcodec import decode_into, encode_into
from raysys.train.collective import CollectiveError
from raysys.train.replica import TAIL

log = logging.getLogger(__name__)

WORD32_MAX_WORLD = 15  # up to here the wire is int32 with >= 22 bits of precision
MAX_WORLD = 127  # int64 wire: k = 56 at 127 ranks; 128 would leave no room for the sum
MIN_SCALE_EXPONENT, MAX_SCALE_EXPONENT = -126, 126  # 2^(P - e) stays a normal float32
# Replica's last bucket ends in [loss_sum, loss_samples, samples]: the loss sum and the two sample
# counts get scales of their own, so a large loss cannot coarsen the gradients' scale and the
# counts stay exact integers.
COUNT_SLOTS = TAIL - 1
# Elements per cache block: a block's masks are added and its values encoded while it is in cache
# (512 KiB of ring words and as many floats).
CHUNK = 1 << 17
_PUBKEY_BYTES = 32
_UNSIGNED = {torch.int32: np.uint32, torch.int64: np.uint64}  # views for modular arithmetic
# The next step's scales come from this step's (public) aggregate, with this many bits of room
# for a rank whose values exceed the aggregate's or grow: 4x. Beyond it the step is redone.
HEADROOM_BITS = 2
STATUS_SLOTS = 2  # [non-finite count, overflow count], masked, after the last bucket's values

StartAllReduce = Callable[..., Callable[[], None]]
"""`start(tensors, op=dist.ReduceOp.SUM)` starts reducing a list of tensors across the group in
place (SUM for the masked values, MAX for the scale agreement) and returns the function that
waits for it; raysys.train.collective._Gloo.start is one."""


class SecAggError(CollectiveError):
    """Secure aggregation failed; a CollectiveError, so the worker's step error path applies."""


class SecAggSetupError(SecAggError):
    """Key agreement for a generation failed: a peer's key is missing, malformed or mislabeled."""


class MaskReuseError(SecAggError):
    """A step was about to be masked twice with the same keys (see the module docstring)."""


class _Cancelled(Exception):
    """Masks being drawn ahead were dropped (see SecureAggregator._drop_ahead)."""


@dataclass
class _MaskBuffers:
    """A second set of encoding buffers, into which the next step's masks are drawn on another
    thread while this step trains."""

    enc: list[torch.Tensor]
    step: int = -1  # the step whose masks they hold (or are being drawn)
    future: Future | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def fits(self, sizes: list[int], dtype: torch.dtype) -> bool:
        """Whether these buffers have the shape of encoding buffers of `sizes` words of `dtype`."""
        return [e.numel() for e in self.enc] == sizes and self.enc[0].dtype == dtype


class SecureAggregator:
    """One worker's secure-aggregation state; call setup() once per generation.

    Usage: `agg.setup(store, rank, partners, generation, timeout_s)` at join, then per step
    `agg.all_reduce_sum(start, buckets, step)` in place of the plain all-reduce of `buckets`,
    and `agg.close()` when the generation ends.
    """

    def __init__(self, wire_bits: int | None = None, mask_ahead: bool = True) -> None:
        """`wire_bits` forces the wire word (32 or 64); by default it follows the group size
        (32 up to WORD32_MAX_WORLD ranks). With `mask_ahead` the masks of the step expected
        next are drawn on a background thread as soon as a step is summed, when the buckets
        are large enough for it to pay (see _draw_ahead)."""
        if wire_bits not in (None, 32, 64):
            raise ValueError(f"wire_bits must be 32 or 64, not {wire_bits}")
        self._wire_bits_choice = wire_bits
        self.mask_ahead = mask_ahead
        self._ahead: _MaskBuffers | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._last_step: int | None = None
        self.steps_masked_ahead = 0  # steps that used masks drawn ahead
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.partners: tuple[str, ...] = ()
        self._pair_keys: dict[int, PairKey] = {}  # peer rank -> AES key, cross-partner peers only
        self._masked_steps: set[int] = set()
        self.last_nonfinite = 0  # NaN/Inf values in the last step, whole group
        self.last_exponents: list[int] = []  # the exponent per segment the last step used
        self._next_exponents: list[int] | None = None  # from the last aggregate; None: agree
        self.redone_steps = 0  # steps re-sent at agreed scales after a cached scale overflowed
        self.last_payload_bytes = 0  # what the last step all-reduced: ring words, agreements
        self._enc: list[torch.Tensor] = []  # the encoded buckets, reused every step
        self._flip = 0  # -1 when the first masked peer's mask is subtracted (see _mask)
        self._lanes = 0  # the keystream's vector width (aesctr.default_lanes), fixed at setup
        self._ring(64 if wire_bits == 64 else 32, 2)

    def _ring(self, wire_bits: int, world: int) -> None:
        """Fix the wire word, ring and precision for a group of `world` ranks."""
        self.wire_bits = wire_bits
        self.wire_dtype = torch.int32 if wire_bits == 32 else torch.int64
        self.ring_bits = wire_bits - 1 - world.bit_length()
        self.precision_bits = self.ring_bits - 1 - world.bit_length()
        self._ring_mask = (1 << self.ring_bits) - 1
        self._word = np.int32 if wire_bits == 32 else np.int64  # the kernels' integer scalars
        self._bound = np.float32(2**self.precision_bits)  # |encoded value| <= 2^P
        # The kernels' ring scalars: 2^k - 1 (encode_into and decode_into), 2^(k-1) and 2^k
        # (decode_into).
        self._ring_words = tuple(self._word(x) for x in (
            self._ring_mask, 1 << (self.ring_bits - 1), 1 << self.ring_bits))

    @classmethod
    def warm(cls) -> None:
        """Load the compiled ring kernels (numba's cache, or a compilation) and start numba's
        runtime, for both wire words, on a few values, and compile the keystream loop
        (aesctr, ~0.1 s). A worker process's first secure step would otherwise pay it (~1.2 s
        here); workers of a secure job call this while loading, so the cost is off the
        training's path (a newcomer pays it before it joins)."""
        keystream_into(np.zeros(4, dtype=np.uint32), PairKey(bytes(16)), "store", 0, 0, 0, 0)
        values = torch.zeros(4)
        for bits in (32, 64):
            agg = cls(wire_bits=bits)
            acc = np.zeros(4, dtype=agg._word)
            agg._encode(values, acc, 0, 0)
            mask, half, modulus = agg._ring_words
            decode_into(acc, mask, half, modulus, np.float32(1.0), values.numpy())

    # -- key agreement, once per generation ---------------------------------------------------
    def setup(self, store: dist.Store, rank: int, partners: Sequence[str], generation: int,
              timeout_s: float, neighbours: int | None = None) -> None:
        """Agree pairwise keys with the ranks this one masks with in this generation: every
        rank of another partner, or with `neighbours` the sparse graph of mask_peers().

        `store` is the generation's store (the PrefixStore its ProcessGroupGloo rendezvoused in
        works; keys also carry the generation, so a shared client store works too). `partners`
        is the partner of every rank, from the controller's plan. Raises SecAggSetupError after
        `timeout_s` if a needed peer never publishes its key.
        """
        world = len(partners)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world}")
        if neighbours is not None and neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, not {neighbours}")
        if world > MAX_WORLD:
            raise ValueError(f"secure aggregation supports at most {MAX_WORLD} workers, "
                             f"not {world}")
        wire_bits = self._wire_bits_choice or (32 if world <= WORD32_MAX_WORLD else 64)
        if wire_bits == 32 and world > WORD32_MAX_WORLD:
            raise ValueError(f"a 32-bit wire supports at most {WORD32_MAX_WORLD} workers, "
                             f"not {world}")
        self.close()
        self._ring(wire_bits, world)
        self._lanes = default_lanes()
        self.generation, self.rank, self.world = generation, rank, world
        self.partners = tuple(partners)
        try:
            self._agree_keys(store, mask_peers(partners, rank, neighbours),
                             private_key=X25519PrivateKey.generate(), timeout_s=timeout_s)
        except BaseException:
            self.close()  # never leave half a key set behind: sums would silently be wrong
            raise
        # The first masked peer's mask goes into the buffer as is; its sign is applied last.
        self._flip = -1 if self.masking and self.masked_peers[0] < rank else 0

    def _agree_keys(self, store: dist.Store, peers: list[int], private_key: X25519PrivateKey,
                    timeout_s: float) -> None:
        rank, generation, partners = self.rank, self.generation, self.partners
        public = private_key.public_key().public_bytes_raw()
        try:
            # Published even when this rank needs no key (one partner): cheap, and a peer with
            # a different view of the plan then fails on the label instead of timing out.
            # compare_set, not set: a second key for the same (generation, rank) would leave
            # peers that read the first one with masks that do not cancel (a silently wrong
            # sum), so it is refused.
            value = public + partners[rank].encode()
            if store.compare_set(self._store_key(rank), b"", value) != value:
                raise SecAggSetupError(
                    f"generation {generation}: rank {rank} already published a key; set up a "
                    "new generation instead of joining this one twice")
            if not peers:
                return  # one partner only: nobody to hide from, the plain all-reduce is used
            values = self._wait_for_keys(store, peers, timeout_s)
        except SecAggSetupError:
            raise
        except RuntimeError as exc:  # the store itself failed (dist.DistError is one)
            raise SecAggSetupError(f"generation {generation}: key exchange of rank {rank} "
                                   f"failed: {exc}") from exc
        for j, value in zip(peers, values, strict=True):
            peer_public = value[:_PUBKEY_BYTES]
            partner = value[_PUBKEY_BYTES:].decode(errors="replace")
            if len(peer_public) != _PUBKEY_BYTES or partner != partners[j]:
                raise SecAggSetupError(
                    f"generation {generation}: rank {j} published a key for partner "
                    f"'{partner}', the plan says '{partners[j]}'")
            try:
                shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
            except ValueError as exc:  # a low-order point: an all-zero shared secret
                raise SecAggSetupError(
                    f"generation {generation}: rank {j} published an invalid key: {exc}"
                ) from exc
            lo, hi = sorted((rank, j))
            pub = {rank: public, j: peer_public}
            info = b"|".join([b"raysys-secagg-v3", str(generation).encode(),
                              f"{lo},{hi}".encode(), partners[lo].encode(),
                              partners[hi].encode(), pub[lo], pub[hi]])
            key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(shared)
            self._pair_keys[j] = PairKey(key)

    def _store_key(self, rank: int) -> str:
        return f"secagg/gen-{self.generation}/{rank}"

    def _wait_for_keys(self, store: dist.Store, peers: list[int],
                       timeout_s: float) -> list[bytes]:
        # Polling with check() rather than store.wait(): a TCPStore client whose wait timed out
        # may still receive the late reply, and check() tells exactly which ranks are missing.
        keys = [self._store_key(j) for j in peers]
        deadline = time.monotonic() + timeout_s
        pause = 0.001
        while not store.check(keys):
            if time.monotonic() >= deadline:
                missing = [j for j, k in zip(peers, keys, strict=True) if not store.check([k])]
                raise SecAggSetupError(
                    f"generation {self.generation}: rank {self.rank}/{self.world} timed out "
                    f"after {timeout_s:g}s waiting for the secure-aggregation keys of ranks "
                    f"{missing} (a peer died or never joined; re-form the group without it)")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return [store.get(k) for k in keys]

    def close(self) -> None:
        """Forget this generation's keys (the next generation must not reuse them), and any
        masks drawn ahead with them."""
        self._drop_ahead()
        self._ahead = None
        self._last_step = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # idle after _drop_ahead: its thread ends now
            self._pool = None
        self.generation = None
        self._pair_keys = {}
        self._masked_steps = set()
        self._next_exponents = None

    @property
    def masking(self) -> bool:
        """Whether this group masks at all (it has more than one partner)."""
        return bool(self._pair_keys)

    @property
    def masked_peers(self) -> tuple[int, ...]:
        """Ranks this worker shares a mask with (see mask_peers)."""
        return tuple(sorted(self._pair_keys))

    # -- per step ------------------------------------------------------------------------------
    def all_reduce_sum(self, start: StartAllReduce, buckets: list[torch.Tensor],
                       step: int) -> None:
        """Sum the float `buckets` across the generation, in place, without revealing them.

        `start(tensors, op)` must start reducing in place across the group (see
        StartAllReduce). Every rank must call this with the same `step` and the same bucket
        sizes; the last bucket ends in Replica's tail [loss_sum, loss_samples, samples].
        """
        if self.generation is None:
            raise SecAggError("SecureAggregator.setup() was not called for this generation")
        if self.world == 1:
            return
        if not self.masking:
            start(buckets)()
            self.last_payload_bytes = sum(b.numel() * b.element_size() for b in buckets)
            return
        if step in self._masked_steps:
            raise MaskReuseError(
                f"generation {self.generation}: step {step} was already masked with these keys; "
                "re-run it in a new generation (re-keyed) instead")
        self._masked_steps.add(step)
        self._reserve(buckets)
        self.last_payload_bytes = 0
        premasked = self._take_ahead(step)
        if self._next_exponents is None:
            status = self._send(start, buckets, step, attempt=0, agree=True, premasked=premasked)
        else:
            self.last_exponents = self._next_exponents
            status = self._send(start, buckets, step, attempt=0, agree=False,
                                premasked=premasked)
            if status[1]:
                # A rank's value outgrew the cached scale (it was clamped, so nothing wrapped):
                # send the step again at agreed scales, under fresh masks (attempt 1), before
                # anything is decoded. Every rank sees the same status, so all redo it.
                self.redone_steps += 1
                log.debug("secure aggregation: step %d redone at agreed scales", step)
                status = self._send(start, buckets, step, attempt=1, agree=True)
        self.last_nonfinite = status[0]
        exponents = self._decode(buckets)
        if self.last_nonfinite:
            # Mirror the plain float path: a NaN/Inf gradient poisons the step. The sample
            # counts (the end of Replica's tail) stay valid so apply() and the reports work.
            counts = buckets[-1].view(-1)[-COUNT_SLOTS:].clone()
            for b in buckets:
                b.fill_(float("nan"))
            buckets[-1].view(-1)[-COUNT_SLOTS:] = counts
            self._next_exponents = None
        else:
            self._next_exponents = [e + HEADROOM_BITS if e > MIN_SCALE_EXPONENT else e
                                    for e in exponents]
        self._draw_ahead(step)

    def _send(self, start: StartAllReduce, buckets: list[torch.Tensor], step: int,
              attempt: int, agree: bool, premasked: bool = False) -> list[int]:
        """Mask, encode and sum one attempt of a step; with `agree`, at scales agreed now;
        with `premasked`, the buffers already hold the attempt's masks (drawn ahead).
        Returns the group's [non-finite count, overflow count] of the attempt."""
        if agree:
            # The masks do not depend on the values: unless drawn ahead, they are drawn while
            # the agreement is on the wire, which hides its latency behind the AES work.
            agreed = torch.tensor(_exponents(buckets), dtype=torch.int64)
            wait_for_agreement = start([agreed], dist.ReduceOp.MAX)
            self.last_payload_bytes += agreed.numel() * agreed.element_size()
            if not premasked:
                self._mask(step, attempt)
            wait_for_agreement()
            self.last_exponents = agreed.tolist()
            out_of_range = self._encode_bodies(buckets, self._flip)
        elif premasked:
            out_of_range = self._encode_bodies(buckets, self._flip)
        else:
            out_of_range = self._mask(step, attempt, buckets)
        self._encode_tail(buckets, self._flip, out_of_range)
        start(self._enc)()
        self.last_payload_bytes += sum(e.numel() * e.element_size() for e in self._enc)
        return [self._signed(x) for x in self._enc[-1][-STATUS_SLOTS:].tolist()]

    def _signed(self, word: int) -> int:
        """The signed representative of (word mod 2^k)."""
        word &= self._ring_mask
        return word - (1 << self.ring_bits) if word >> (self.ring_bits - 1) else word

    def _scale(self, exponent: int) -> float:
        # |x| < 2^e  =>  |x * 2^(P - e)| <= 2^P: a sum of `world` of them cannot leave the ring.
        shift = min(max(self.precision_bits - exponent, MIN_SCALE_EXPONENT), MAX_SCALE_EXPONENT)
        return 2.0**shift

    def encode(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ring encoding of `buckets` at the last step's scales plus the status slots,
        WITHOUT masks (representatives in [0, 2^k)); for tests and audits. Reused buffers:
        copy to keep."""
        self._reserve(buckets)
        for e in self._enc:
            e.zero_()
        self._encode_tail(buckets, 0, self._encode_bodies(buckets, 0))
        return self._enc

    def _mask(self, step: int, attempt: int, buckets: list[torch.Tensor] | None = None,
              into: _MaskBuffers | None = None) -> bool:
        """Fill the encoding buffers with this rank's mask sum for (step, attempt): + m_ij for
        every peer j above this rank, - m_ij below, so every pair cancels in the group's sum.
        With `buckets`, also encode each piece of gradients right after its masks, while both
        are in cache; returns whether a value was out of range (see _encode_bodies). With
        `into`, fill those buffers instead (masks drawn ahead, on another thread); a set
        `cancel` stops the work between chunks.

        The first peer's keystream is written into the buffer, the others' are added to or
        subtracted from it in the same pass that draws them (aesctr.keystream_into), on
        unsigned views, where addition modulo 2^W is defined (2^k divides 2^W, so no reduction
        per peer), with the sign relative to the first peer's; encode_into applies the first
        peer's sign (self._flip) to the whole sum."""
        unsigned = _UNSIGNED[self.wire_dtype]
        per_block = BLOCK_BYTES // self.wire_dtype.itemsize
        enc = self._enc if into is None else into.enc
        first_adds = self._flip == 0  # see setup()
        peers = [(self._pair_keys[j], "add" if (j > self.rank) == first_adds else "sub")
                 for j in self.masked_peers]
        peers[0] = (peers[0][0], "store")
        out_of_range = False
        for i, e in enumerate(enc):
            acc = e.numpy()
            acc_unsigned = acc.view(unsigned)
            body = self._body(buckets, i) if buckets is not None else 0
            for a in range(0, acc.size, CHUNK):
                if into is not None and into.cancel.is_set():
                    raise _Cancelled  # half-drawn buffers must never pass for drawn ones
                z = min(CHUNK, acc.size - a)
                for key, op in peers:
                    keystream_into(acc_unsigned[a: a + z], key, op, step, attempt, i,
                                   a // per_block, self._lanes)
                if a < body:
                    out_of_range |= self._encode(buckets[i].view(-1)[a: min(a + z, body)],
                                                 acc[a: a + z], self.last_exponents[i],
                                                 self._flip)
        return out_of_range

    # -- masks drawn ahead ----------------------------------------------------------------------
    # The masks do not depend on the gradients, so the next step's can be drawn while this
    # worker computes that step's gradients: on a host with a core to spare, the keystream
    # (one AES stream per masked peer, most of the cost) leaves the step's critical path.
    # Each mask is still used at most once: they are drawn for (expected step, attempt 0), and
    # the step check in all_reduce_sum applies as before; a guess that turns out wrong (a
    # re-run step, another stride) is thrown away unsent.

    def _draw_ahead(self, step: int) -> None:
        """Start drawing the masks of the step expected after `step` (the same stride as the
        last two steps: 1 for every-step aggregation, the round length under local SGD)."""
        stride = step - self._last_step if self._last_step is not None else 1
        self._last_step = step
        sizes = [e.numel() for e in self._enc]
        # Below a chunk the keystream costs microseconds, less than handing it to a thread.
        if not (self.mask_ahead and self.masking) or stride <= 0 or sum(sizes) < CHUNK:
            return
        buf = self._ahead
        if buf is None or not buf.fits(sizes, self.wire_dtype):
            buf = self._ahead = _MaskBuffers(_buffers(sizes, self.wire_dtype))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="secagg-masks")
        buf.step = step + stride
        buf.cancel.clear()
        buf.future = self._pool.submit(self._mask, buf.step, 0, None, buf)

    def _take_ahead(self, step: int) -> bool:
        """Swap in the masks drawn ahead if they are this step's (waiting for them if they are
        still being drawn); returns whether the encoding buffers now hold them."""
        buf = self._ahead
        if buf is None or buf.future is None:
            return False
        if buf.step != step or not buf.fits([e.numel() for e in self._enc], self.wire_dtype):
            self._drop_ahead()
            return False
        try:
            buf.future.result()
        except Exception:  # noqa: BLE001 - drawn again inline, where an error would surface
            log.warning("secure aggregation: masks drawn ahead for step %d failed; drawing "
                        "them again", step, exc_info=True)
            buf.future = None
            return False
        buf.future = None
        self._enc, buf.enc = buf.enc, self._enc
        self.steps_masked_ahead += 1
        return True

    def settle(self) -> None:
        """Wait until the masks being drawn ahead are drawn (benchmarks: to time that work
        with the secure steps it belongs to)."""
        buf = self._ahead
        if buf is not None and buf.future is not None:
            buf.future.exception()

    def _drop_ahead(self) -> None:
        """Stop and forget masks drawn ahead (between two chunks), unsent."""
        buf = self._ahead
        if buf is not None and buf.future is not None:
            buf.cancel.set()
            try:
                buf.future.result()
            except _Cancelled:
                pass
            except Exception:  # noqa: BLE001 - unused masks: nothing depends on them
                log.debug("secure aggregation: dropped masks failed", exc_info=True)
            buf.future = None

    @staticmethod
    def _body(buckets: list[torch.Tensor], i: int) -> int:
        """How many gradient values bucket i holds (the last one's tail follows them)."""
        n = buckets[i].numel()
        return n - TAIL if i == len(buckets) - 1 else n

    def _encode(self, values: torch.Tensor, acc: np.ndarray, exponent: int, flip: int) -> bool:
        """ringcodec.encode_into at the scale of `exponent`: adds the encoding of `values` to
        (flip-signed) acc and reduces it into the ring. Returns whether a value was clamped."""
        return encode_into(values.numpy(), np.float32(self._scale(exponent)), self._bound,
                           acc, self._ring_words[0], self._word(flip))

    def _encode_bodies(self, buckets: list[torch.Tensor], flip: int) -> bool:
        """Encode every bucket's gradients into the buffers (which hold the masks, or zeros).
        Returns whether any value was non-finite or beyond the scale's range: those were
        clamped, and _encode_tail counts them into the status slots."""
        out_of_range = False
        for i, b in enumerate(buckets):
            body = self._body(buckets, i)
            out_of_range |= self._encode(b.view(-1)[:body], self._enc[i].numpy()[:body],
                                         self.last_exponents[i], flip)
        return out_of_range

    def _encode_tail(self, buckets: list[torch.Tensor], flip: int, out_of_range: bool) -> None:
        """Encode the last bucket's tail (the loss sum and the sample counts, each at its
        segment's scale), then the status counts, which need every other value encoded
        first. In Python: five slots cost less than the kernel calls would."""
        values, acc = buckets[-1].view(-1), self._enc[-1].numpy()
        body, total, base = values.numel() - TAIL, values.numel(), len(buckets) - 1
        scales = [self._scale(self.last_exponents[base + 1])] + \
            [self._scale(self.last_exponents[base + 2])] * COUNT_SLOTS
        out_of_range |= self._encode_slots(values[body:].tolist(), scales, acc[body:total], flip)
        counts = self._count_out_of_range(buckets) if out_of_range else [0, 0]
        self._encode_slots(counts, [1.0] * STATUS_SLOTS, acc[total:], flip)

    def _encode_slots(self, values: list[float], scales: list[float], acc: np.ndarray,
                      flip: int) -> bool:
        """ringcodec.encode_into for a few slots, in Python integers (exact, unbounded)."""
        out_of_range = False
        bound = float(self._bound)
        for j, (value, scale) in enumerate(zip(values, scales, strict=True)):
            v = value * scale
            if not abs(v) <= bound:  # also a NaN, which becomes +bound as in the kernel
                out_of_range = True
                v = -bound if v < -bound else bound
            mask = int(acc[j]) & self._ring_mask
            acc[j] = ((mask ^ flip) - flip + round(v)) & self._ring_mask
        return out_of_range

    def _count_out_of_range(self, buckets: list[torch.Tensor]) -> list[int]:
        """[non-finite, beyond the scale's range] over all segments, as encode_into saw them;
        the slow path, run only when encode_into reported one."""
        counts = [0, 0]
        bound = float(self._bound)
        for values, exponent in zip(_segments(buckets), self.last_exponents, strict=True):
            scaled = values * self._scale(exponent)
            finite = torch.isfinite(scaled)
            counts[0] += int(scaled.numel() - finite.sum())
            counts[1] += int((finite & (scaled.abs() > bound)).sum())
        return counts

    def _decode(self, buckets: list[torch.Tensor]) -> list[int]:
        """Turn the summed ring values back into floats in `buckets`, in place. Returns the
        aggregate's exponent per segment (see _exponents), found on the way."""
        exponents = []
        mask, half, modulus = self._ring_words
        for i, b in enumerate(buckets):
            body = self._body(buckets, i)
            inv_scale = 1.0 / self._scale(self.last_exponents[i])
            # integer -> float32 is correctly rounded, and 1/scale is a power of two: exact.
            lo, hi = decode_into(self._enc[i].numpy()[:body], mask, half, modulus,
                                 np.float32(inv_scale), b.view(-1).numpy()[:body])
            exponents.append(_exponent(float(np.float32(max(-int(lo), int(hi)))) * inv_scale))
        values, base = buckets[-1].view(-1).numpy(), len(buckets) - 1
        body = values.size - TAIL
        words = self._enc[-1][body: body + TAIL].tolist()
        for segment, slots in ((1, range(1)), (2, range(1, TAIL))):
            scale = self._scale(self.last_exponents[base + segment])
            for j in slots:
                values[body + j] = self._signed(words[j]) / scale
            exponents.append(_exponent(max(abs(float(values[body + j])) for j in slots)))
        return exponents

    def pair_mask(self, peer: int, step: int, bucket: int, numel: int,
                  attempt: int = 0) -> torch.Tensor | None:
        """The mask this rank shares with `peer` for (step, bucket, attempt), or None if the
        pair is not masked (same partner). For tests and audits, not the hot path."""
        if peer not in self._pair_keys:
            return None
        mask = torch.empty(numel, dtype=self.wire_dtype)
        keystream_into(mask.numpy().view(_UNSIGNED[self.wire_dtype]), self._pair_keys[peer],
                       "store", step, attempt, bucket, 0, self._lanes)
        return mask.bitwise_and_(self._ring_mask)

    def _reserve(self, buckets: list[torch.Tensor]) -> None:
        sizes = [b.numel() for b in buckets]
        sizes[-1] += STATUS_SLOTS
        if sizes[-1] <= TAIL + STATUS_SLOTS:
            raise ValueError(f"the last bucket must end in Replica's {TAIL} tail slots and hold "
                             "gradients before them")
        if len(sizes) > MAX_BUCKETS:  # the bucket's field in the masks' counter
            raise ValueError(f"{len(sizes)} buckets are too many; use larger buckets")
        most = MAX_BLOCKS * (BLOCK_BYTES // self.wire_dtype.itemsize)
        if max(sizes) > most:
            raise ValueError(f"a bucket of {max(sizes)} values is too large for the masks' "
                             f"counter (at most {most} values); use smaller buckets")
        if [e.numel() for e in self._enc] != sizes or self._enc[0].dtype != self.wire_dtype:
            self._enc = _buffers(sizes, self.wire_dtype)


def _buffers(sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Encoding buffers of `sizes` words."""
    return [torch.empty(n, dtype=dtype) for n in sizes]


def mask_peers(partners: Sequence[str], rank: int, neighbours: int | None = None) -> list[int]:
    """The ranks `rank` shares a mask with, given the partner of every rank.

    By default every rank of another partner. With `neighbours` = d, a sparse graph in the
    manner of SecAgg+ (Bell et al., CCS 2020): the ranks sit on a circle that deals the partners
    round-robin (first rank of each partner in order of appearance, then the second ones, ...),
    and every rank is joined to the first d ranks of other partners after it, so (both ends of
    every edge mask) to about 2d peers from different partners. Every rank computes the same
    graph from the public plan.

    The graph is connected: two neighbours on the circle are either joined, or of the same
    partner and then both joined to the first rank of another partner after them. So a strict
    subset of the ranks always has a mask edge leaving it, and any partial sum short of the whole
    group is still uniform for an observer of the ring. What is given up is collusion
    resistance: a worker's contribution is exposed if all its ~2d neighbours collude (with all
    peers masked, every worker of every other partner must).
    """
    cross = [j for j in range(len(partners)) if partners[j] != partners[rank]]
    if neighbours is None or not cross:
        return cross
    by_partner: dict[str, list[int]] = {}
    for r, p in enumerate(partners):
        by_partner.setdefault(p, []).append(r)
    circle = [r for deal in itertools.zip_longest(*by_partner.values()) for r in deal
              if r is not None]
    position = {r: i for i, r in enumerate(circle)}

    def after(r: int) -> list[int]:
        """The first `neighbours` ranks of other partners after r on the circle."""
        ahead = (circle[(position[r] + i) % len(circle)] for i in range(1, len(circle)))
        return list(itertools.islice((j for j in ahead if partners[j] != partners[r]),
                                     neighbours))

    return sorted(set(after(rank)) | {j for j in cross if rank in after(j)})


def _segments(buckets: list[torch.Tensor]) -> list[torch.Tensor]:
    """The values that share one scale: each bucket's gradients, then the tail's loss sum and
    its sample counts (the last bucket ends in Replica's tail)."""
    *front, last = [b.reshape(-1) for b in buckets]
    return [*front, last[:-TAIL], last[-TAIL: -COUNT_SLOTS], last[-COUNT_SLOTS:]]


def _exponents(buckets: list[torch.Tensor]) -> list[int]:
    """Per segment, the e with max |finite value| < 2^e (MIN_SCALE_EXPONENT for all zeros).
    Non-finite values are left out here; encoding counts them."""
    out = []
    for values in _segments(buckets):
        lo, hi = torch.aminmax(values)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # the slow path, only with NaN/Inf
            kept = values[torch.isfinite(values)]
            lo, hi = (float(kept.min()), float(kept.max())) if kept.numel() else (0.0, 0.0)
        out.append(_exponent(max(-lo, hi)))
    return out


def _exponent(largest: float) -> int:
    """The e with largest < 2^e, for largest >= 0 (MIN_SCALE_EXPONENT for 0)."""
    # largest = f * 2^e with 0.5 <= f < 1
    return math.frexp(largest)[1] if largest else MIN_SCALE_EXPONENT
