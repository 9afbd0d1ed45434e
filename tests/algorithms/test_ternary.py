import torch

from lowbit.algorithms import get_method
from lowbit.schemes import make_scheme


def test_ternary_is_absmean_on_three_levels():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    qw, loss = get_method("ternary").quantize(W, None, make_scheme(4, 64).weights)
    assert set(qw.q.unique().tolist()) == {-1, 0, 1}
    assert qw.args.num_bits == 2 and qw.args.symmetric  # stored as 2-bit codes
    gamma = W.reshape(32, 2, 64).abs().mean(dim=-1)
    torch.testing.assert_close(qw.scale, gamma)
    assert abs(loss - float(((W - qw.dequantize(torch.float32)) ** 2).sum())) < 1e-3 * loss
