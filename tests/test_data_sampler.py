"""The step sampler: the rows of step s depend only on (seed, s, partner sizes), every row is seen
exactly once per epoch, and splitting a batch among workers never changes the rows."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys.data import partner_batch_sizes, partner_epoch, sampler, split_indices, step_indices

# --- partner_batch_sizes --------------------------------------------------------------------------


def test_batch_sizes_proportional_with_largest_remainder():
    # Quotas 50*(1/6, 2/6, 3/6) = 8.33, 16.67, 25.0: floors 8, 16, 25 and the spare unit goes to
    # the largest remainder (beta, .67).
    assert partner_batch_sizes({"alpha": 100, "beta": 200, "gamma": 300}, 50) == {
        "alpha": 8,
        "beta": 17,
        "gamma": 25,
    }


def test_batch_sizes_tie_goes_to_first_name_whatever_the_dict_order():
    assert partner_batch_sizes({"b": 1, "a": 1}, 3) == {"b": 1, "a": 2}
    assert partner_batch_sizes({"a": 1, "b": 1}, 3) == {"a": 2, "b": 1}


def test_batch_sizes_keep_tiny_partner_in_training():
    sizes = partner_batch_sizes({"big": 1_000_000, "tiny": 3}, 10)
    assert sizes == {"big": 9, "tiny": 1}


def test_batch_sizes_reject_batch_smaller_than_partner_count_and_empty_partners():
    with pytest.raises(ValueError, match="smaller than the number of partners"):
        partner_batch_sizes({"a": 5, "b": 5, "c": 5}, 2)
    with pytest.raises(ValueError, match="'b' has 0 rows"):
        partner_batch_sizes({"a": 5, "b": 0}, 4)
    with pytest.raises(ValueError):
        partner_batch_sizes({}, 4)


partner_sizes = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3), st.integers(1, 10_000), min_size=1, max_size=8
)


@given(sizes=partner_sizes, extra=st.integers(0, 500), data=st.data())
def test_batch_sizes_properties(sizes, extra, data):
    batch = len(sizes) + extra
    parts = partner_batch_sizes(sizes, batch)
    assert list(parts) == list(sizes)
    assert sum(parts.values()) == batch
    assert min(parts.values()) >= 1
    total = sum(sizes.values())
    quotas = {p: batch * s / total for p, s in sizes.items()}
    if all(q >= 1 for q in quotas.values()):
        # No partner needed pinning, so this is plain largest remainder: within 1 of the quota.
        assert all(abs(parts[p] - quotas[p]) < 1 for p in sizes)
    # Depends on the sizes only, not on the order the partners were listed in.
    shuffled = data.draw(st.permutations(list(sizes)))
    assert partner_batch_sizes({p: sizes[p] for p in shuffled}, batch) == parts


# --- step_indices ---------------------------------------------------------------------------------


def reference_stream(seed: int, partner: str, size: int, epochs: int) -> np.ndarray:
    """The documented definition, spelled out independently of the implementation."""
    perms = []
    for epoch in range(epochs):
        seq = np.random.SeedSequence([seed, zlib.crc32(partner.encode()), epoch])
        perms.append(np.random.Generator(np.random.PCG64(seq)).permutation(size))
    return np.concatenate(perms)


def test_step_indices_match_the_documented_stream():
    # Pins the contract: checkpoints resumed by a later version must see the same rows.
    stream = reference_stream(7, "alpha", 10, 4)
    for step in range(10):
        got = step_indices(7, "alpha", 10, 4, step)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, stream[step * 4 : step * 4 + 4])


def test_step_indices_depend_on_seed_partner_and_step():
    base = step_indices(0, "alpha", 1000, 32, 5)
    np.testing.assert_array_equal(base, step_indices(0, "alpha", 1000, 32, 5))
    assert not np.array_equal(base, step_indices(1, "alpha", 1000, 32, 5))
    assert not np.array_equal(base, step_indices(0, "beta", 1000, 32, 5))
    assert not np.array_equal(base, step_indices(0, "alpha", 1000, 32, 6))


def test_batch_larger_than_partner_spans_several_epochs():
    idx = step_indices(3, "p", 4, 10, 0)  # positions 0..9: epochs 0, 1 and half of 2
    assert len(idx) == 10
    assert sorted(idx[:4]) == [0, 1, 2, 3] and sorted(idx[4:8]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(idx, reference_stream(3, "p", 4, 3)[:10])
    assert partner_epoch(4, 10, 0) == 0 and partner_epoch(4, 10, 1) == 2


def test_returned_array_is_a_fresh_copy_of_the_cached_permutation():
    first = step_indices(0, "alpha", 50, 50, 0)  # the whole cached epoch
    first[:] = -1
    assert (step_indices(0, "alpha", 50, 50, 0) >= 0).all()


def test_step_indices_validate_arguments():
    for args in [(0, "a", 0, 1, 0), (0, "a", 5, 0, 0), (0, "a", 5, 1, -1), (-1, "a", 5, 1, 0)]:
        with pytest.raises(ValueError):
            step_indices(*args)


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 40),
    batch=st.integers(1, 90),
    epochs=st.integers(1, 4),
)
def test_every_row_seen_exactly_once_per_epoch(seed, size, batch, epochs):
    steps = -(-epochs * size // batch)  # enough steps to cover `epochs` full epochs
    stream = np.concatenate([step_indices(seed, "p", size, batch, s) for s in range(steps)])
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(stream[e * size : (e + 1) * size]), np.arange(size))
    for s in range(steps):
        assert partner_epoch(size, batch, s) == s * batch // size


# --- split_indices --------------------------------------------------------------------------------


def test_split_indices_proportional_and_contiguous():
    idx = np.arange(10, 20)
    chunks = split_indices(idx, [1.0, 0.0, 3.0])
    assert [len(c) for c in chunks] == [3, 0, 7]  # quotas 2.5, 0, 7.5; tie to the lower position
    np.testing.assert_array_equal(np.concatenate(chunks), idx)


def test_split_indices_rejects_bad_shares():
    for shares in [[], [0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [float("inf")]]:
        with pytest.raises(ValueError):
            split_indices(np.arange(5), shares)


@given(
    n=st.integers(0, 300),
    shares=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=9).filter(
        lambda s: sum(s) > 0
    ),
)
def test_split_indices_properties(n, shares):
    idx = np.arange(n, dtype=np.int64) * 7
    chunks = split_indices(idx, shares)
    assert len(chunks) == len(shares)
    np.testing.assert_array_equal(np.concatenate(chunks), idx)
    total = sum(shares)
    for chunk, share in zip(chunks, shares, strict=True):
        if share == 0:
            assert len(chunk) == 0
        assert abs(len(chunk) - n * share / total) < 1


def test_a_step_needs_no_history():
    # A resumed or rescaled job jumps straight to step s: same rows as a run that got there step
    # by step, with a cold cache and the partner's steps asked for in any order.
    sizes = {"alpha": 500, "beta": 130}
    per_partner = partner_batch_sizes(sizes, 64)
    walked = {
        p: [step_indices(11, p, n, per_partner[p], s) for s in range(40)] for p, n in sizes.items()
    }
    sampler._epoch_permutation.cache_clear()
    for s in [39, 3, 17, 0]:
        for p, n in sizes.items():
            np.testing.assert_array_equal(step_indices(11, p, n, per_partner[p], s), walked[p][s])
