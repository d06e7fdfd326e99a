"""Differential privacy for one partner: per-sample clipping, distributed noise, accounting.

The mechanism (DP-SGD, the Gaussian mechanism on the partner's sum of clipped gradients):

* Every worker of a DP partner computes sum_i clip_C(g_i) over its rows, where
  clip_C(g) = g * min(1, C / (||g|| + 1e-6)) (Opacus' formula), with `DPClipper`. Adding or
  removing one row changes the partner's sum by at most C in L2: the sensitivity is C.
* Each of the partner's k workers adds N(0, (sigma*C)^2 / k) to every gradient coordinate
  (`add_noise` with `noise_std(sigma, C, k)`). The all-reduce sums the workers, so the partner's
  aggregate carries exactly N(0, (sigma*C)^2): distributed DP, no trusted party adds the noise.
  A single worker's bucket carries only sigma*C/sqrt(k), so individual buckets must stay hidden
  from other parties (secure aggregation); seen alone they protect the worker's rows with a
  noise multiplier of only sigma/sqrt(k).
* `PartnerAccountant` wraps Opacus' accountant (RDP by default, PRV optional) with
  sample_rate = b_p / n_p (partner batch / partner rows).

Not covered by the guarantee: the [loss_sum, n_samples] slots that ride in the last bucket. The
loss sum has unbounded sensitivity; it is fine for the partner's own logs but should not leave the
partner (or should be dropped) where the threat model includes the other partners.

Per-sample gradients ("book-keeping", exact). For nn.Linear and nn.Conv2d a sample's weight
gradient is a product of the layer's input activations and the gradient w.r.t. its output, so
forward hooks capture the activations, one torch.autograd.grad w.r.t. the layer outputs gives the
output gradients (skipping the weight-gradient matmuls of an ordinary backward), and:
  - per-sample norms: ||a_i||^2 * ||b_i||^2 for a Linear on [n, d] inputs (no per-sample
    gradient is ever formed); for sequences and convolutions the cheaper of materialising the
    per-sample gradient (bmm) or the "ghost norm" sum_ts (a_t.a_s)(b_t.b_s), chosen per layer;
  - the clipped sum: one matmul with the output gradients scaled by the clip factors (or a
    weighted sum of the materialised per-sample gradients).
The total is about one forward, one backward and a few cheap reductions, against Opacus'
materialise-then-clip (n * |params| memory and traffic) or a second backward (ghost clipping).
Every other model falls back to torch.func (vmap over grad, chunked to bound memory), and if
that cannot run it, to a per-sample loop. The fast path also checks itself once against the
per-sample loop on the first batch (and at run time: each layer called exactly once, batch in
dim 0, no in-place change of a layer output), and switches to vmap when anything is off.

Noise must be unpredictable to everyone but the worker: `noise_generator()` seeds a
torch.Generator from os.urandom. `noise_seed(...)` gives deterministic seeds for tests and
reproducibility runs only, which voids the guarantee against anyone who knows the job seed.
The CPU generator is Mersenne Twister and the sampler is float Gaussian, as in Opacus without
secure_mode: fine against the other partners, not a cryptographic guarantee.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

CLIP_EPS = 1e-6  # Opacus' stabiliser in C / (||g|| + eps): zero gradients get factor 1, not inf
METHODS = ("auto", "bk", "vmap", "loop")


# -- per-sample clipping ------------------------------------------------------------------------

class _Unsupported(Exception):
    """The book-keeping path cannot handle this forward; the caller falls back to vmap."""


def _clip_factors(sq_norms: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    norms = sq_norms.clamp_min(0).sqrt_()  # ghost norms can come out -1e-12 by rounding
    return norms, torch.div(max_norm, norms + CLIP_EPS).clamp_(max=1.0)


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row of a [n, k] tensor: one reduction, no [n, k] temporary
    (t.square().sum(1) and vecdot allocate one, which costs page faults at [256, 4608])."""
    return torch.linalg.vector_norm(t, dim=1).square_()


def _bk_supported(m: nn.Module) -> bool:
    """Layers whose per-sample gradient the book-keeping path knows (exact forward only)."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    if isinstance(m, nn.Conv2d):
        return (type(m).forward is nn.Conv2d.forward
                and type(m)._conv_forward is nn.Conv2d._conv_forward
                and m.padding_mode == "zeros" and not isinstance(m.padding, str))
    return False


def _bk_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers holding every trainable parameter, or None if some parameter is elsewhere
    or shared between layers (then a sample's gradient is not one layer's product)."""
    owner: dict[int, nn.Module] = {}
    layers = []
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _bk_supported(m):
            return None
        for p in own:
            if id(p) in owner:
                return None
            owner[id(p)] = m
        layers.append(m)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return layers if set(owner) == trainable else None


# A writer puts the clipped sum of one layer into the output tensors, given the clip factors.
_Writer = Callable[[torch.Tensor, dict[int, torch.Tensor]], None]


def _zero_writer(m: nn.Module) -> _Writer:
    def write(factors: torch.Tensor, outs: dict[int, torch.Tensor]) -> None:
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                outs[id(p)].zero_()
    return write


def _chunks(n: int, per_sample_bytes: int, budget: int) -> list[slice]:
    """Sample ranges whose per-sample tensors fit in `budget` bytes (at least one sample)."""
    size = max(1, budget // max(1, per_sample_bytes))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _linear_bk(m: nn.Linear, a: torch.Tensor, g: torch.Tensor, n: int,
               budget: int) -> tuple[torch.Tensor, _Writer]:
    if a.dim() < 2 or a.shape[0] != n or g.shape[:-1] != a.shape[:-1]:
        raise _Unsupported("Linear input is not batched in dim 0")
    w_req = m.weight.requires_grad
    b_req = m.bias is not None and m.bias.requires_grad
    if a.dim() == 2:
        # The common case: sample i's weight gradient is the outer product g_i a_i^T, whose
        # norm is ||g_i|| ||a_i||. Few, fused ops: at MLP sizes dispatch costs as much as math.
        g_sq = _row_sq(g)
        if w_req:
            sq = _row_sq(a)
            sq = sq.add_(1).mul_(g_sq) if b_req else sq.mul_(g_sq)
        else:
            sq = g_sq

        def write(factors: torch.Tensor, outs: dict[int, torch.Tensor]) -> None:
            if w_req:
                torch.mm((g * factors.unsqueeze(1)).t(), a, out=outs[id(m.weight)])
            if b_req:
                torch.mv(g.t(), factors, out=outs[id(m.bias)])
        return sq, write

    din, dout = a.shape[-1], g.shape[-1]
    A = a.reshape(n, -1, din)  # a sequence of T positions per sample
    G = g.reshape(n, -1, dout)
    T = A.shape[1]
    sq = torch.zeros(n, dtype=g.dtype)
    Gs = G.sum(1) if b_req else None
    if b_req:
        sq += _row_sq(Gs)
    if w_req:
        # ghost norm: n T^2 (din + dout) flops; materialised: n T din dout
        ghost = T * (din + dout) < din * dout
        parts = _chunks(n, 4 * (T * T if ghost else din * dout), budget)
        for c in parts:
            if ghost:
                sq[c] += (torch.bmm(A[c], A[c].transpose(1, 2))
                          * torch.bmm(G[c], G[c].transpose(1, 2))).sum((1, 2))
            else:
                sq[c] += _row_sq(torch.bmm(G[c].transpose(1, 2), A[c]).reshape(-1, dout * din))

    def write_seq(factors: torch.Tensor, outs: dict[int, torch.Tensor]) -> None:
        if w_req:
            Gw = (G * factors[:, None, None]).reshape(-1, dout)
            torch.mm(Gw.t(), A.reshape(-1, din), out=outs[id(m.weight)])
        if b_req:
            torch.mv(Gs.t(), factors, out=outs[id(m.bias)])
    return sq, write_seq


def _conv2d_bk(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, n: int,
               budget: int) -> tuple[torch.Tensor, _Writer]:
    if a.dim() != 4 or a.shape[0] != n or g.dim() != 4 or g.shape[0] != n:
        raise _Unsupported("Conv2d input is not a batched 4-d tensor")
    w_req = m.weight.requires_grad
    b_req = m.bias is not None and m.bias.requires_grad
    sq = torch.zeros(n, dtype=g.dtype)
    Gs = g.sum((2, 3)) if b_req else None
    if b_req:
        sq += _row_sq(Gs)
    per = None
    if w_req:
        # Per-sample weight gradients from one native (mkldnn) weight-gradient convolution: the
        # batch folded into the channels, one group per (sample, group). On CPU this beat
        # im2col + bmm (F.unfold is slow) and the ghost norm (T^2 (D + cout) > D cout flops
        # for small images); it also covers stride, dilation and groups with no code of ours.
        # Kept for the clipped sum when the whole batch fits in `budget`, else recomputed
        # chunk by chunk for the norms only.
        cout, cin = g.shape[1], a.shape[1]
        parts = _chunks(n, 4 * m.weight.numel(), budget)
        for c in parts:
            k = c.stop - c.start
            p = torch.nn.grad.conv2d_weight(
                a[c].reshape(1, k * cin, *a.shape[2:]), (k * cout, *m.weight.shape[1:]),
                g[c].reshape(1, k * cout, *g.shape[2:]), m.stride, m.padding, m.dilation,
                m.groups * k).reshape(k, -1)
            sq[c] += _row_sq(p)
            if len(parts) == 1:
                per = p

    def write(factors: torch.Tensor, outs: dict[int, torch.Tensor]) -> None:
        if w_req:
            out = outs[id(m.weight)]
            if per is not None:
                torch.mv(per.t(), factors, out=out.view(-1))
            else:  # one ordinary weight gradient of the output gradients scaled per sample
                out.copy_(torch.nn.grad.conv2d_weight(
                    a, m.weight.shape, g * factors[:, None, None, None], m.stride, m.padding,
                    m.dilation, m.groups))
        if b_req:
            torch.mv(Gs.t(), factors, out=outs[id(m.bias)])
    return sq, write


class DPClipper:
    """Sum of per-sample clipped gradients of one replica's batch, written into `p.grad`.

    `loss_fn` must reduce with "sum" (a sum of per-sample losses; CrossEntropyLoss(reduction=
    "sum") if None). `method`: "auto" (book-keeping when every trainable parameter sits in a
    plain nn.Linear/nn.Conv2d, else vmap), or force "bk", "vmap" or "loop". `check`: compare
    the book-keeping path once against the per-sample loop, on the first batch of >= 2 rows.
    `per_sample_mb` bounds the per-sample tensors held at once (larger batches are chunked).
    `method` may change after a call when a path turns out unusable (logged once). After a
    call, `last_norms` holds the per-sample gradient norms before clipping (clipped-fraction
    metrics).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None = None,
                 max_grad_norm: float = 1.0, method: str = "auto", check: bool = True,
                 per_sample_mb: float = 64.0) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if getattr(loss_fn, "reduction", "sum") != "sum":
            raise ValueError("DPClipper needs a loss with reduction='sum' (per-sample terms)")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(reduction="sum")
        self.max_grad_norm = float(max_grad_norm)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._layers = _bk_layers(model)
        if method == "auto":
            method = "bk" if self._layers is not None else "vmap"
        if method == "bk" and self._layers is None:
            raise ValueError("method 'bk' needs every trainable parameter in an nn.Linear or "
                             "nn.Conv2d of its own")
        self.method = method
        self._checked = not check or method != "bk"
        self._budget = int(per_sample_mb * 2**20)
        self.last_norms = torch.zeros(0)

    # -- public --------------------------------------------------------------------------------
    def clipped_gradient_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Write sum_i clip(g_i) into every trainable parameter's .grad, in place, and return
        the batch's loss sum.

        Overwrites (not accumulates) the existing .grad tensors, so views into flat buckets stay
        bound; a parameter without .grad gets a zero tensor first. n == 0 writes zeros.
        """
        outs = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            outs.append(p.grad)
        if int(y.shape[0]) == 0:
            for o in outs:
                o.zero_()
            self.last_norms = torch.zeros(0)
            return 0.0
        if not self._checked and int(y.shape[0]) >= 2:  # one row cannot show samples mixing
            self._self_check(x, y)
        loss, self.last_norms = self._run(x, y, outs, self.max_grad_norm)
        return loss

    # -- dispatch ------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor],
             max_norm: float) -> tuple[float, torch.Tensor]:
        if self.method == "bk":
            try:
                return self._bk(x, y, outs, max_norm)
            except _Unsupported as exc:
                self._fall_back("vmap", str(exc))
        if self.method == "vmap":
            try:
                return self._vmap(x, y, outs, max_norm)
            except Exception as exc:  # any model torch.func cannot trace; the loop always runs
                self._fall_back("loop", f"{type(exc).__name__}: {exc}")
        return self._loop(x, y, outs, max_norm)

    def _fall_back(self, method: str, why: str) -> None:
        log.warning("DP per-sample gradients: %s path unusable for this model (%s); using %s",
                    self.method, why, method)
        self.method = method

    def _self_check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Book-keeping vs the per-sample loop on a few rows, with a clip bound that clips some:
        catches a user model that moves the batch out of dim 0 or mixes samples."""
        self._checked = True
        m = min(int(y.shape[0]), 5)
        xs, ys = x[:m], y[:m]
        ref = [torch.zeros_like(p) for p in self.params]
        try:
            _, norms = self._loop(xs, ys, ref, math.inf)
        except Exception as exc:
            raise ValueError(
                "per-sample DP needs a model that takes one sample at a time (no BatchNorm or "
                f"other batch statistics); a batch of one failed: {exc}") from exc
        bound = float(norms.median()) or 1.0
        self._loop(xs, ys, ref, bound)
        got = [torch.zeros_like(p) for p in self.params]
        try:
            self._bk(xs, ys, got, bound)
        except _Unsupported as exc:
            self._fall_back("vmap", str(exc))
            return
        err = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(got, ref, strict=True)))
        size = math.sqrt(sum(float(b.square().sum()) for b in ref))
        if not err <= 1e-4 * size + 1e-7:
            self._fall_back("vmap", f"self-check mismatch {err:.3g} vs {size:.3g}")

    # -- the three methods ---------------------------------------------------------------------
    def _bk(self, x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor],
            max_norm: float) -> tuple[float, torch.Tensor]:
        assert self._layers is not None
        n = int(y.shape[0])
        records: dict[nn.Module, list[tuple]] = {}

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            a = args[0] if args else None
            records.setdefault(mod, []).append((a, out, out._version))

        handles = [m.register_forward_hook(hook) for m in self._layers]
        try:
            loss = self.loss_fn(self.model(x), y)
        finally:
            for h in handles:
                h.remove()
        live = []  # (layer, input, output) of layers whose output depends on their parameters
        for m in self._layers:
            calls = records.get(m, [])
            if len(calls) > 1:
                raise _Unsupported(f"{type(m).__name__} called {len(calls)} times per forward")
            if not calls:
                continue  # unused layer: zero gradient, like an ordinary backward
            a, out, version = calls[0]
            if not isinstance(a, torch.Tensor) or not isinstance(out, torch.Tensor):
                raise _Unsupported(f"{type(m).__name__} input/output is not a tensor")
            if out._version != version:
                # e.g. ReLU(inplace=True): the tensor no longer holds the layer's output
                raise _Unsupported(f"{type(m).__name__} output was modified in place")
            if out.requires_grad:
                live.append((m, a.detach(), out))
        grads = torch.autograd.grad(loss, [o for _, _, o in live], allow_unused=True) \
            if live else []
        sq: torch.Tensor | None = None
        writers: list[_Writer] = []
        done = set()
        for (m, a, _), g in zip(live, grads, strict=True):
            done.add(m)
            if g is None:
                writers.append(_zero_writer(m))
                continue
            layer_sq, write = (_linear_bk if isinstance(m, nn.Linear) else _conv2d_bk)(
                m, a, g, n, self._budget)
            sq = layer_sq if sq is None else sq.add_(layer_sq)
            writers.append(write)
        writers += [_zero_writer(m) for m in self._layers if m not in done]
        if sq is None:  # no parameter reaches the loss: every gradient is zero
            sq = torch.zeros(n)
        norms, factors = _clip_factors(sq, max_norm)
        by_id = {id(p): o for p, o in zip(self.params, outs, strict=True)}
        for write in writers:
            write(factors, by_id)
        return float(loss.detach()), norms

    def _vmap(self, x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor],
              max_norm: float) -> tuple[float, torch.Tensor]:
        from torch.func import functional_call, grad_and_value, vmap

        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        params = {k: p.detach() for k, p in named}
        rest = {k: p for k, p in self.model.named_parameters() if not p.requires_grad}
        rest.update(dict(self.model.named_buffers()))
        model, loss_fn = self.model, self.loss_fn

        def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {**p, **rest}, (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0))

        # randomness="different": a user model with dropout gets one mask per sample
        per_sample = vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")
        n = int(y.shape[0])
        chunk = max(1, self._budget // (4 * max(1, sum(p.numel() for p in self.params))))
        for o in outs:
            o.zero_()
        loss, all_norms = 0.0, []
        for s in range(0, n, chunk):
            grads, losses = per_sample(params, x[s:s + chunk], y[s:s + chunk])
            rows = int(losses.shape[0])
            sq = sum(_row_sq(grads[k].reshape(rows, -1)) for k, _ in named)
            norms, factors = _clip_factors(sq, max_norm)
            for (k, _), o in zip(named, outs, strict=True):
                o.add_(torch.tensordot(factors, grads[k], dims=1))
            loss += float(losses.sum())
            all_norms.append(norms)
        return loss, torch.cat(all_norms)

    def _loop(self, x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor],
              max_norm: float) -> tuple[float, torch.Tensor]:
        for o in outs:
            o.zero_()
        loss, norms = 0.0, []
        for i in range(int(y.shape[0])):
            li = self.loss_fn(self.model(x[i:i + 1]), y[i:i + 1])
            gs = torch.autograd.grad(li, self.params, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g
                  for g, p in zip(gs, self.params, strict=True)]
            norm, factor = _clip_factors(sum(g.square().sum() for g in gs).reshape(1), max_norm)
            for o, g in zip(outs, gs, strict=True):
                o.add_(g, alpha=float(factor))
            loss += float(li.detach())
            norms.append(norm)
        return loss, torch.cat(norms)


# -- noise --------------------------------------------------------------------------------------

def noise_std(noise_multiplier: float, max_grad_norm: float, workers: int) -> float:
    """Per-coordinate std one of the partner's `workers` adds, so that the sum over its workers
    has std noise_multiplier * max_grad_norm (variances add)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return float(noise_multiplier) * float(max_grad_norm) / math.sqrt(workers)


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator for the DP noise: seeded from os.urandom unless `seed` is given.

    Keep one per worker for the job's life. A fixed seed (see `noise_seed`) makes runs
    reproducible for tests, and the noise predictable to whoever knows it: no privacy then.
    """
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed)
    return gen


def noise_seed(job_seed: int, partner: str, worker: int, step: int) -> int:
    """A deterministic seed per (job seed, partner, worker, step), for tests only."""
    key = f"{job_seed}/{partner}/{worker}/{step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def add_noise(tensors: Iterable[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std^2) to every element of `tensors`, in place (e.g. `Replica.gradient_views()`)."""
    if std == 0:
        return
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device),
               alpha=std)


# -- accounting ---------------------------------------------------------------------------------

ACCOUNTANTS = ("rdp", "prv")


def _accountant(kind: str):  # -> opacus IAccountant; opacus imports slowly, so only on use
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
    from opacus.accountants import create_accountant

    return create_accountant(kind)


def partner_sample_rate(batch: int, rows: int) -> float:
    """b_p / n_p. The accountant treats it as a Poisson sampling rate; our sampler draws fixed
    size batches from shuffled epochs instead (the usual DP-SGD approximation). A batch larger
    than the data would hold a row more than once per step, past the sensitivity C."""
    if not 0 < batch <= rows:
        raise ValueError(f"a DP partner needs 0 < batch <= rows, got batch {batch}, rows {rows}")
    return batch / rows


def _epsilon(kind: str, noise_multiplier: float, sample_rate: float, steps: int,
             delta: float) -> float:
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _accountant(kind)
    # Same history that `steps` calls of acc.step(...) build (Opacus merges equal steps).
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def resolve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                             steps: int, kind: str = "rdp",
                             epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier whose epsilon after `steps` steps is <= target_epsilon (Opacus'
    get_noise_multiplier: bisection, within epsilon_tolerance below the target)."""
    if steps < 1:
        raise ValueError(f"planned steps must be >= 1, got {steps}")
    _accountant(kind)  # validates kind
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # its probes at large sigma hit Opacus' "optimal order is the largest alpha" note
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=kind,
                                          epsilon_tolerance=epsilon_tolerance))


@functools.lru_cache(maxsize=64)
def steps_within_budget(target_epsilon: float, noise_multiplier: float, sample_rate: float,
                        delta: float, kind: str = "rdp", max_steps: int = 10**8) -> int:
    """The most steps T with epsilon(T) <= target_epsilon (0 if even one step exceeds it):
    the controller stops the partner after step T. Capped at max_steps. Some 2*log2(T)
    accountant evaluations (tens of ms each), cached per argument set."""
    return _most_steps_within(
        lambda t: _epsilon(kind, noise_multiplier, sample_rate, t, delta) <= target_epsilon,
        max_steps)


def _most_steps_within(within_budget: Callable[[int], bool], max_steps: int) -> int:
    """The largest T <= max_steps with within_budget(T) (0 if not even T = 1), for a
    within_budget that holds up to some T and fails beyond (epsilon grows with the steps)."""
    def within(t: int) -> bool:
        with warnings.catch_warnings():
            # probes at small T hit Opacus' "optimal order is the largest alpha" note
            warnings.simplefilter("ignore", UserWarning)
            return within_budget(t)

    if not within(1):
        return 0
    lo, hi = 1, 2  # epsilon grows with T: double until over, then bisect; lo within, hi not
    while within(hi):
        lo = hi
        if hi >= max_steps:
            return max_steps
        hi = min(2 * hi, max_steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


class PartnerAccountant:
    """Privacy spent by one partner: Opacus' accountant fed one entry per DP step.

    Call `step()` once per optimizer step that used the partner's rows (skipped steps spend
    nothing). The state is Opacus' own history, so `epsilon()` after a checkpoint round trip
    equals an accountant that saw every step. The accountant assumes Poisson sampling at
    `sample_rate`; our fixed-size shuffled batches are the standard approximation of it.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float,
                 kind: str = "rdp") -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.kind = kind
        self._acc = _accountant(kind)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self._acc.history)

    def step(self, n: int = 1, noise_multiplier: float | None = None) -> None:
        """Account n steps at this accountant's noise multiplier, or at `noise_multiplier` (a
        step whose batch was released more than once: see PartnerPrivacy.note_failed_steps)."""
        nm = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        for _ in range(n):
            self._acc.step(noise_multiplier=nm, sample_rate=self.sample_rate)

    def with_steps(self, noise_multipliers: Iterable[float]) -> PartnerAccountant:
        """A copy that has also taken one step at each of `noise_multipliers` (for probing a
        budget; this accountant is unchanged)."""
        probe = PartnerAccountant(self.noise_multiplier, self.sample_rate, self.delta, self.kind)
        probe.continue_history(self.state_dict())
        for nm in noise_multipliers:
            probe.step(noise_multiplier=nm)
        return probe

    def epsilon(self, delta: float | None = None) -> float:
        if not self._acc.history:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        return float(self._acc.get_epsilon(delta=self.delta if delta is None else delta))

    def steps_left(self, target_epsilon: float, max_steps: int = 10**8) -> int:
        """Further steps at this accountant's noise multiplier and sampling rate before epsilon
        would exceed target_epsilon (0 when spent), whatever steps its history already holds
        (a resumed job's may have been taken at other settings)."""
        now = (self.noise_multiplier, self.sample_rate)
        if all((nm, q) == now for nm, q, _ in self._acc.history):  # the usual case: cached
            total = steps_within_budget(target_epsilon, self.noise_multiplier,
                                        self.sample_rate, self.delta, self.kind, max_steps)
            return max(0, total - self.steps)
        if self.noise_multiplier <= 0:
            return 0

        def within(t: int) -> bool:
            probe = _accountant(self.kind)
            probe.history = [*self._acc.history, (self.noise_multiplier, self.sample_rate, t)]
            return float(probe.get_epsilon(delta=self.delta)) <= target_epsilon

        return _most_steps_within(within, max_steps)

    def continue_history(self, state: Mapping) -> None:
        """Take over the steps a checkpointed accountant (state_dict()) saw, as they were
        taken, keeping this accountant's settings for the steps to come."""
        self._acc.history = [(float(nm), float(q), int(s)) for nm, q, s in state["history"]]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta,
                "history": [[float(nm), float(q), int(s)] for nm, q, s in self._acc.history]}

    def load_state_dict(self, state: Mapping) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"accountant state is {state['kind']!r}, this one is {self.kind!r}")
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])
        self.delta = float(state["delta"])
        self._acc.history = [(float(nm), float(q), int(s)) for nm, q, s in state["history"]]

    @classmethod
    def from_state_dict(cls, state: Mapping) -> PartnerAccountant:
        acc = cls(state["noise_multiplier"], state["sample_rate"], state["delta"], state["kind"])
        acc.load_state_dict(state)
        return acc


@dataclass(frozen=True)
class DPPlan:
    """A partner's resolved DP settings. `budget_steps` (with a target_epsilon) is the last
    step count within the budget: the partner must stop contributing after that many steps."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float
    accountant: str = "rdp"
    target_epsilon: float | None = None
    budget_steps: int | None = None

    def new_accountant(self) -> PartnerAccountant:
        return PartnerAccountant(self.noise_multiplier, self.sample_rate, self.delta,
                                 self.accountant)


def plan_dp(dp: Mapping, sample_rate: float, planned_steps: int) -> DPPlan:
    """Resolve a partner's `privacy.dp` block: {noise_multiplier | target_epsilon,
    max_grad_norm, delta, accountant?}. With target_epsilon alone the noise multiplier is the
    smallest (to Opacus' tolerance) that keeps epsilon <= target over planned_steps; with both,
    the given noise multiplier is used and target_epsilon only caps the steps."""
    kind = str(dp.get("accountant", "rdp"))
    delta = float(dp["delta"])
    max_grad_norm = float(dp["max_grad_norm"])
    target = dp.get("target_epsilon")
    sigma = dp.get("noise_multiplier")
    if sigma is None and target is None:
        raise ValueError("privacy.dp needs noise_multiplier or target_epsilon")
    if sigma is None:
        sigma = resolve_noise_multiplier(float(target), delta, sample_rate, planned_steps, kind)
    budget = None if target is None else steps_within_budget(
        float(target), float(sigma), sample_rate, delta, kind)
    return DPPlan(float(sigma), max_grad_norm, delta, sample_rate, kind,
                  None if target is None else float(target), budget)
