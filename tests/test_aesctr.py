"""The secure-aggregation keystream (raysys/privacy/aesctr.py): every code path that draws it
equals AES-128-CTR as OpenSSL computes it, derived here independently."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from raysys.privacy import aesctr
from raysys.privacy.aesctr import PairKey, keystream_into, round_keys

HOST_LANES = aesctr._host_lanes()
WIDTHS = [*HOST_LANES, 0]  # what this CPU runs, and OpenSSL


def openssl_ctr(key: bytes, n_words: int, dtype: type, step: int, attempt: int, bucket: int,
                first_block: int) -> np.ndarray:
    lo = attempt << 60 | bucket << 44 | first_block
    size = n_words * np.dtype(dtype).itemsize
    stream = Cipher(algorithms.AES(key), modes.CTR(struct.pack(">QQ", step, lo))).encryptor()
    return np.frombuffer(stream.update(bytes(size)), dtype=dtype)


def test_key_expansion_matches_fips_197() -> None:
    """FIPS-197 appendix A.1: the first and last round keys of key 2b7e1516..."""
    rounds = round_keys(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert len(rounds) == 176
    assert rounds[16:32].hex() == "a0fafe1788542cb123a339392a6c7605"
    assert rounds[-16:].hex() == "d014f9a8c9ee2589e13f0cc8b6630ca6"
    with pytest.raises(ValueError, match="16 bytes"):
        round_keys(bytes(32))


@pytest.mark.parametrize("lanes", WIDTHS)
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_every_width_draws_aes_ctr(lanes: int, dtype: type) -> None:
    """Store, add and subtract, for lengths around the loop's iteration (tails), offsets into
    the stream and every counter field."""
    rng = np.random.default_rng(lanes)
    for n in (1, 3, 4, 63, 64, 65, 127, 128, 129, 1000):
        key = rng.bytes(16)
        step, attempt, bucket, first = int(rng.integers(2**63)) * 2 + 1, 1, 65535, 12345
        ks = openssl_ctr(key, n, dtype, step, attempt, bucket, first)
        base = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
        for op, expected in (("store", ks), ("add", base + ks), ("sub", base - ks)):
            words = base.copy()
            keystream_into(words, PairKey(key), op, step, attempt, bucket, first, lanes)
            assert np.array_equal(words, expected), (op, n)


def test_a_chunked_stream_is_the_whole_stream() -> None:
    """Chunks drawn at their block offsets join into one stream (what secagg's chunks rely on)."""
    key = PairKey(bytes(range(16)))
    whole = np.zeros(1000, dtype=np.uint32)
    keystream_into(whole, key, "store", 7, 0, 2, 0)
    parts = np.zeros(1000, dtype=np.uint32)
    for a in range(0, 1000, 200):  # 200 words = 50 blocks
        keystream_into(parts[a: a + 200], key, "store", 7, 0, 2, a // 4)
    assert np.array_equal(parts, whole)


def test_bad_arguments_are_refused() -> None:
    key = PairKey(bytes(16))
    with pytest.raises(ValueError, match="op must be"):
        keystream_into(np.zeros(4, np.uint32), key, "xor", 0, 0, 0, 0)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        keystream_into(np.zeros(4, np.int32), key, "add", 0, 0, 0, 0)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        keystream_into(np.zeros(8, np.uint32)[::2], key, "add", 0, 0, 0, 0)
    for step, attempt, bucket, first in ((0, 16, 0, 0), (0, 0, 1 << 16, 0), (0, 0, 0, 1 << 44),
                                         (-1, 0, 0, 0)):
        with pytest.raises(ValueError, match="counter out of range"):
            keystream_into(np.zeros(4, np.uint32), key, "add", step, attempt, bucket, first)


def test_lanes_come_from_the_cpu_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYSYS_AES_LANES", raising=False)
    assert aesctr.default_lanes() == (HOST_LANES[0] if HOST_LANES else 0)
    monkeypatch.setenv("RAYSYS_AES_LANES", "0")
    assert aesctr.default_lanes() == 0
    monkeypatch.setenv("RAYSYS_AES_LANES", "3")
    with pytest.raises(ValueError, match=r"RAYSYS_AES_LANES must be one of \[0"):
        aesctr.default_lanes()


def test_a_width_the_cpu_lacks_is_never_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLVM aborts the process on an instruction the target lacks, so a width the CPU does not
    have is neither accepted from the environment nor compiled: OpenSSL draws the stream."""
    monkeypatch.setattr(aesctr, "_built", {})
    monkeypatch.setattr(aesctr, "_host_lanes", lambda: [])
    monkeypatch.setenv("RAYSYS_AES_LANES", "4")
    with pytest.raises(ValueError, match=r"must be one of \[0\] on this CPU"):
        aesctr.default_lanes()
    words = np.zeros(100, dtype=np.uint32)
    keystream_into(words, PairKey(bytes(16)), "store", 1, 0, 0, 0, lanes=4)
    assert aesctr._built[4] is None
    assert np.array_equal(words, openssl_ctr(bytes(16), 100, np.uint32, 1, 0, 0, 0))


@pytest.mark.skipif(not HOST_LANES, reason="no AES instructions on this CPU")
def test_a_loop_that_disagrees_with_openssl_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A miscompiled loop (here: every round a middle round) fails the check against OpenSSL
    when built, and OpenSSL draws the stream instead; a loop that cannot be built likewise."""
    real_ir = aesctr._kernel_ir
    lanes = HOST_LANES[0]
    key = bytes(range(16))
    expected = openssl_ctr(key, 100, np.uint32, 3, 0, 1, 0)

    for broken in (lambda *a: real_ir(*a).replace("aesenclast", "aesenc"),  # wrong output
                   lambda *a: real_ir(*a) + "\nnot llvm ir"):  # no output
        monkeypatch.setattr(aesctr, "_built", {})
        monkeypatch.setattr(aesctr, "_kernel_ir", broken)
        with caplog.at_level(logging.WARNING, logger="raysys.privacy.aesctr"):
            words = np.zeros(100, dtype=np.uint32)
            keystream_into(words, PairKey(key), "store", 3, 0, 1, 0, lanes)
        assert np.array_equal(words, expected)
        assert aesctr._built[lanes] is None
        assert "using OpenSSL" in caplog.text
        caplog.clear()
