"""One-pass fixed-point kernels for secure aggregation, compiled with numba.

Encoding a float bucket into the ring is: scale, range check, clamp, round, convert, add the
mask, reduce mod 2^k; decoding is: reduce, take the signed representative, convert, scale, and
find the peak that sets the next step's scale. As torch and numpy operations that is ~6 passes
over the bucket per direction, each reading and writing memory: 3.7 ms per million values here.
One compiled loop per direction does all of it in one pass, vectorized: ~0.4 ms
(bench/secagg_overhead.py measures the step). The kernels are compiled on first use and cached
on disk (`cache=True`), so a machine pays the compilation (~1 s) once, not every worker.

No integer operation here may overflow: numba compiles signed arithmetic with LLVM's `nsw`
flag, under which an overflow is undefined, not a wrap. So every ring word is reduced to
[0, 2^k) before anything is added to it (k <= W - 3 for the wire word W, and the encoded value
is at most 2^P < 2^k), which is the same modulo 2^k because 2^k divides 2^W; the masks
themselves are summed by numpy on unsigned views, where wrapping is defined. Float to integer
conversion only ever sees values clamped to [-bound, bound] (a NaN becomes +bound; the caller
counts it and poisons the step), so it is always defined too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

_JIT = {"nogil": True, "boundscheck": False, "error_model": "numpy"}


def _compiled(kernel: Callable) -> Callable:
    """The kernel compiled on first use, cached on disk where numba finds a writable place (next
    to this file, or the user's cache directory); without one, compiled once per process."""
    try:
        return njit(cache=True, **_JIT)(kernel)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(**_JIT)(kernel)


@_compiled
def encode_into(values: np.ndarray, scale: np.float32, bound: np.float32, acc: np.ndarray,
                ring_mask: np.integer, flip: np.integer) -> bool:
    """acc[i] <- (s * acc[i] + round(clamp(values[i] * scale, -bound, bound))) mod 2^k, in place.

    `values` float32, `acc` int32 or int64 (the wire word) holding this rank's masks, `ring_mask`
    2^k - 1 and `flip` 0 (s = +1) or -1 (s = -1: the masks were accumulated negated), both of
    acc's dtype. Returns whether any value was non-finite or beyond +-bound; those were clamped
    (a NaN to +bound), and the caller counts them.
    """
    out_of_range = False
    for i in range(values.size):
        v = values[i] * scale
        out_of_range |= not (abs(v) <= bound)
        v = v if v <= bound else bound  # a NaN fails every comparison: it becomes +bound
        v = v if v >= -bound else -bound
        mask = acc[i] & ring_mask  # in [0, 2^k): negating it and adding v cannot overflow
        acc[i] = ((mask ^ flip) - flip + acc.dtype.type(np.rint(v))) & ring_mask
    return out_of_range


@_compiled
def decode_into(summed: np.ndarray, ring_mask: np.integer, half: np.integer,
                modulus: np.integer, inv_scale: np.float32, out: np.ndarray
                ) -> tuple[np.integer, np.integer]:
    """out[i] <- signed(summed[i] mod 2^k) * inv_scale, where signed() is the representative in
    [-2^(k-1), 2^(k-1)) (`half` = 2^(k-1), `modulus` = 2^k, both of summed's dtype). Returns the
    smallest and largest signed representative (before scaling), for the next step's scale."""
    t = summed.dtype.type
    lo = t(0)
    hi = t(0)
    for i in range(summed.size):
        s = t(summed[i] & ring_mask)
        s = t(s - modulus) if s >= half else s
        out[i] = np.float32(s) * inv_scale
        lo = min(lo, s)
        hi = max(hi, s)
    return lo, hi
