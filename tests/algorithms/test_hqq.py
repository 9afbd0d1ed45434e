import torch

from lowbit.algorithms import get_method
from lowbit.schemes import make_scheme


def _heavy_tailed(rows=128, cols=256):
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    return w + 6 * torch.randn(rows, cols) * (torch.rand(rows, cols) < 0.01)


def _lp(w, w_hat, p=0.7):
    return float((w - w_hat).abs().pow(p).sum())


def test_hqq_fits_float_zero_points_that_beat_rtn_on_its_objective():
    w = _heavy_tailed()
    args = make_scheme(4, 64, symmetric=False, actorder=None).weights
    hqq, _ = get_method("hqq").quantize(w, None, args)
    rtn, _ = get_method("rtn").quantize(w, None, args)
    assert hqq.zero_point.is_floating_point() and hqq.args.zp_dtype == "float32"
    assert hqq.q.min() >= -8 and hqq.q.max() <= 7
    assert _lp(w, hqq.dequantize(torch.float32)) < 0.97 * _lp(w, rtn.dequantize(torch.float32))


def test_hqq_on_symmetric_grids_moves_only_the_scale():
    w = _heavy_tailed()
    qw, loss = get_method("hqq").quantize(w, None, make_scheme(4, 64, actorder=None).weights)
    assert qw.zero_point is None and qw.args.zp_dtype is None
    assert loss == float(((w - qw.dequantize(torch.float32)) ** 2).sum())
