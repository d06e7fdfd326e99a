"""Which rows every partner contributes to every step: a pure function of (seed, step, sizes).

This is what makes rescaling drift-free (ARCHITECTURE.md invariant 2). The global batch of step s
is fixed before anyone asks how many workers there are: partner p takes its share
`partner_batch_sizes(...)[p]` of it, as positions [s*b, (s+1)*b) of an endless stream of epochs,
each epoch a seeded permutation of the partner's rows. Workers only decide *who computes* which
part of that batch (`split_indices`); since the mean gradient over a fixed set of rows does not
depend on how the rows are grouped, 1, 3 or 2 workers produce the same update, to float tolerance.
Nothing here keeps state between steps, so a resumed or rescaled job needs only the step number.
"""

from __future__ import annotations

import zlib
from fractions import Fraction
from functools import lru_cache

import numpy as np


def partner_batch_sizes(sizes: dict[str, int], global_batch: int) -> dict[str, int]:
    """Split `global_batch` across partners in proportion to their row counts.

    Largest-remainder rounding so the parts sum to exactly `global_batch`; ties go to the partner
    whose name sorts first, so the result does not depend on dict order. Every partner gets at
    least one row per step (otherwise a small partner would silently drop out of training): a
    partner whose share rounds to 0 is pinned at 1 and the rest is re-split among the others.
    """
    if not sizes:
        raise ValueError("no partners to split the batch across")
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"partner {name!r} has {size} rows; every partner needs >= 1")
    if global_batch < len(sizes):
        raise ValueError(
            f"global_batch {global_batch} is smaller than the number of partners ({len(sizes)}); "
            "every partner needs at least one row per step"
        )
    pinned: dict[str, int] = {}
    while True:
        free = {p: s for p, s in sizes.items() if p not in pinned}
        parts = _largest_remainder(
            {p: Fraction(s) for p, s in free.items()}, global_batch - len(pinned), sorted(free)
        )
        zeros = [p for p, n in parts.items() if n == 0]
        if not zeros:
            break
        # Terminates: each round pins >= 1 partner, and the budget left stays >= the partners left.
        pinned.update(dict.fromkeys(zeros, 1))
    parts.update(pinned)
    return {p: parts[p] for p in sizes}


def partner_epoch(size: int, batch: int, step: int) -> int:
    """The epoch (0-based) that the first row of `step` belongs to, for a partner of `size` rows."""
    _check_stream_args(size, batch, step)
    return step * batch // size


def step_indices(seed: int, partner: str, size: int, batch: int, step: int) -> np.ndarray:
    """Row indices (int64, length `batch`) that `partner` contributes to `step`.

    Positions [step*batch, (step+1)*batch) of the stream epoch 0, epoch 1, ... where each epoch is
    a permutation of range(size) seeded by (seed, crc32(partner), epoch). A batch may span an epoch
    boundary, or several epochs when batch > size; every row appears exactly once per epoch.
    """
    _check_stream_args(size, batch, step)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    start, stop = step * batch, (step + 1) * batch
    pieces = []
    for epoch in range(start // size, (stop - 1) // size + 1):
        perm = _epoch_permutation(seed, partner, size, epoch)
        lo = max(start, epoch * size) - epoch * size
        hi = min(stop, (epoch + 1) * size) - epoch * size
        pieces.append(perm[lo:hi])
    # Always a fresh array: the cached permutations are shared and must stay untouched.
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()


def split_indices(indices: np.ndarray, shares: list[float]) -> list[np.ndarray]:
    """Cut `indices` into len(shares) contiguous chunks sized in proportion to `shares`.

    Used to divide one partner's step batch among that partner's workers (shares = relative
    speeds, or equal). Largest remainder with ties to the lower position; a zero share gets an
    empty chunk; concatenating the chunks gives `indices` back. Chunks are views, not copies.
    Exact rational arithmetic, so every process computes the same cut for the same floats.
    """
    if not shares:
        raise ValueError("shares is empty")
    for i, share in enumerate(shares):
        if not np.isfinite(share) or share < 0:
            raise ValueError(f"share {i} is {share}; shares must be finite and >= 0")
    weights = {i: Fraction(share) for i, share in enumerate(shares)}
    if sum(weights.values()) == 0:
        raise ValueError("all shares are zero")
    sizes = _largest_remainder(weights, len(indices), order=list(range(len(shares))))
    bounds = np.cumsum([0] + [sizes[i] for i in range(len(shares))])
    return [indices[bounds[i] : bounds[i + 1]] for i in range(len(shares))]


def _largest_remainder(weights: dict, total: int, order: list) -> dict:
    """Integer parts of `total` proportional to `weights` (exact Fractions), summing to `total`.

    Units left after flooring go to the largest remainders, ties broken by position in `order`.
    Zero weights have zero remainder and so never receive a unit (the leftover units are fewer
    than the keys with a positive remainder, since each remainder is < 1).
    """
    weight_sum = sum(weights.values())
    quotas = {k: total * w / weight_sum for k, w in weights.items()}
    parts = {k: int(q) for k, q in quotas.items()}  # floor: quotas are >= 0
    rank = {k: i for i, k in enumerate(order)}
    by_remainder = sorted(weights, key=lambda k: (-(quotas[k] - parts[k]), rank[k]))
    for k in by_remainder[: total - sum(parts.values())]:
        parts[k] += 1
    return parts


def _check_stream_args(size: int, batch: int, step: int) -> None:
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


# Small on purpose: a worker serves one partner and a step touches at most a few epochs, while one
# entry costs 8 bytes per row (80 MB for a 10M-row partner).
@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, partner: str, size: int, epoch: int) -> np.ndarray:
    # crc32, not hash(): str hashes are salted per process, and every worker must agree.
    seq = np.random.SeedSequence([seed, zlib.crc32(partner.encode()), epoch])
    perm = np.random.Generator(np.random.PCG64(seq)).permutation(size).astype(np.int64, copy=False)
    perm.flags.writeable = False
    return perm
