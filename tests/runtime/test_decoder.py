import pytest
import torch

from lowbit.algorithms import get_method
from lowbit.calibration.sequential import quantize_blocks
from lowbit.runtime.decoder import LeanDecoder
from lowbit.schemes import make_scheme

from ..conftest import make_model


@pytest.fixture()
def quantized_model(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
    quantize_blocks(model, make_scheme(4, 64), get_method("rtn"))
    return model


def test_lean_decoder_matches_transformers_forward(quantized_model):
    ids = torch.randint(0, quantized_model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = quantized_model(input_ids=ids).logits[0]
    decoder = LeanDecoder(quantized_model, max_len=64)
    out = decoder(ids, 0, last_only=False)[0]
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_incremental_decoding_equals_one_long_prefill(quantized_model):
    ids = torch.randint(0, quantized_model.config.vocab_size, (1, 12))
    decoder = LeanDecoder(quantized_model, max_len=32)
    full = decoder(ids, 0, last_only=False)[0]
    decoder(ids[:, :5], 0)
    chunk = decoder(ids[:, 5:9], 5, last_only=False)[0]
    steps = [decoder(ids[:, i : i + 1], i)[0, -1] for i in range(9, 12)]
    torch.testing.assert_close(torch.cat([chunk, torch.stack(steps)]), full[5:], rtol=0.02, atol=0.05)


def test_context_overflow_is_refused(quantized_model):
    decoder = LeanDecoder(quantized_model, max_len=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        decoder(torch.zeros(1, 9, dtype=torch.long), 0)


def test_a_tied_int8_head_also_serves_as_the_embedding(quantized_model):
    from lowbit.runtime.onthefly import quantizer_for

    ids = torch.randint(0, quantized_model.config.vocab_size, (1, 16))
    plain = LeanDecoder(quantized_model, max_len=32)
    shared = LeanDecoder(quantized_model, max_len=32, quantize_head=quantizer_for("int8"))
    assert shared.shared_embedding and shared.embed is None
    a, b = plain(ids, 0, last_only=False), shared(ids, 0, last_only=False)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
