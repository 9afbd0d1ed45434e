"""The portable decoder (transformers' forward and cache, lowbit's layers) computes what transformers computes."""

import torch

from lowbit.pipeline.quantize import compress_weights
from lowbit.runtime.hf_decoder import HFDecoder
from lowbit.runtime.kernels import FastLinear

from ..conftest import make_model


def _phi3(vocab: int):
    """A family the lean decoder does not take (fused qkv_proj and gate_up_proj)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0)
    return Phi3ForCausalLM(config).eval()


def test_prefill_then_steps_give_the_logits_of_one_forward(tiny_tokenizer):
    model = _phi3(len(tiny_tokenizer))
    ids = torch.randint(1, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    decoder = HFDecoder(model, max_len=64, dtype=torch.float32)
    assert "phi3 has no lean decoder" in decoder.kernels()["decode step"]
    prompt = decoder(ids[:, :9], 0, last_only=False)[0]
    steps = [decoder(ids[:, i : i + 1], i)[0, -1] for i in range(9, 12)]
    scale = float(ref.abs().max())
    torch.testing.assert_close(prompt, ref[:9], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(torch.stack(steps), ref[9:], rtol=0, atol=1e-5 * scale)
    decoder(ids[:, :4], 0)  # a new prompt at position 0 starts a new cache
    torch.testing.assert_close(decoder(ids[:, 4:5], 4)[0, -1], ref[4], rtol=0, atol=1e-5 * scale)


def test_quantized_layers_run_on_lowbit_kernels_with_the_checkpoint_numerics(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
    compress_weights(model, "int4_sym", group_size=32)
    ids = torch.randint(1, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]  # QuantLinear: the dequantized weights in float32
    decoder = HFDecoder(model, max_len=64, dtype=torch.float32)
    swapped = decoder.projections()
    assert len(swapped) == 2 * 7 and all(isinstance(m, FastLinear) and m.fallback is None for _, m in swapped)
    prompt = decoder(ids[:, :9], 0, last_only=False)[0]  # more rows than the GEMV takes: dense GEMM
    step = decoder(ids[:, 9:], 9)[0, -1]  # one row: the int8-activation GEMV
    scale = float(ref.abs().max())
    # the runtime keeps scales in float16 (a relative rounding of up to 2⁻¹¹ per group): 2e-3 of the range
    torch.testing.assert_close(prompt, ref[:9], rtol=0, atol=2e-3 * scale)
    assert float((step - ref[9]).abs().max()) < 0.02 * scale
