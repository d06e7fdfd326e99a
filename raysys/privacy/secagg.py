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

Ring and fixed point (defaults RING_BITS=56, FRAC_BITS=24):
  * Values travel as int64 in [0, 2^56). A sum over w <= MAX_WORLD = 2^(63-56) - 1 = 127 ranks
    stays below 2^63, so gloo's int64 sum never overflows (signed overflow is undefined in C++,
    so we do not rely on wrap-around anywhere); the sum is reduced mod 2^56 afterwards.
    Negative values are two's complement in the ring (x & (2^56 - 1)); the decoded aggregate is
    the signed representative in [-2^55, 2^55).
  * Scale 2^24: resolution 6e-8 on a local SUM, rounding error <= 3e-8 per value and worker,
    i.e. <= w * 3e-8 on the global sum before apply() divides by the sample count. That is
    below float32's own rounding for any value above 0.5 and irrelevant to SGD below it.
  * Range: each worker's values are clamped to |x| <= 2^(31 - bitlen(w)) (2^27 = 1.3e8 at 8
    workers, 2^24 = 1.7e7 at 127) so that the global sum cannot wrap. Gradient sums over a
    local batch are far below that; a value beyond it is clipped (like value clipping) and
    counted in `last_clamped`, never silently wrapped.
  * The tail slots need no separate scale: the sample counts are integers and are exact
    (n * 2^24 < 2^55 for any batch), the loss sum gets the same 6e-8 resolution, finer than the
    float32 it came from once it exceeds 1.
  * A NaN/Inf anywhere cannot be encoded. Each contribution carries two extra ring slots
    [non-finite count, clamped count] (masked like the rest); if any worker had a non-finite
    value the whole decoded step is NaN (except the sample counts), so divergence shows up in
    the loss as it would with the plain float all-reduce.
  Fixed-point sums are associative, so the aggregate no longer depends on the reduction order;
  it does depend (at the 2^-24 level) on how samples are split, because each worker rounds its
  own local sum: secure aggregation is equal to the plain path within quantization error, not
  bit for bit.

Keys and masks:
  * Per generation every worker makes a fresh X25519 key pair and publishes the public key with
    its partner name under f"secagg/gen-{g}/{rank}" in the generation's store. The partner of
    every rank comes from the controller's plan; a published name that disagrees is an error (a
    worker cannot opt out of masking by claiming to be a peer's partner).
  * Pair key: HKDF-SHA256(X25519 shared secret, info = generation, both ranks, both partners,
    both public keys) -> a 128-bit AES key. New generation => new key pairs => new masks.
  * Mask of (pair, step, bucket): the AES-128-CTR keystream with initial counter block
    step (8 bytes) | bucket (4 bytes) | 0 (4 bytes), read as int64 and reduced mod 2^k. AES-CTR
    is a cryptographic PRG (numpy's PCG64/Philox are not: their output reveals their state),
    and with AES-NI OpenSSL produces ~5 GB/s, faster than numpy's generators here (1.2 ms vs
    3.6 ms (PCG64) for 1M int64 on this host), so there is no speed reason to pick a weaker one.
  * A (generation, step) pair is masked at most once: re-running a step in the same generation
    with different inputs would let a peer subtract two contributions masked alike and see the
    difference of the gradients, so it raises MaskReuseError instead. After a failure the
    controller forms a new generation anyway, which re-keys.

Dropout: setup() polls the store until the keys of all cross-partner peers are there and raises
SecAggSetupError (a CollectiveError) naming the missing ranks when `timeout_s` passes, so a peer
that died between the plan and the rendezvous fails the join instead of hanging it. A peer lost
in the middle of a step makes the int64 all-reduce fail as it would without masks.

Cost per step and worker: encode (scale, range check, round, convert), per masked peer one AES
keystream plus an `and` and an add, and decode (sign extension, convert, scale), all run chunk by
chunk (CHUNK values at a time) so that the chain stays in cache; plus the all-reduce moves int64,
twice the bytes of float32. Masking work grows with the number of cross-partner peers, so the
overhead is highest when every worker is its own partner. See bench/secagg_overhead.py.

Wiring (worker): `agg.setup(store, rank, partners, generation, timeout_s)` right after the
generation's GenerationGroup is formed, with `store` = PrefixStore(f"gen-{generation}/", own
TCPStore client) (one client per worker: a client is not safe to share between threads), and
`agg.all_reduce_sum(group.all_reduce_sum, replica.buckets, replica.step)` in place of
`group.all_reduce_sum(replica.buckets)`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raysys.train.collective import CollectiveError
from raysys.train.replica import TAIL

log = logging.getLogger(__name__)

RING_BITS = 56
FRAC_BITS = 24
MAX_WORLD = 2 ** (63 - RING_BITS) - 1  # 127: see the module docstring for why not 128
STATUS_SLOTS = 2  # [non-finite count, clamped count], appended to the last encoded bucket
# Replica's last bucket ends in [loss_sum, loss_samples, samples]: the slots after loss_sum are
# counts, kept exact when a non-finite value poisons a step.
COUNT_SLOTS = TAIL - 1
# Elements per cache block: every step of encode -> mask -> reduce runs on one block of 2 MiB of
# int64 (plus as much keystream) while it is in cache, instead of ~3 passes per masked peer over
# the whole bucket from memory. Measured ~25-45% less time than whole-bucket passes on this host.
CHUNK = 1 << 18
_PUBKEY_BYTES = 32
_MAX_BUCKET = 2**33  # 2^32 AES blocks of two values: the counter's low word must not wrap

AllReduce = Callable[[list[torch.Tensor]], None]
"""Sums a list of tensors across the group, in place (GenerationGroup.all_reduce_sum is one)."""


class SecAggError(CollectiveError):
    """Secure aggregation failed; a CollectiveError, so the worker's step error path applies."""


class SecAggSetupError(SecAggError):
    """Key agreement for a generation failed: a peer's key is missing, malformed or mislabeled."""


class MaskReuseError(SecAggError):
    """A step was about to be masked twice with the same keys (see the module docstring)."""


def pg_all_reduce(pg: dist.ProcessGroup, timeout: timedelta) -> AllReduce:
    """An AllReduce over a raw process group (e.g. dist.ProcessGroupGloo), for tests and bench."""

    def all_reduce(tensors: list[torch.Tensor]) -> None:
        works = [pg.allreduce([t]) for t in tensors]
        for w in works:
            w.wait(timeout)

    return all_reduce


class SecureAggregator:
    """One worker's secure-aggregation state; call setup() once per generation.

    Usage: `agg.setup(store, rank, partners, generation, timeout_s)` at join, then per step
    `agg.all_reduce_sum(all_reduce, buckets, step)` in place of `all_reduce(buckets)`.
    """

    def __init__(self, ring_bits: int = RING_BITS, frac_bits: int = FRAC_BITS) -> None:
        if not 8 < ring_bits <= 62 or not 0 <= frac_bits < ring_bits - 8:
            raise ValueError(f"bad fixed point: ring_bits={ring_bits}, frac_bits={frac_bits}")
        self.ring_bits = ring_bits
        self.frac_bits = frac_bits
        self.max_world = 2 ** (63 - ring_bits) - 1
        self._ring_mask = (1 << ring_bits) - 1
        self._scale = float(2**frac_bits)
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.partners: tuple[str, ...] = ()
        self._pair_keys: dict[int, bytes] = {}  # peer rank -> AES key, cross-partner peers only
        self._masked_steps: set[int] = set()
        self.last_clamped = 0  # values clipped to the range in the last step, whole group
        self.last_nonfinite = 0  # NaN/Inf values in the last step, whole group
        # The encoded buckets (reused every step), and one chunk of float scratch and keystream.
        self._enc: list[torch.Tensor] = []
        self._scratch = torch.empty(CHUNK, dtype=torch.float32)
        # update_into wants room for one AES block beyond the data: two more int64.
        self._ks = torch.empty(CHUNK + 2, dtype=torch.int64)
        self._ks_bytes = memoryview(self._ks.numpy()).cast("B")
        self._zeros = memoryview(bytes(CHUNK * 8))

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
        if world > self.max_world:
            raise ValueError(f"secure aggregation supports at most {self.max_world} workers "
                             f"with a 2^{self.ring_bits} ring, not {world}")
        self.close()
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

    @property
    def masking(self) -> bool:
        """Whether this group masks at all (it has more than one partner)."""
        return bool(self._pair_keys)

    @property
    def masked_peers(self) -> tuple[int, ...]:
        """Ranks this worker shares a mask with: those of other partners."""
        return tuple(sorted(self._pair_keys))

    # -- per step ------------------------------------------------------------------------------
    def all_reduce_sum(self, all_reduce: AllReduce, buckets: list[torch.Tensor],
                       step: int) -> None:
        """Sum the float `buckets` across the generation, in place, without revealing them.

        `all_reduce` must sum a list of int64 tensors in place (GenerationGroup.all_reduce_sum,
        or pg_all_reduce(pg, timeout)). Every rank must call this with the same `step` and the
        same bucket sizes.
        """
        if self.generation is None:
            raise SecAggError("SecureAggregator.setup() was not called for this generation")
        if self.world == 1:
            return
        if not self.masking:
            all_reduce(buckets)
            return
        if step in self._masked_steps:
            raise MaskReuseError(
                f"generation {self.generation}: step {step} was already masked with these keys; "
                "re-run it in a new generation (re-keyed) instead")
        self._masked_steps.add(step)
        enc = self._encode(buckets, step)
        all_reduce(enc)
        self.decode_(enc, buckets)

    def encode(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """The fixed-point ring encoding of `buckets` plus the status slots, WITHOUT masks
        (representatives in [0, 2^k)); for tests and audits. Reused buffers: copy to keep."""
        return self._encode(buckets, None)

    def _encode(self, buckets: list[torch.Tensor], step: int | None) -> list[torch.Tensor]:
        """Encode, add this rank's masks for `step` (none if None) and reduce into the ring."""
        self._reserve(buckets)
        # Each value is clamped so that the sum of `world` of them stays inside (-2^(k-1),
        # 2^(k-1)): bitlen(w) >= log2(w + 1), hence w * 2^(k-1-bitlen(w)) < 2^(k-1).
        bound = float(2 ** (self.ring_bits - 1 - self.world.bit_length()))
        counts = [0, 0]  # non-finite, clamped
        peers = self.masked_peers if step is not None else ()
        last = len(buckets) - 1
        for i, (b, e) in enumerate(zip(buckets, self._enc, strict=True)):
            flat = b.reshape(-1)
            n, total = flat.numel(), e.numel()
            # One AES-CTR stream per peer and bucket; successive update_into calls continue it.
            streams = [(self._cipher(j, step, i), j > self.rank) for j in peers]
            for a in range(0, total, CHUNK):
                z = min(CHUNK, total - a)
                chunk = e[a: a + z]
                if a < n:
                    m = min(z, n - a)  # floats in this chunk; the status slots follow them
                    self._encode_chunk(flat[a: a + m], chunk[:m], bound, counts)
                if i == last and a + z == total:
                    # Every value is encoded by now, so the counts are final; they are masked
                    # with the rest of the chunk.
                    chunk[-STATUS_SLOTS:] = torch.tensor(counts, dtype=torch.int64)
                for stream, add in streams:
                    stream.update_into(self._zeros[: z * 8], self._ks_bytes)
                    mask = self._ks[:z].bitwise_and_(self._ring_mask)
                    # Rank i adds m_ij for j > i and subtracts it for j < i: the pair cancels.
                    # Partial sums stay within (-w * 2^k, w * 2^k): no int64 overflow.
                    if add:
                        chunk.add_(mask)
                    else:
                        chunk.sub_(mask)
                chunk.bitwise_and_(self._ring_mask)  # two's complement -> [0, 2^k)
        return self._enc

    def _encode_chunk(self, src: torch.Tensor, dst: torch.Tensor, bound: float,
                      counts: list[int]) -> None:
        """Fixed point of one chunk of floats into `dst` (signed, not yet reduced)."""
        scaled = torch.mul(src, self._scale, out=self._scratch[: src.numel()])
        lo, hi = torch.aminmax(scaled)
        # `not <=` is also true for NaN, so the slow path runs exactly when it is needed.
        if not (-float(lo) <= bound and float(hi) <= bound):
            finite = torch.isfinite(scaled)
            counts[0] += int(src.numel() - finite.sum())
            counts[1] += int((finite & (scaled.abs() > bound)).sum())
            scaled.nan_to_num_(0.0).clamp_(-bound, bound)
        scaled.round_()
        dst.copy_(scaled)  # exact: |scaled| <= 2^54 < 2^63

    def _cipher(self, peer: int, step: int, bucket: int) -> CipherContext:
        # AES-CTR keystream = encryption of zeros. The initial counter block is (step, bucket,
        # 0), so no two (step, bucket) of a pair share keystream unless a bucket is longer than
        # 2^32 AES blocks (2^33 values).
        nonce = struct.pack(">QII", step, bucket, 0)
        return Cipher(algorithms.AES(self._pair_keys[peer]), modes.CTR(nonce)).encryptor()

    def pair_mask(self, peer: int, step: int, bucket: int, numel: int) -> torch.Tensor | None:
        """The mask this rank shares with `peer` for (step, bucket), or None if the pair is not
        masked (same partner). For tests and audits, not the hot path."""
        if peer not in self._pair_keys:
            return None
        stream = self._cipher(peer, step, bucket)
        parts = []
        for a in range(0, numel, CHUNK):
            z = min(CHUNK, numel - a)
            stream.update_into(self._zeros[: z * 8], self._ks_bytes)
            parts.append(self._ks[:z].bitwise_and(self._ring_mask))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def decode_(self, enc: list[torch.Tensor], buckets: list[torch.Tensor]) -> None:
        """Turn the summed ring values `enc` back into floats in `buckets`, in place."""
        shift = 64 - self.ring_bits
        inv_scale = 1.0 / self._scale  # a power of two: the multiplication is exact
        for b, e in zip(buckets, enc, strict=True):
            flat = b.view(-1)
            n, total = flat.numel(), e.numel()
            for a in range(0, total, CHUNK):
                chunk = e[a: a + CHUNK]
                # Signed representative of (sum mod 2^k) by sign extension: torch's left shift
                # works on the unsigned bit pattern (dropping bits above 2^k is defined) and
                # its right shift of a signed tensor is arithmetic.
                chunk.bitwise_left_shift_(shift).bitwise_right_shift_(shift)
                if a < n:
                    out = flat[a: a + CHUNK]
                    out.copy_(chunk[: out.numel()])  # int64 -> float32, correctly rounded
                    out.mul_(inv_scale)
        status = enc[-1][-STATUS_SLOTS:].tolist()
        self.last_nonfinite, self.last_clamped = int(status[0]), int(status[1])
        if self.last_nonfinite:
            # Mirror the plain float path: a NaN/Inf gradient poisons the step. The sample
            # counts (the end of Replica's tail) stay valid so apply() and the reports work.
            counts = buckets[-1].view(-1)[-COUNT_SLOTS:].clone()
            for b in buckets:
                b.fill_(float("nan"))
            buckets[-1].view(-1)[-COUNT_SLOTS:] = counts
        if self.last_clamped:
            log.warning("secure aggregation: %d gradient values exceeded the fixed-point range "
                        "and were clipped (generation %s)", self.last_clamped, self.generation)

    def _reserve(self, buckets: list[torch.Tensor]) -> None:
        sizes = [b.numel() for b in buckets]
        sizes[-1] += STATUS_SLOTS
        if max(sizes) > _MAX_BUCKET:
            raise ValueError(f"a bucket of {max(sizes)} values is too long for one AES-CTR "
                             f"stream (at most {_MAX_BUCKET}); use smaller buckets")
        if [e.numel() for e in self._enc] != sizes:
            self._enc = [torch.empty(n, dtype=torch.int64) for n in sizes]
