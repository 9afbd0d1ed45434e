import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.calibration.statistics import HessianAccumulator
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.schemes import make_scheme


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.2


def output_error(W, Wq, X):
    return float(((X @ (W - Wq).T) ** 2).mean())


@pytest.mark.parametrize("bits, group, sym", [(2, 32, False), (3, 64, True), (4, 64, True), (4, None, False), (8, None, True)])
@pytest.mark.parametrize("actorder", [None, "weight"])
def test_gptq_beats_rtn_on_the_layer_output(bits, group, sym, actorder):
    torch.manual_seed(1)
    W = torch.randn(64, 128)
    X = correlated_inputs()
    acc = HessianAccumulator(128)
    acc.add(X)
    args = make_scheme(bits, group, sym, actorder).weights
    rtn, _ = rtn_quantize(W, None, args)
    gptq, loss = gptq_quantize(W, acc.H, args)
    assert int(gptq.q.min()) >= args.q_min and int(gptq.q.max()) <= args.q_max
    assert gptq.scale.shape == rtn.scale.shape
    assert output_error(W, gptq.dequantize(), X) < 0.8 * output_error(W, rtn.dequantize(), X)
    assert loss > 0


def test_dead_inputs_do_not_break_the_factorisation():
    W = torch.randn(16, 64)
    X = correlated_inputs(512, 64)
    X[:, 5] = 0
    acc = HessianAccumulator(64)
    acc.add(X)
    qw, _ = gptq_quantize(W, acc.H, make_scheme(4, 32).weights)
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("actorder", [None, "weight"])
def test_gptq_onto_llama_cpp_grids_beats_their_round_to_nearest_and_encodes_exactly(name, actorder):
    """llama.cpp's types, K-quants with their two-level scales among them: GPTQ's codes and block scales are a
    valid block of the type (gguf-py reads back exactly lowbit's weights) and cost less output error than RTN."""
    from dataclasses import replace

    from lowbit.formats.gguf.blocks import decode, encode
    from lowbit.schemes import ggml

    kind = replace(ggml.TYPES[name], actorder=actorder)
    torch.manual_seed(1)
    W = torch.randn(64, 512)
    X = correlated_inputs(d=512)
    acc = HessianAccumulator(512)
    acc.add(X)
    rtn, _ = rtn_quantize(W, None, kind)
    gptq, _ = gptq_quantize(W, acc.H, kind)
    assert torch.equal(decode(encode(gptq), kind), gptq.dequantize())
    assert output_error(W, gptq.dequantize(), X) < 0.8 * output_error(W, rtn.dequantize(), X)


def test_the_asymmetric_target_rounds_for_the_full_precision_outputs():
    """GPTAQ-style calibration: the quantized model's inputs X̃ differ from the full-precision model's X. W' is the
    least-squares map from X̃ to the full-precision outputs W X, and GPTQ on (W', H̃) lands nearer those outputs than
    GPTQ on (W, H̃), which only reproduces W's outputs on the already-perturbed inputs."""
    from lowbit.algorithms.gptq import asymmetric_target
    from lowbit.calibration.statistics import CrossAccumulator
    from lowbit.schemes import ggml

    torch.manual_seed(0)
    X = correlated_inputs(d=128) + 0.1 * torch.randn(2048, 128)
    X_tilde = X + 0.3 * torch.randn(2048, 128)
    W = torch.randn(64, 128)
    H, G = HessianAccumulator(128), CrossAccumulator(128)
    for x, x_tilde in zip(X.split(500), X_tilde.split(500)):
        H.add(x_tilde)
        G.add(x, x_tilde)
    torch.testing.assert_close(G.G, 2 * X.T @ X_tilde / 2048, rtol=1e-4, atol=1e-4)
    least_squares = torch.linalg.lstsq(X_tilde, X @ W.T).solution.T
    torch.testing.assert_close(asymmetric_target(W, G.G, H.H, alpha=1.0, percdamp=0.0), least_squares,
                               rtol=1e-3, atol=1e-3)
    W_prime = asymmetric_target(W, G.G, H.H)
    assert torch.equal(asymmetric_target(W, H.H, H.H), W)  # one stream: nothing to correct, whatever the damping
    target = X @ W.T
    error = {}
    for label, weights in (("plain", W), ("asymmetric", W_prime)):
        Wq = gptq_quantize(weights, H.H, ggml.TYPES["Q4_0"])[0].dequantize()
        error[label] = float(((X_tilde @ Wq.T - target) ** 2).mean())
    assert error["asymmetric"] < 0.97 * error["plain"]  # 5% nearer here (a quarter of the correction)
