"""llama.cpp's (ggml's) weight grids as lowbit schemes: which values a block can hold, and how to fit one.

Every type splits a row into blocks of ``block`` weights with an unsigned code c ∈ [0, 2^bits − 1] each:

    symmetric (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K):   ŵ = dl · (c − mid)          mid = 2^(bits−1)
    affine    (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K):   ŵ = dl · c − ml

Flat types (block = super = 32) store dl = d (float16) per block, and Q4_1/Q5_1 store m = −ml (float16).
K-quants group ``super`` = 256 weights: one float16 d (and dmin), and per block an integer scale sc (and min m)
of ``scale_bits`` bits, so dl = d · sc and ml = dmin · m. Those products are exact in float32, so ŵ (one
float32 rounding) is bit for bit what llama.cpp computes from the file.

Fitting is a pure function of the weights: per block the range that minimises Σ imp · (w − ŵ)² over ranges shrunk
by up to 20% (as the "mse" observer of :mod:`lowbit.schemes.grid` searches), with the extreme weight landing on
the grid's longer side (llama.cpp's own rule: d = extreme / −mid), then refitted by least squares on its codes
where that lowers the error; a K-quant's block scales are then rounded to ``scale_bits`` bits against the
super-block's largest. Rounding onto a fitted grid is to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.schemes.grid import MSE_SHRINK

SUPER = 256  # QK_K


@dataclass(frozen=True)
class GGMLType:
    """One of llama.cpp's weight types (``name`` as ggml spells it)."""

    name: str
    bits: int
    affine: bool
    block: int = 32
    super: int = 32
    scale_bits: Optional[int] = None  # K-quants: bits of each block's scale (and min)
    signed_scales: bool = False  # Q3_K, Q6_K: block scales in [−2^(b−1), 2^(b−1) − 1]
    actorder: Optional[str] = None  # GPTQ's column order, as in QuantizationArgs ("weight": static groups)

    @property
    def num_bits(self) -> int:
        return self.bits

    @property
    def c_max(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def is_k(self) -> bool:
        return self.scale_bits is not None

    def fits(self, in_features: int) -> bool:
        return in_features % self.super == 0

    def describe(self) -> str:
        kind = "affine" if self.affine else "symmetric"
        two_level = f" in super-blocks of {self.super}" if self.is_k else ""
        return f"{self.name} (int{self.bits} {kind}, blocks of {self.block}{two_level})"


TYPES = {t.name: t for t in (
    GGMLType("Q4_0", 4, False),
    GGMLType("Q4_1", 4, True),
    GGMLType("Q5_0", 5, False),
    GGMLType("Q5_1", 5, True),
    GGMLType("Q8_0", 8, False),
    GGMLType("Q2_K", 2, True, 16, SUPER, 4),
    GGMLType("Q3_K", 3, False, 16, SUPER, 6, signed_scales=True),
    GGMLType("Q4_K", 4, True, 32, SUPER, 6),
    GGMLType("Q5_K", 5, True, 32, SUPER, 6),
    GGMLType("Q6_K", 6, False, 16, SUPER, 8, signed_scales=True),
)}


@dataclass
class GGMLWeight:
    """A weight [out, in] on a ggml grid: codes ``c`` uint8 [out, in]; ``d`` (and ``dmin``, affine) float16
    [out, in / super]; ``sc`` (and ``m``, affine) int16 [out, in / block] (all ones for flat types)."""

    c: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor
    dmin: Optional[torch.Tensor]
    m: Optional[torch.Tensor]
    kind: GGMLType

    @property
    def shape(self) -> torch.Size:
        return self.c.shape

    @property
    def args(self) -> GGMLType:
        return self.kind

    def steps(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(dl, ml) per block, float32 [out, in / block]."""
        return steps(self.d, self.sc, self.dmin, self.m, self.kind)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dl, ml = self.steps()
        n, k = self.c.shape
        w = dequantize_codes(self.c.reshape(n, -1, self.kind.block), dl[..., None],
                             None if ml is None else ml[..., None], self.kind)
        return w.reshape(n, k).to(dtype)


def steps(d, sc, dmin, m, kind: GGMLType):
    per = kind.super // kind.block
    dl = d.float().repeat_interleave(per, dim=-1) * sc.float()
    ml = None if dmin is None else dmin.float().repeat_interleave(per, dim=-1) * m.float()
    return dl, ml


def round_codes(w: torch.Tensor, dl: torch.Tensor, ml: Optional[torch.Tensor], kind: GGMLType) -> torch.Tensor:
    """Nearest code of w given dl (and ml), broadcast against w → uint8 codes in [0, c_max] (a block with dl = 0
    gets the code of 0 on a symmetric grid, 0 on an affine one)."""
    inv = torch.where(dl == 0, torch.zeros_like(dl), 1.0 / torch.where(dl == 0, torch.ones_like(dl), dl))
    c = torch.round((w + ml) * inv) if kind.affine else torch.round(w * inv) + kind.mid
    return c.clamp_(0, kind.c_max).to(torch.uint8)


def dequantize_codes(c: torch.Tensor, dl: torch.Tensor, ml: Optional[torch.Tensor], kind: GGMLType) -> torch.Tensor:
    """ŵ = dl·(c − mid) or dl·c − ml in float32, in llama.cpp's order of operations."""
    if kind.affine:
        return dl * c.float() - ml
    return dl * (c.float() - kind.mid)


def _block_error(w, w_hat, imp):
    """Σ imp · (w − ŵ)² over the last dimension."""
    e = (w - w_hat).square()
    return (e if imp is None else e * imp).sum(dim=-1)


def _refit(w, c, imp, kind: GGMLType):
    """The least-squares (step, offset) for fixed codes c: min Σ imp · (ŵ − w)² (offset ≥ 0 on a K-quant)."""
    p = torch.ones_like(w) if imp is None else imp
    cf = c.float() - (0 if kind.affine else kind.mid)
    S, Sc, Scc = p.sum(-1), (p * cf).sum(-1), (p * cf * cf).sum(-1)
    Sw, Scw = (p * w).sum(-1), (p * cf * w).sum(-1)
    if not kind.affine:
        return Scw / Scc.clamp_min(1e-30), None
    det = S * Scc - Sc * Sc
    a = (S * Scw - Sc * Sw) / torch.where(det > 0, det, torch.ones_like(det))
    b = (a * Sc - Sw) / S.clamp_min(1e-30)
    if kind.is_k:
        a = torch.where(b < 0, Scw / Scc.clamp_min(1e-30), a)
        b = b.clamp(min=0)
    flat = det <= 0  # all codes equal: keep the offset alone
    return torch.where(flat, torch.zeros_like(a), a), torch.where(flat, -Sw / S.clamp_min(1e-30), b)


FIT_CHUNK = 16384  # blocks fitted at once: 11 candidates each keep the temporaries near 25 MB
SHRINK = MSE_SHRINK[::2]  # 1.0, 0.98, …, 0.8


def _fit_blocks(w: torch.Tensor, kind: GGMLType, imp: Optional[torch.Tensor]):
    """Unrounded (step, offset) per block row of w [n, block], :data:`FIT_CHUNK` blocks at a time."""
    parts = [_fit_chunk(w[i : i + FIT_CHUNK], kind, None if imp is None else imp[i : i + FIT_CHUNK])
             for i in range(0, w.shape[0], FIT_CHUNK)]
    step = torch.cat([p[0] for p in parts])
    return step, None if parts[0][1] is None else torch.cat([p[1] for p in parts])


def _fit_chunk(w: torch.Tensor, kind: GGMLType, imp: Optional[torch.Tensor]):
    """Of the ranges shrunk by up to 20% (candidates along dim 1), the one with the least error, then its least-
    squares refit on its own codes where that is better still."""
    shrink = SHRINK[None, :]
    if kind.affine:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        if kind.is_k:  # the min is stored as a non-negative m
            lo = lo.clamp(max=0)
        step, off = (hi - lo) * shrink / kind.c_max, -lo * shrink
    else:
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))
        step, off = extreme * shrink / -kind.mid, None

    def stored(step, off):  # a flat type stores these as float16 directly
        if kind.is_k:
            return step, off
        return step.half().float(), None if off is None else off.half().float()

    def error(w, imp, step, off):
        o = None if off is None else off[..., None]
        c = round_codes(w, step[..., None], o, kind)
        return c, _block_error(w, dequantize_codes(c, step[..., None], o, kind), imp)

    step, off = stored(step, off)
    codes, err = error(w[:, None, :], None if imp is None else imp[:, None, :], step, off)
    best = err.argmin(dim=1, keepdim=True)
    step, err = step.gather(1, best)[:, 0], err.gather(1, best)[:, 0]
    off = None if off is None else off.gather(1, best)[:, 0]
    c = codes.gather(1, best[..., None].expand(-1, -1, w.shape[1]))[:, 0]
    step2, off2 = stored(*_refit(w, c, imp, kind))
    better = error(w, imp, step2, off2)[1] < err
    return torch.where(better, step2, step), None if off is None else torch.where(better, off2, off)


def _quantize_scales(x: torch.Tensor, bits: int, signed: bool):
    """x [rows, blocks] as d (float16 [rows]) · s (int16 [rows, blocks]) with s of ``bits`` bits."""
    if signed:  # the largest |x| lands on −2^(bits−1), as llama.cpp's make_qx_quants does
        top = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))[:, 0]
        d = (top / -(1 << (bits - 1))).half()
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        d = (x.amax(dim=-1) / ((1 << bits) - 1)).half()
        lo, hi = 0, (1 << bits) - 1
    df = d.float()[:, None]
    s = torch.round(x / torch.where(df == 0, torch.ones_like(df), df)).clamp_(lo, hi)
    return d, torch.where(df == 0, torch.zeros_like(s), s).to(torch.int16)


def fit(w: torch.Tensor, kind: GGMLType, importance: Optional[torch.Tensor] = None):
    """The grid for w [rows, span] (span a multiple of ``kind.super``) → (d, sc, dmin, m) as in
    :class:`GGMLWeight`; ``importance`` [span]: a weight per column in the error (e.g. diag of the Hessian)."""
    rows, span = w.shape
    nb = span // kind.block
    wb = w.float().reshape(rows * nb, kind.block)
    imp = None if importance is None else importance.float().reshape(1, nb, kind.block).expand(rows, -1, -1).reshape(
        rows * nb, kind.block)
    step, off = _fit_blocks(wb, kind, imp)
    step = step.reshape(rows, nb)
    off = None if off is None else off.reshape(rows, nb)
    if not kind.is_k:
        ones = torch.ones(rows, nb, dtype=torch.int16)
        return step.half(), ones, None if off is None else off.half(), None if off is None else ones
    per = kind.super // kind.block
    step = step.reshape(rows * (span // kind.super), per)
    d, sc = _quantize_scales(step, kind.scale_bits, kind.signed_scales)
    if off is None:
        return d.reshape(rows, -1), sc.reshape(rows, nb), None, None
    dmin, m = _quantize_scales(off.reshape(rows * (span // kind.super), per), kind.scale_bits, False)
    return d.reshape(rows, -1), sc.reshape(rows, nb), dmin.reshape(rows, -1), m.reshape(rows, nb)


def quantize(w: torch.Tensor, kind: GGMLType, importance: Optional[torch.Tensor] = None) -> GGMLWeight:
    """Round-to-nearest of w [out, in] onto ``kind``'s fitted grid."""
    n, k = w.shape
    if not kind.fits(k):
        raise ValueError(f"{kind.name} needs rows of a multiple of {kind.super} weights, not {k}")
    d, sc, dmin, m = fit(w, kind, importance)
    dl, ml = steps(d, sc, dmin, m, kind)
    c = round_codes(w.float().reshape(n, -1, kind.block), dl[..., None], None if ml is None else ml[..., None], kind)
    return GGMLWeight(c.reshape(n, k), d, sc, dmin, m, kind)

