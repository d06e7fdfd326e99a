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
  * Mask of (pair, step, attempt, bucket): the AES-128-CTR keystream with initial counter
    block step (8 bytes) | attempt (2) | bucket (2) | 0 (4), read as wire words (mod 2^k). AES-CTR
    is a cryptographic PRG (numpy's PCG64/Philox are not: their output reveals their state),
    and with AES-NI OpenSSL produces ~5 GB/s, faster than numpy's generators here (1.2 ms vs
    3.6 ms (PCG64) for 1M int64 on this host), so there is no speed reason to pick a weaker one.
  * A (generation, step) pair is masked at most once: re-running a step in the same generation
    with different inputs would let a peer subtract two contributions masked alike and see the
    difference of the gradients, so it raises MaskReuseError instead. After a failure the
    controller forms a new generation anyway, which re-keys. (A redone step's second attempt
    has masks of its own: the attempt is part of the counter block.)

Dropout: setup() polls the store until the keys of all cross-partner peers are there and raises
SecAggSetupError (a CollectiveError) naming the missing ranks when `timeout_s` passes, so a peer
that died between the plan and the rendezvous fails the join instead of hanging it. A peer lost
in the middle of a step makes the integer all-reduce fail as it would without masks.

Cost per step and worker: per masked peer one AES keystream and an add; encode (scale, range
check, round, convert, add); decode (sign extension, convert and scale); one pass for the next
step's exponents; all run chunk by chunk (CHUNK values at a time) so that the chain stays in
cache. On the 32-bit wire the all-reduce moves the bytes of the plain one.
Masking work grows with the number of cross-partner peers, so the overhead is highest when every
worker is its own partner. See bench/secagg_overhead.py.

Wiring (worker): `agg.setup(store, rank, partners, generation, timeout_s)` right after the
generation's GenerationGroup is formed, with `store` = PrefixStore(f"gen-{generation}/", own
TCPStore client) (one client per worker: a client is not safe to share between threads), and
`agg.all_reduce_sum(start, replica.buckets, replica.step)` in place of the plain all-reduce of
`replica.buckets`, where start(tensors, op) starts reducing in place (SUM, or MAX for the
agreement) and returns the function that waits for it; GenerationGroup does this wiring.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
# Elements per cache block: every step of encode -> mask -> reduce runs on one block (1-2 MiB of
# ring words plus as much keystream) while it is in cache, instead of ~3 passes per masked peer
# over the whole bucket from memory. Measured ~25-45% less time than whole-bucket passes here.
CHUNK = 1 << 18
_PUBKEY_BYTES = 32
_MAX_BUCKET = 2**33  # 2^32 AES blocks of 8 bytes or more: the counter's low word must not wrap
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


def pg_all_reduce(pg: dist.ProcessGroup, timeout: timedelta) -> StartAllReduce:
    """A StartAllReduce over a raw process group (e.g. dist.ProcessGroupGloo), for tests."""

    def start(tensors: list[torch.Tensor],
              op: dist.ReduceOp = dist.ReduceOp.SUM) -> Callable[[], None]:
        works = [pg.allreduce([t], op) for t in tensors]

        def wait() -> None:
            for w in works:
                w.wait(timeout)

        return wait

    return start


class SecureAggregator:
    """One worker's secure-aggregation state; call setup() once per generation.

    Usage: `agg.setup(store, rank, partners, generation, timeout_s)` at join, then per step
    `agg.all_reduce_sum(start, buckets, step)` in place of the plain all-reduce of `buckets`.
    """

    def __init__(self, wire_bits: int | None = None) -> None:
        """`wire_bits` forces the wire word (32 or 64); by default it follows the group size
        (32 up to WORD32_MAX_WORLD ranks)."""
        if wire_bits not in (None, 32, 64):
            raise ValueError(f"wire_bits must be 32 or 64, not {wire_bits}")
        self._wire_bits_choice = wire_bits
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.partners: tuple[str, ...] = ()
        self._pair_keys: dict[int, bytes] = {}  # peer rank -> AES key, cross-partner peers only
        self._masked_steps: set[int] = set()
        self.last_nonfinite = 0  # NaN/Inf values in the last step, whole group
        self.last_exponents: list[int] = []  # the exponent per segment the last step used
        self._next_exponents: list[int] | None = None  # from the last aggregate; None: agree
        self.redone_steps = 0  # steps re-sent at agreed scales after a cached scale overflowed
        self.last_payload_bytes = 0  # what the last step all-reduced: ring words, agreements
        self._enc: list[torch.Tensor] = []  # the encoded buckets, reused every step
        self._scratch = torch.empty(CHUNK, dtype=torch.float32)
        self._zeros = memoryview(bytes(CHUNK * 8))
        self._ring(64 if wire_bits == 64 else 32, 2)

    def _ring(self, wire_bits: int, world: int) -> None:
        """Fix the wire word, ring and precision for a group of `world` ranks."""
        self.wire_bits = wire_bits
        self.wire_dtype = torch.int32 if wire_bits == 32 else torch.int64
        self.ring_bits = wire_bits - 1 - world.bit_length()
        self.precision_bits = self.ring_bits - 1 - world.bit_length()
        self._ring_mask = (1 << self.ring_bits) - 1
        # update_into wants room for one AES block (16 bytes) beyond the data.
        self._ks = torch.empty(CHUNK + 16 // self.wire_dtype.itemsize, dtype=self.wire_dtype)
        self._ks_bytes = memoryview(self._ks.numpy()).cast("B")

    # -- key agreement, once per generation ---------------------------------------------------
    def setup(self, store: dist.Store, rank: int, partners: Sequence[str], generation: int,
              timeout_s: float) -> None:
        """Agree pairwise keys with every rank of another partner in this generation.

        `store` is the generation's store (the PrefixStore its ProcessGroupGloo rendezvoused in
        works; keys also carry the generation, so a shared client store works too). `partners`
        is the partner of every rank, from the controller's plan. Raises SecAggSetupError after
        `timeout_s` if a needed peer never publishes its key.
        """
        world = len(partners)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world}")
        if world > MAX_WORLD:
            raise ValueError(f"secure aggregation supports at most {MAX_WORLD} workers, "
                             f"not {world}")
        wire_bits = self._wire_bits_choice or (32 if world <= WORD32_MAX_WORLD else 64)
        if wire_bits == 32 and world > WORD32_MAX_WORLD:
            raise ValueError(f"a 32-bit wire supports at most {WORD32_MAX_WORLD} workers, "
                             f"not {world}")
        self.close()
        self._ring(wire_bits, world)
        self.generation, self.rank, self.world = generation, rank, world
        self.partners = tuple(partners)
        try:
            self._agree_keys(store, private_key=X25519PrivateKey.generate(), timeout_s=timeout_s)
        except BaseException:
            self.close()  # never leave half a key set behind: sums would silently be wrong
            raise

    def _agree_keys(self, store: dist.Store, private_key: X25519PrivateKey,
                    timeout_s: float) -> None:
        rank, generation, partners = self.rank, self.generation, self.partners
        peers = [j for j in range(self.world) if partners[j] != partners[rank]]
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
            info = b"|".join([b"raysys-secagg-v1", str(generation).encode(),
                              f"{lo},{hi}".encode(), partners[lo].encode(),
                              partners[hi].encode(), pub[lo], pub[hi]])
            self._pair_keys[j] = HKDF(algorithm=hashes.SHA256(), length=16,
                                      salt=None, info=info).derive(shared)

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
        """Forget this generation's keys (the next generation must not reuse them)."""
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
        """Ranks this worker shares a mask with: those of other partners."""
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
        if self._next_exponents is None:
            status = self._send(start, buckets, step, attempt=0, agree=True)
        else:
            self.last_exponents = self._next_exponents
            status = self._send(start, buckets, step, attempt=0, agree=False)
            if status[1]:
                # A rank's value outgrew the cached scale (it was clamped, so nothing wrapped):
                # send the step again at agreed scales, under fresh masks (attempt 1), before
                # anything is decoded. Every rank sees the same status, so all redo it.
                self.redone_steps += 1
                log.debug("secure aggregation: step %d redone at agreed scales", step)
                status = self._send(start, buckets, step, attempt=1, agree=True)
        self.last_nonfinite = status[0]
        for piece in self._pieces(buckets):
            self._decode_piece(buckets, piece)
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
                                    for e in _exponents(buckets)]

    def _send(self, start: StartAllReduce, buckets: list[torch.Tensor], step: int,
              attempt: int, agree: bool) -> list[int]:
        """Mask, encode and sum one attempt of a step; with `agree`, at scales agreed now.
        Returns the group's [non-finite count, overflow count] of the attempt."""
        wait_for_agreement = None
        if agree:
            # The masks do not depend on the values: they are drawn while the agreement is on
            # the wire, which hides its latency behind the AES work.
            agreed = torch.tensor(_exponents(buckets), dtype=torch.int64)
            wait_for_agreement = start([agreed], dist.ReduceOp.MAX)
            self.last_payload_bytes += agreed.numel() * agreed.element_size()
        self._draw_masks(step, attempt)
        if wait_for_agreement is not None:
            wait_for_agreement()
            self.last_exponents = agreed.tolist()
        self._encode_all(buckets)
        start(self._enc)()
        self.last_payload_bytes += sum(e.numel() * e.element_size() for e in self._enc)
        return self._status()

    def _status(self) -> list[int]:
        """The summed [non-finite count, overflow count] of the last attempt."""
        return self._signed_(self._enc[-1][-STATUS_SLOTS:].clone()).tolist()

    def _signed_(self, summed: torch.Tensor) -> torch.Tensor:
        """In place: the signed representative of (sum mod 2^k), by sign extension. torch's
        left shift works on the unsigned bit pattern (dropping bits above 2^k is defined) and
        its right shift of a signed tensor is arithmetic."""
        shift = self.wire_bits - self.ring_bits
        return summed.bitwise_left_shift_(shift).bitwise_right_shift_(shift)

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
        self._encode_all(buckets)
        return self._enc

    def _draw_masks(self, step: int, attempt: int) -> None:
        """Fill the encoding buffers with this rank's mask sum for (step, attempt): + m_ij for
        every peer j above this rank, - m_ij below, so every pair cancels in the group's sum.

        The arithmetic runs on unsigned views of the buffers, where numpy defines addition
        modulo 2^W: the sum is exact modulo 2^k (2^k divides 2^W) with no reduction per peer,
        and no signed overflow anywhere."""
        width = self.wire_dtype.itemsize
        unsigned = _UNSIGNED[self.wire_dtype]
        keystream = self._ks.numpy().view(unsigned)
        for i, e in enumerate(self._enc):
            acc = e.numpy().view(unsigned)
            # One AES-CTR stream per peer and bucket; successive update_into calls continue it.
            streams = [(self._cipher(j, step, i, attempt), j > self.rank)
                       for j in self.masked_peers]
            for a in range(0, acc.size, CHUNK):
                z = min(CHUNK, acc.size - a)
                block, ks = acc[a: a + z], keystream[:z]
                for n, (stream, add) in enumerate(streams):
                    stream.update_into(self._zeros[: z * width], self._ks_bytes)
                    if n == 0:
                        np.copyto(block, ks) if add else np.negative(ks, out=block)
                    elif add:
                        np.add(block, ks, out=block)
                    else:
                        np.subtract(block, ks, out=block)

    def _pieces(self, buckets: list[torch.Tensor]) -> list[tuple[int, int, int]]:
        """(bucket, start, length) of CHUNK values at most: the units encoded and decoded while
        they are in cache."""
        return [(i, a, min(CHUNK, b.numel() - a))
                for i, b in enumerate(buckets) for a in range(0, b.numel(), CHUNK)]

    def _slot_scales(self, buckets: list[torch.Tensor]) -> torch.Tensor:
        """The scale of every value of the last bucket's tail: the loss sum's, then the
        counts'."""
        base = len(buckets) - 1
        return torch.tensor([self._scale(self.last_exponents[base + 1])]
                            + [self._scale(self.last_exponents[base + 2])] * COUNT_SLOTS,
                            dtype=torch.float64)

    def _encode_all(self, buckets: list[torch.Tensor]) -> None:
        """Add the fixed-point encoding of `buckets` at last_exponents' scales, and the status
        counts, to the buffers (which hold the masks, or zeros); reduce them into the ring."""
        counts = [0, 0]  # non-finite, overflowed
        for piece in self._pieces(buckets):
            self._encode_piece(buckets, piece, counts)
        unsigned = _UNSIGNED[self.wire_dtype]
        status = self._enc[-1].numpy().view(unsigned)[-STATUS_SLOTS:]
        np.add(status, np.array(counts, dtype=unsigned), out=status)
        np.bitwise_and(status, unsigned(self._ring_mask), out=status)

    def _encode_piece(self, buckets: list[torch.Tensor], piece: tuple[int, int, int],
                      counts: list[int]) -> None:
        """Add one piece's encoding to its buffer and reduce it into the ring [0, 2^k). A value
        beyond the scale's range (a cached scale that was too small) is clamped and counted,
        a NaN/Inf encoded as 0 and counted."""
        i, a, z = piece
        unsigned = _UNSIGNED[self.wire_dtype]
        flat = buckets[i].reshape(-1)
        total = flat.numel()
        body = total - TAIL if i == len(buckets) - 1 else total
        acc = self._enc[i].numpy().view(unsigned)[a: a + z]
        bound = float(2**self.precision_bits)
        m = min(a + z, body) - a  # gradient values in this piece; the tail's slots follow
        if m > 0:
            values = torch.mul(flat[a: a + m], self._scale(self.last_exponents[i]),
                               out=self._scratch[:m])
            self._check_range(values, bound, counts)
            fixed = self._ks[:m]  # the keystream buffer is free once the masks are drawn
            fixed.copy_(values.round_())  # exact: |values| <= 2^P
            np.add(acc[:m], fixed.numpy().view(unsigned), out=acc[:m])
        lo, hi = max(a, body), min(a + z, total)
        if lo < hi:  # slots of the tail, each at its segment's own scale
            tail = flat[lo:hi].double() * self._slot_scales(buckets)[lo - body: hi - body]
            self._check_range(tail, bound, counts)
            np.add(acc[lo - a:], tail.round_().to(self.wire_dtype).numpy().view(unsigned),
                   out=acc[lo - a:])
        np.bitwise_and(acc, unsigned(self._ring_mask), out=acc)

    @staticmethod
    def _check_range(values: torch.Tensor, bound: float, counts: list[int]) -> None:
        lo, hi = torch.aminmax(values)
        # `not <=` is also true for NaN, so the slow path runs exactly when it is needed.
        if not (-float(lo) <= bound and float(hi) <= bound):
            finite = torch.isfinite(values)
            counts[0] += int(values.numel() - finite.sum())
            counts[1] += int((finite & (values.abs() > bound)).sum())
            values.nan_to_num_(0.0, 0.0, 0.0).clamp_(-bound, bound)

    def _decode_piece(self, buckets: list[torch.Tensor], piece: tuple[int, int, int]) -> None:
        """Turn one piece of summed ring values back into floats in `buckets`, in place."""
        i, a, z = piece
        chunk = self._signed_(self._enc[i][a: a + z])
        flat = buckets[i].view(-1)
        # integer -> float32 is correctly rounded, and 1/scale is a power of two: exact.
        torch.mul(chunk, 1.0 / self._scale(self.last_exponents[i]), out=flat[a: a + z])
        total = flat.numel()
        body = total - TAIL if i == len(buckets) - 1 else total
        lo, hi = max(a, body), min(a + z, total)
        if lo < hi:
            flat[lo:hi] = chunk[lo - a:].double() / self._slot_scales(buckets)[lo - body:
                                                                                hi - body]

    def _cipher(self, peer: int, step: int, bucket: int, attempt: int = 0) -> CipherContext:
        # AES-CTR keystream = encryption of zeros. The initial counter block is (step, attempt,
        # bucket, 0), so no two (step, attempt, bucket) of a pair share keystream unless a
        # bucket is longer than 2^32 AES blocks.
        nonce = struct.pack(">QHHI", step, attempt, bucket, 0)
        return Cipher(algorithms.AES(self._pair_keys[peer]), modes.CTR(nonce)).encryptor()

    def pair_mask(self, peer: int, step: int, bucket: int, numel: int,
                  attempt: int = 0) -> torch.Tensor | None:
        """The mask this rank shares with `peer` for (step, bucket, attempt), or None if the
        pair is not masked (same partner). For tests and audits, not the hot path."""
        if peer not in self._pair_keys:
            return None
        stream = self._cipher(peer, step, bucket, attempt)
        parts = []
        for a in range(0, numel, CHUNK):
            z = min(CHUNK, numel - a)
            stream.update_into(self._zeros[: z * self.wire_dtype.itemsize], self._ks_bytes)
            parts.append(self._ks[:z].bitwise_and(self._ring_mask))
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.wire_dtype)

    def _reserve(self, buckets: list[torch.Tensor]) -> None:
        sizes = [b.numel() for b in buckets]
        sizes[-1] += STATUS_SLOTS
        if sizes[-1] <= TAIL + STATUS_SLOTS:
            raise ValueError(f"the last bucket must end in Replica's {TAIL} tail slots and hold "
                             "gradients before them")
        if len(sizes) >= 2**16:  # the bucket's field in the AES counter block is 16 bits
            raise ValueError(f"{len(sizes)} buckets are too many; use larger buckets")
        if max(sizes) > _MAX_BUCKET:
            raise ValueError(f"a bucket of {max(sizes)} values is too long for one AES-CTR "
                             f"stream (at most {_MAX_BUCKET}); use smaller buckets")
        if [e.numel() for e in self._enc] != sizes or self._enc[0].dtype != self.wire_dtype:
            self._enc = [torch.empty(n, dtype=self.wire_dtype) for n in sizes]


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
        largest = max(-lo, hi)
        # largest = f * 2^e with 0.5 <= f < 1
        out.append(math.frexp(largest)[1] if largest else MIN_SCALE_EXPONENT)
    return out
