"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian.

For a layer y = W x with calibration inputs X [n, in], the layer-wise objective is
‖W X − Ŵ X‖², whose Hessian is H = 2 X Xᵀ / n [in, in]. Quantizing column q of row w gives

    δ = (w_q − quant(w_q)) / [H⁻¹]_qq        w_{q+1:} ← w_{q+1:} − δ · [H⁻¹]_{q, q+1:}

With the upper Cholesky factor U of H⁻¹ the row [H⁻¹]_{q, q:} / [H⁻¹]_qq is U_{q, q:} / U_qq,
so one factorisation serves all columns. Updates are applied lazily in blocks of columns
(``blocksize``) so most of the work is one matrix product per block.
"""

from __future__ import annotations

from typing import Union

import torch

from lowbit.schemes import ggml
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.ggml import GGMLType, GGMLWeight
from lowbit.schemes.grid import QuantizedWeight, code_dtype, dequantize_with, fit_qparams, quantize_with


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H), raising λ until it factors."""
    damp = percdamp * torch.mean(torch.diag(H)).clamp(min=1e-8)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp *= 10
    raise ArithmeticError("the Hessian is not positive definite even after dampening")


GPTAQ_ALPHA = 0.25  # GPTAQ's weight on the asymmetric correction; the full one (1) measured 70.8 on SmolLM2 Q4_0


def asymmetric_target(
    W: torch.Tensor, G: torch.Tensor, H: torch.Tensor, alpha: float = GPTAQ_ALPHA, percdamp: float = 0.01
) -> torch.Tensor:
    """W' = W + α W (G − H)(H + λI)⁻¹ [out, in], for G = 2/n X X̃ᵀ and H = 2/n X̃ X̃ᵀ [in, in] (asymmetric
    calibration, after GPTAQ, Li et al. 2025): X̃ are the inputs the layer gets in the model quantized so far, X the
    full-precision model's on the same tokens.

    At α = 1 (undamped) W' = W G H⁻¹ is the least-squares map from X̃ to the full-precision outputs W X, and
    min_Ŵ ‖Ŵ X̃ − W X‖² = ‖(Ŵ − W') X̃‖² + const (the residual W' X̃ − W X is orthogonal to X̃'s rows), so GPTQ on
    (W', H) rounds for the full-precision targets instead of reproducing W's outputs on already-perturbed inputs.
    The full correction over-fits what the calibration text's errors were (SmolLM2 → Q4_0: 70.8 perplexity against
    31.9 without it); a quarter of it gave 31.3 (0.25 is also the weight GPTAQ's code gives its asymmetric term, which
    it applies inside GPTQ's column loop rather than to the target). W' = W where the two streams agree (G = H).
    """
    damp = percdamp * torch.mean(torch.diag(H)).clamp(min=1e-8)
    L = torch.linalg.cholesky(H + damp * torch.eye(H.shape[0], dtype=H.dtype))
    correction = torch.cholesky_solve((W.float() @ (G - H)).t(), L).t()
    return (W.float() + alpha * correction).to(W.dtype)


class _IntGrid:
    """lowbit's grids (:class:`QuantizationArgs`): one (scale, zero point) per group of columns."""

    def __init__(self, args: QuantizationArgs, cols: int, dtype: torch.dtype):
        self.args, self.dtype, self.span = args, dtype, args.group_size_for(cols)
        self.code_dtype = code_dtype(args)

    def fit(self, W: torch.Tensor, importance: torch.Tensor):
        return fit_qparams(W, self.args, self.dtype)

    def round(self, w: torch.Tensor, fitted, c: int):
        s, z = fitted
        q = quantize_with(w[:, None], s, z, self.args)
        return q[:, 0], dequantize_with(q, s, z, args=self.args)[:, 0]

    def weight(self, Q: torch.Tensor, fits: list) -> QuantizedWeight:
        zero = None if self.args.symmetric else torch.stack([z for _, z in fits], dim=1)
        scale = torch.stack([s for s, _ in fits], dim=1).to(self.dtype)
        return QuantizedWeight(q=Q, scale=scale, zero_point=zero, args=self.args)


class _GGMLGrid:
    """llama.cpp's grids (:class:`GGMLType`): fitted per super-block, weighted by the Hessian's diagonal (what
    llama.cpp's importance matrix holds), rounded per block."""

    code_dtype = torch.uint8

    def __init__(self, kind: GGMLType):
        self.kind, self.span = kind, kind.super

    def fit(self, W: torch.Tensor, importance: torch.Tensor):
        d, sc, dmin, m = ggml.fit(W, self.kind, importance)
        return (d, sc, dmin, m), ggml.steps(d, sc, dmin, m, self.kind)

    def round(self, w: torch.Tensor, fitted, c: int):
        dl, ml = fitted[1]
        j = c // self.kind.block
        dl, ml = dl[:, j], None if ml is None else ml[:, j]
        q = ggml.round_codes(w, dl, ml, self.kind)
        return q, ggml.dequantize_codes(q, dl, ml, self.kind)

    def weight(self, Q: torch.Tensor, fits: list) -> GGMLWeight:
        parts = list(zip(*(raw for raw, _ in fits)))
        cat = [None if p[0] is None else torch.cat(p, dim=1) for p in parts]
        return GGMLWeight(Q, cat[0], cat[1], cat[2], cat[3], self.kind)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    args: Union[QuantizationArgs, GGMLType],
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Union[QuantizedWeight, GGMLWeight], float]:
    """Quantize W [out, in] given H [in, in] onto ``args``' grid (lowbit's, or a llama.cpp type); returns the
    weight on the grid and Σ of the proxy loss.

    ``args.actorder == "weight"`` visits columns by decreasing diag(H) with *static* groups: each group's scale
    is fitted on the original contiguous columns before any update, so the saved layout is plain contiguous
    groups (no g_idx).
    """
    dtype = W.dtype
    W = W.detach().clone().float()
    H = H.clone()
    rows, cols = W.shape
    grid = _GGMLGrid(args) if isinstance(args, GGMLType) else _IntGrid(args, cols, dtype)
    g = grid.span
    n_groups = cols // g

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H).clone()

    fits: list = [None] * n_groups
    static = args.actorder == "weight"
    precomputed = static or n_groups == 1
    if precomputed:
        for j in range(n_groups):
            fits[j] = grid.fit(W[:, j * g : (j + 1) * g], importance[j * g : (j + 1) * g])

    perm = torch.arange(cols)
    if static:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    U = _inverse_hessian_cholesky(H, percdamp)
    Q = torch.zeros(rows, cols, dtype=grid.code_dtype)
    losses = torch.zeros(rows)
    if not precomputed:
        blocksize = g * max(1, blocksize // g)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j, c = divmod(int(perm[col]), g)
            if not precomputed and c == 0:
                fits[j] = grid.fit(W1[:, i : i + g], importance[col : col + g])
            w = W1[:, i]
            q, w_hat = grid.round(w, fits[j], c)
            d = U1[i, i]
            err = (w - w_hat) / d
            losses += err**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
            Q[:, col] = q
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static:
        Q = Q[:, torch.argsort(perm)]
    return grid.weight(Q, fits), float(losses.sum())
