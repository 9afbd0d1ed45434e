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


import torch

from lowbit.schemes.args import QuantizationArgs
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


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    args: QuantizationArgs,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[QuantizedWeight, float]:
    """Quantize W [out, in] given H [in, in]; returns the weight on the grid and Σ of the proxy loss.

    ``args.actorder == "weight"`` visits columns by decreasing diag(H) with *static* groups: each
    group's scale is fitted on the original contiguous columns before any update, so the saved
    layout is plain contiguous groups (no g_idx).
    """
    dtype = W.dtype
    W = W.detach().clone().float()
    H = H.clone()
    rows, cols = W.shape
    g = args.group_size_for(cols)
    n_groups = cols // g

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.empty(rows, n_groups, dtype=dtype)
    zero = None if args.symmetric else torch.empty(rows, n_groups, dtype=torch.int8)
    static = args.actorder == "weight"
    precomputed = static or n_groups == 1
    if precomputed:
        for j in range(n_groups):
            s, z = fit_qparams(W[:, j * g : (j + 1) * g], args, dtype)
            scale[:, j] = s
            if zero is not None:
                zero[:, j] = z

    perm = torch.arange(cols)
    if static:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // g

    U = _inverse_hessian_cholesky(H, percdamp)
    Q = torch.zeros(rows, cols, dtype=code_dtype(args))
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
            j = int(group_of[col])
            if not precomputed and col % g == 0:
                s, z = fit_qparams(W1[:, i : i + g], args, dtype)
                scale[:, j] = s
                if zero is not None:
                    zero[:, j] = z
            s = scale[:, j]
            z = None if zero is None else zero[:, j]
            w = W1[:, i]
            q = quantize_with(w[:, None], s, z, args)[:, 0]
            w_hat = dequantize_with(q[:, None], s, z, args=args)[:, 0]
            d = U1[i, i]
            err = (w - w_hat) / d
            losses += err**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
            Q[:, col] = q
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(q=Q, scale=scale, zero_point=zero, args=args), float(losses.sum())
