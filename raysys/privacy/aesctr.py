"""AES-128 counter-mode keystreams for secure-aggregation masks, added straight into a buffer.

The keystream. A pair's mask for one (step, attempt, bucket) of a generation is AES-128 under
the pair's key applied to the counter blocks

    block j = be64(hi) || be64(lo_j),   hi = step,   lo_j = attempt << 60 | bucket << 44 | j

(the AES-128-CTR keystream from the counter block of j = 0: CTR mode counts the 128-bit block up
by one, and j never carries out of its 44 bits), read as little-endian
wire words: block j covers words 4j..4j+3 of the bucket on the 32-bit wire, 2j..2j+1 on the
64-bit one. Distinct (step, attempt, bucket, j) give distinct AES inputs under one key, so the
output is pseudo-random up to AES's birthday bound (2^64 blocks per key; a generation draws far
fewer), exactly as CTR mode's is.

Why not OpenSSL's own modes. A worker adds one mask per masked peer to its encoded gradients:
with OpenSSL the keystream is written to memory and a second pass adds it (the fastest mode
here, XTS of zeros at ~16 GB/s, came to 2.8 ms for 7 peers and 1M words, 0.8 ms of it the
additions). The loop here keeps each block in a register from the AES rounds to the addition,
and runs the rounds on 512-bit vectors (4 blocks per instruction) where the CPU has vector AES:
1.3 ms for the same work on this host (bench/secagg_overhead.py measures the step).

What runs where. The loop is LLVM IR compiled at first use by llvmlite (numba's code generator,
a dependency already): `aesenc` on 512-bit vectors with VAES and AVX-512, 256-bit with VAES and
AVX2, 128-bit with AES-NI; four vectors in flight per iteration to fill the AES pipelines. The
rounds are the CPU's AES instructions; only the key expansion (FIPS-197, a few lines below) and
the counter layout are ours, and both are checked against OpenSSL: at compile time one short run
is compared with OpenSSL's AES-ECB of the same blocks, and a mismatch (or a CPU without AES
instructions, or a failed compilation) falls back to OpenSSL's AES-ECB over a counter buffer
plus a numpy pass: slower, the same masks. So a group may mix CPUs freely.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import struct
import threading
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = logging.getLogger(__name__)

BLOCK_BYTES = 16
BUCKET_SHIFT, ATTEMPT_SHIFT = 44, 60  # lo = attempt << 60 | bucket << 44 | block index
MAX_BLOCKS = 1 << BUCKET_SHIFT  # per (step, attempt, bucket): the block index's field
MAX_BUCKETS = 1 << (ATTEMPT_SHIFT - BUCKET_SHIFT)
MAX_ATTEMPTS = 1 << (64 - ATTEMPT_SHIFT)
_UNROLL = 4  # vectors in flight per loop iteration (AES latency ~4 cycles, 1-2 issued a cycle)
OPS = ("store", "add", "sub")  # words = ks, words += ks, words -= ks (mod 2^W)
_LANE_CHOICES = (4, 2, 1)  # blocks per vector: 512-, 256- and 128-bit AES instructions
_ENV_LANES = "RAYSYS_AES_LANES"  # force a width (or 0: OpenSSL only), for tests and comparisons


# -- AES-128 key expansion (FIPS-197, section 5.2) ---------------------------------------------
def _sbox() -> list[int]:
    """The AES S-box: the multiplicative inverse in GF(2^8) followed by the affine map. Built
    by walking the generator 3 and its inverse together (p * q = 1 throughout)."""
    box = [0x63] * 256
    p = q = 1
    while True:
        p ^= ((p << 1) ^ (0x1B if p & 0x80 else 0)) & 0xFF  # p *= 3
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        q ^= 0x09 if q & 0x80 else 0  # q /= 3
        x = q
        for shift in (1, 2, 3, 4):
            x ^= ((q << shift) | (q >> (8 - shift))) & 0xFF
        box[p] = x ^ 0x63
        if p == 1:
            return box


_SBOX = _sbox()


def round_keys(key: bytes) -> bytes:
    """The 11 round keys (176 bytes) of AES-128 `key`."""
    if len(key) != BLOCK_BYTES:
        raise ValueError(f"an AES-128 key is 16 bytes, not {len(key)}")
    w, rcon = list(key), 1
    while len(w) < 11 * BLOCK_BYTES:
        t = w[-4:]
        if len(w) % BLOCK_BYTES == 0:
            t = [_SBOX[t[1]] ^ rcon, _SBOX[t[2]], _SBOX[t[3]], _SBOX[t[0]]]
            rcon = ((rcon << 1) ^ (0x1B if rcon & 0x80 else 0)) & 0xFF
        w += [a ^ b for a, b in zip(w[-16:-12], t, strict=True)]
    return bytes(w)


class PairKey:
    """A pair's AES-128 key with its round keys, laid out for the compiled loop."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        rounds = np.frombuffer(round_keys(key), dtype=np.uint64).reshape(11, 2)
        # Every round key repeated for each block a vector holds (the widest: 4).
        self.rounds = np.ascontiguousarray(np.tile(rounds, (1, max(_LANE_CHOICES))))
        self.rounds_address = self.rounds.ctypes.data


# -- the compiled loop --------------------------------------------------------------------------
_INTRINSIC = {4: ".512", 2: ".256", 1: ""}


def _kernel_ir(name: str, lanes: int, word_bits: int, op: str) -> str:
    """IR of `void name(iN* words, i64 iterations, i64* rounds, i64 lo, i64 hi)`: for
    `iterations` x _UNROLL x lanes blocks from counter (hi, lo), op the keystream into `words`.
    A vector holds `lanes` counter blocks as i64 pairs (hi, lo + k), byte-swapped to big-endian
    just before the rounds (one shuffle), which makes each block be64(hi) || be64(lo + k)."""
    vec = f"<{2 * lanes} x i64>"
    wvec = f"<{BLOCK_BYTES * 8 // word_bits * lanes} x i{word_bits}>"
    words_per_block = BLOCK_BYTES * 8 // word_bits
    enc = f"@llvm.x86.aesni.aesenc{_INTRINSIC[lanes]}"
    last = f"@llvm.x86.aesni.aesenclast{_INTRINSIC[lanes]}"
    lo_lanes = ", ".join(f"i64 {x}" for k in range(lanes) for x in (0, -1))
    out = [f"define void @{name}(i{word_bits}* noalias %words, i64 %iterations, "
           "i64* noalias %rounds, i64 %lo, i64 %hi) {", "entry:"]
    for r in range(11):  # PairKey.rounds: a row of 2 * max(_LANE_CHOICES) words per round
        out += [f"  %rq{r} = getelementptr i64, i64* %rounds, i64 {r * 2 * max(_LANE_CHOICES)}",
                f"  %rp{r} = bitcast i64* %rq{r} to {vec}*",
                f"  %rk{r} = load {vec}, {vec}* %rp{r}, align 8"]
    prev = "undef"
    for k in range(lanes):  # base = <hi, lo, hi, lo + 1, ...>
        out += [f"  %l{k} = add i64 %lo, {k}",
                f"  %b{2 * k} = insertelement {vec} {prev}, i64 %hi, i32 {2 * k}",
                f"  %b{2 * k + 1} = insertelement {vec} %b{2 * k}, i64 %l{k}, i32 {2 * k + 1}"]
        prev = f"%b{2 * k + 1}"
    out += ["  %none = icmp eq i64 %iterations, 0",
            "  br i1 %none, label %done, label %loop",
            "loop:",
            "  %i = phi i64 [0, %entry], [%next, %loop]",
            f"  %first = mul i64 %i, {_UNROLL * lanes}",  # first block of this iteration
            f"  %f0 = insertelement {vec} undef, i64 %first, i32 0",
            f"  %fs = shufflevector {vec} %f0, {vec} undef, <{2 * lanes} x i32> zeroinitializer",
            f"  %fl = and {vec} %fs, <{lo_lanes}>",  # added to the lo halves only
            f"  %ctr = add {vec} {prev}, %fl"]
    for u in range(_UNROLL):
        step = ", ".join(f"i64 {x}" for k in range(lanes) for x in (0, u * lanes))
        out += [f"  %c{u} = add {vec} %ctr, <{step}>",
                f"  %e{u} = call {vec} @llvm.bswap.v{2 * lanes}i64({vec} %c{u})",
                f"  %s{u}r0 = xor {vec} %e{u}, %rk0"]
        out += [f"  %s{u}r{r} = call {vec} {enc}({vec} %s{u}r{r - 1}, {vec} %rk{r})"
                for r in range(1, 10)]
        out += [f"  %s{u}r10 = call {vec} {last}({vec} %s{u}r9, {vec} %rk10)",
                f"  %k{u} = bitcast {vec} %s{u}r10 to {wvec}",
                f"  %o{u} = add i64 %first, {u * lanes}",
                f"  %w{u} = mul i64 %o{u}, {words_per_block}",
                f"  %p{u} = getelementptr i{word_bits}, i{word_bits}* %words, i64 %w{u}",
                f"  %v{u} = bitcast i{word_bits}* %p{u} to {wvec}*"]
        if op == "store":
            out.append(f"  store {wvec} %k{u}, {wvec}* %v{u}, align {word_bits // 8}")
        else:
            out += [f"  %a{u} = load {wvec}, {wvec}* %v{u}, align {word_bits // 8}",
                    f"  %r{u} = {op} {wvec} %a{u}, %k{u}",
                    f"  store {wvec} %r{u}, {wvec}* %v{u}, align {word_bits // 8}"]
    out += ["  %next = add i64 %i, 1",
            "  %more = icmp ult i64 %next, %iterations",
            "  br i1 %more, label %loop, label %done",
            "done:",
            "  ret void",
            "}"]
    return "\n".join(out)


_Kernel = Callable[[int, int, int, int, int], None]


class _Compiled:
    """The loops for one vector width: one per (wire word, op), and the engine that owns them."""

    def __init__(self, lanes: int) -> None:
        import llvmlite.binding as llvm  # noqa: PLC0415 - only where the loop is used

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        suffix = _INTRINSIC[lanes]
        vec = f"<{2 * lanes} x i64>"
        decls = [f"declare {vec} @llvm.x86.aesni.{f}{suffix}({vec}, {vec})"
                 for f in ("aesenc", "aesenclast")]
        decls.append(f"declare {vec} @llvm.bswap.v{2 * lanes}i64({vec})")
        names = {(bits, op): f"ks_{op}_{bits}" for bits in (32, 64) for op in OPS}
        ir = "\n".join(decls + [_kernel_ir(n, lanes, bits, op) for (bits, op), n in names.items()])
        module = llvm.parse_assembly(ir)
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
        self.engine = llvm.create_mcjit_compiler(module, machine)
        self.engine.finalize_object()
        # CFUNCTYPE calls release the GIL: masks drawn ahead on a thread run beside training.
        proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_uint64, ctypes.c_uint64)
        self.kernels: dict[tuple[int, str], _Kernel] = {
            key: proto(self.engine.get_function_address(n)) for key, n in names.items()}
        self.lanes = lanes


@functools.cache
def _host_lanes() -> list[int]:
    """The vector widths this CPU's x86 AES instructions allow, widest first (none elsewhere:
    the loop uses x86 intrinsics, and LLVM aborts the process, not raises, on an instruction
    the target lacks, so nothing is compiled that the CPU cannot run)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    import llvmlite.binding as llvm  # noqa: PLC0415

    try:
        llvm.initialize_native_target()
        features = llvm.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no native target or feature list: OpenSSL only
        return []
    has = {name for name, on in features.items() if on}
    lanes = []
    if {"vaes", "avx512f"} <= has:
        lanes.append(4)
    if {"vaes", "avx2"} <= has:
        lanes.append(2)
    if "aes" in has:
        lanes.append(1)
    return lanes


_compile_lock = threading.Lock()  # one compilation at a time (the mask thread may ask too)


_built: dict[int, _Compiled | None] = {}


def _compiled(lanes: int) -> _Compiled | None:
    """The loops for `lanes` blocks per vector, checked against OpenSSL, built once per
    process; None where they cannot be built or disagree (the caller then uses OpenSSL)."""
    if lanes not in _built:  # the lock only until built: this is on every call's path
        with _compile_lock:
            if lanes not in _built:
                _built[lanes] = _build(lanes) if lanes in _host_lanes() else None
    return _built[lanes]


def _build(lanes: int) -> _Compiled | None:
    try:
        compiled = _Compiled(lanes)
    except Exception:  # noqa: BLE001 - any failure of the code generator: use OpenSSL
        log.warning("secure aggregation: the %d-block AES loop could not be compiled; using "
                    "OpenSSL's AES-CTR (same masks, slower)", lanes, exc_info=True)
        return None
    key = PairKey(bytes(range(16)))
    for bits in (32, 64):
        n = 3 * _UNROLL * lanes * BLOCK_BYTES * 8 // bits + 3  # whole iterations and a tail
        base = np.arange(n, dtype=_DTYPES[bits]) * _DTYPES[bits](0x9E3779B97F4A7C15 >> (64 - bits))
        ks = np.frombuffer(_openssl_keystream(key, base.nbytes, 9, 1, 2, 5), dtype=base.dtype)
        for op in OPS:
            words = base.copy()
            _apply_compiled(compiled, words, key, op, 9, 1, 2, 5)
            expected = base.copy()
            _combine(expected, ks, op)
            if not np.array_equal(words, expected):
                log.warning("secure aggregation: the %d-block AES loop disagrees with OpenSSL "
                            "on this CPU; using OpenSSL's AES-CTR", lanes)
                return None
    return compiled


def default_lanes() -> int:
    """The width keystream_into uses: RAYSYS_AES_LANES if set (0 = OpenSSL; a width this CPU
    has), else the widest the CPU has (0 without x86 AES instructions)."""
    host = _host_lanes()
    forced = os.environ.get(_ENV_LANES)
    if forced is None:
        return host[0] if host else 0
    allowed = [0, *host]
    if forced not in map(str, allowed):
        raise ValueError(f"{_ENV_LANES} must be one of {allowed} on this CPU (0: OpenSSL), "
                         f"not {forced!r}")
    return int(forced)


_DTYPES = {32: np.uint32, 64: np.uint64}


def keystream_into(words: np.ndarray, key: PairKey, op: str, step: int, attempt: int,
                   bucket: int, first_block: int, lanes: int | None = None) -> None:
    """`op` the pair's keystream for (step, attempt, bucket), from block `first_block` on, into
    `words` (a contiguous uint32 or uint64 array, modified in place; wrapping mod 2^W):
    "store" writes it, "add" adds it, "sub" subtracts it. `lanes` forces a vector width (0:
    OpenSSL); by default default_lanes()."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, not {op!r}")
    bits = words.dtype.itemsize * 8
    if words.dtype != _DTYPES.get(bits) or not words.flags.c_contiguous:
        raise ValueError(f"words must be a contiguous uint32 or uint64 array, not {words.dtype}")
    per_block = BLOCK_BYTES * 8 // bits
    blocks = -(-words.size // per_block)
    if not (0 <= step < 2**64 and 0 <= attempt < MAX_ATTEMPTS and 0 <= bucket < MAX_BUCKETS
            and first_block >= 0 and first_block + blocks <= MAX_BLOCKS):
        raise ValueError(f"counter out of range: step {step}, attempt {attempt}, bucket "
                         f"{bucket}, blocks {first_block}..{first_block + blocks}")
    lanes = default_lanes() if lanes is None else lanes
    compiled = _compiled(lanes) if lanes else None
    if compiled is None:
        ks = np.frombuffer(_openssl_keystream(key, blocks * BLOCK_BYTES, step, attempt, bucket,
                                              first_block), dtype=words.dtype)[: words.size]
        _combine(words, ks, op)
        return
    _apply_compiled(compiled, words, key, op, step, attempt, bucket, first_block)


def _apply_compiled(compiled: _Compiled, words: np.ndarray, key: PairKey, op: str, step: int,
                    attempt: int, bucket: int, first_block: int) -> None:
    bits = words.dtype.itemsize * 8
    per_iteration = _UNROLL * compiled.lanes * BLOCK_BYTES * 8 // bits  # words
    iterations = words.size // per_iteration
    lo = attempt << ATTEMPT_SHIFT | bucket << BUCKET_SHIFT | first_block
    compiled.kernels[bits, op](words.ctypes.data, iterations, key.rounds_address, lo, step)
    done = iterations * per_iteration
    if done < words.size:  # the tail: one whole iteration into scratch, the words it covers
        scratch = np.empty(per_iteration, dtype=words.dtype)
        tail_block = first_block + done * bits // (BLOCK_BYTES * 8)
        compiled.kernels[bits, "store"](scratch.ctypes.data, 1, key.rounds_address,
                                        lo - first_block + tail_block, step)
        _combine(words[done:], scratch[: words.size - done], op)


def _combine(words: np.ndarray, ks: np.ndarray, op: str) -> None:
    if op == "store":
        words[:] = ks
    elif op == "add":
        np.add(words, ks, out=words)
    else:
        np.subtract(words, ks, out=words)


def _openssl_keystream(key: PairKey, nbytes: int, step: int, attempt: int, bucket: int,
                       first_block: int) -> bytes:
    """The keystream's first `nbytes` from OpenSSL's AES-128-CTR: the reference the compiled
    loop is checked against, and the fallback."""
    lo = attempt << ATTEMPT_SHIFT | bucket << BUCKET_SHIFT | first_block
    encryptor = Cipher(algorithms.AES(key.key), modes.CTR(struct.pack(">QQ", step, lo))).encryptor()
    return encryptor.update(bytes(nbytes))
