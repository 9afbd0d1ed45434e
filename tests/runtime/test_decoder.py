import pytest
import torch

from lowbit.algorithms import get_method
from lowbit.pipeline.quantize import quantize_model
from lowbit.pipeline.recipe import Recipe
from lowbit.models.architectures import ARCHITECTURES
from lowbit.runtime.decoder import LeanDecoder
from lowbit.schemes import make_scheme

from ..conftest import make_model


@pytest.fixture()
def quantized_model(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
    quantize_model(model, Recipe(make_scheme(4, 64), get_method("rtn")))
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


def test_the_bfloat16_cache_halves_its_bytes_and_decodes_as_a_float32_cache_does(quantized_model):
    ids = torch.randint(0, quantized_model.config.vocab_size, (1, 40))
    wide = LeanDecoder(quantized_model, max_len=64, dtype=torch.float32, cache_dtype=torch.float32)
    narrow = LeanDecoder(quantized_model, max_len=64, dtype=torch.float32)  # the default cache on every CPU
    assert narrow.k_cache.dtype == torch.bfloat16 and narrow.kernels()["KV cache"] == "bfloat16"
    assert 2 * narrow.k_cache.nbytes == wide.k_cache.nbytes
    a, b = (d(ids[:, :32], 0, last_only=False)[0] for d in (wide, narrow))
    steps = [[d(ids[:, i : i + 1], i)[0, -1] for i in range(32, 40)] for d in (wide, narrow)]
    for x, y in zip([a, *steps[0]], [b, *steps[1]]):
        assert float((x - y).abs().max()) < 0.01 * float(x.abs().max())
    assert [int(x.argmax()) for x in steps[0]] == [int(y.argmax()) for y in steps[1]]


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


def _gemma3(vocab: int, window: int):
    """A tiny Gemma 3: (1 + w) norms around attention and MLP, √D embedding scale, GELU-tanh, q/k norms,
    sliding-window layers with their own RoPE base beside a global one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=48, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=512,
    )
    model = Gemma3ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(0, 0.3)  # Gemma initialises the norms' w to 0 (a multiplier of 1): make them count
    return model


@pytest.mark.parametrize("T", [6, 24])  # within the window of 8, and three times past it
def test_the_lean_decoder_computes_gemma_3_as_transformers_does(tiny_tokenizer, T):
    model = _gemma3(len(tiny_tokenizer), window=8)
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    decoder = LeanDecoder(model, max_len=64, dtype=torch.float32, cache_dtype=torch.float32)
    torch.testing.assert_close(decoder(ids, 0, last_only=False)[0], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    decoder(ids[:, : T - 1], 0)
    step = decoder(ids[:, T - 1 :], T - 1)[0, -1]  # the compiled step when available
    torch.testing.assert_close(step, ref[-1], rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_windowed_prompt_attention_in_chunks_after_a_cached_prefix_is_transformers(tiny_tokenizer, monkeypatch):
    """Chunks of 5 query rows starting at position 7 over a window of 8: each chunk's first visible key moves."""
    import lowbit.runtime.decoder as decoder_module

    model = _gemma3(len(tiny_tokenizer), window=8)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    monkeypatch.setattr(decoder_module, "ATTENTION_CHUNK", 5)
    decoder = LeanDecoder(model, max_len=64, dtype=torch.float32, cache_dtype=torch.float32)
    decoder(ids[:, :7], 0)
    out = decoder(ids[:, 7:], 7, last_only=False)[0]
    torch.testing.assert_close(out, ref[7:], rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fused SDPA, or two matmuls
def test_a_prompt_chunk_attends_only_to_the_keys_it_sees(quantized_model, dtype):
    decoder = LeanDecoder(quantized_model, max_len=64, dtype=dtype)
    heads, kv, d = decoder.heads, decoder.kv_heads, decoder.head_dim
    q, k, v = torch.randn(heads, 6, d), torch.randn(kv, 9, d), torch.randn(kv, 9, d)
    visible = torch.rand(6, 9) < 0.6
    visible[:, 0] = True
    kr, vr = (t.double().repeat_interleave(heads // kv, 0) for t in (k, v))
    scores = (q.double() @ kr.transpose(1, 2) * decoder.attn_scale).masked_fill(~visible, float("-inf"))
    ref = scores.softmax(-1) @ vr
    out = decoder._attend_chunk(q.to(dtype), k.to(dtype), v.to(dtype), visible)
    assert out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * float(ref.abs().max()))


def _family_model(family: str, vocab: int):
    """Tiny models of the other supported families: Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Gemma 3."""
    import transformers

    if family == "gemma3":
        return _gemma3(vocab, window=64)
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[family]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
    )
    model = model_cls(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)  # Qwen2 initialises its q/k/v biases to zero: make them count
    return model


@pytest.mark.parametrize(
    "case",
    # Gemma 3 in float32 without int8 activations: its √D-scaled stream turns the activations' rounding flips
    # between the two paths into ~3e-4 of the logit range, so the dense case checks the step's own arithmetic.
    ["llama int4", "llama dense", "llama int4 + int8 head", "llama fp8", "llama w3", "qwen2 int4", "qwen3 int4",
     "gemma3 dense float32"],
)
def test_the_compiled_decode_step_agrees_with_the_pytorch_step(case, tiny_tokenizer):
    """One-call C++ decode steps give the logits of the PyTorch path, deep into the cache (several chunks).

    Both keep the residual stream in float32 and call the same kernels, so they agree to float rounding;
    fp8 layers (no C++ kernel) are called back through Python without turning the compiled step off.
    """
    from lowbit.runtime.onthefly import quantizer_for

    family, body = case.split()[:2]
    if family == "llama":
        model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
        model.config.max_position_embeddings = 512
    else:
        model = _family_model(family, len(tiny_tokenizer))
    if body in ("int4", "w3"):
        quantize_model(model, Recipe(make_scheme(4 if body == "int4" else 3, 64), get_method("rtn")))
    head = quantizer_for("int8") if case.endswith("int8 head") else None
    body_quantizer = quantizer_for("fp8") if body == "fp8" else None
    dtype = torch.float32 if case.endswith("float32") else None  # else the CPU's compute dtype
    decoder = LeanDecoder(model, max_len=320, quantize=body_quantizer, quantize_head=head, dtype=dtype)
    if decoder.step is None:
        pytest.skip("lowbit's native code cannot be built on this machine")
    ids = torch.randint(0, model.config.vocab_size, (1, 304), generator=torch.Generator().manual_seed(0))
    decoder(ids[:, :300], 0)
    compiled = [decoder(ids[:, i : i + 1], i)[0, -1] for i in range(300, 304)]
    step, decoder.step = decoder.step, None
    decoder(ids[:, :300], 0)
    reference = [decoder(ids[:, i : i + 1], i)[0, -1] for i in range(300, 304)]
    decoder.step = step
    # to float rounding: float32's, or where the GEMMs run in bfloat16, about one bfloat16 step (2^-8) of the range
    tolerance = 1e-4 if decoder.dtype == torch.float32 else 2**-8
    for a, b in zip(compiled, reference):
        assert float((a - b).abs().max()) < tolerance * float(b.abs().max())
        assert int(a.argmax()) == int(b.argmax())


def test_chunked_prompt_attention_equals_one_chunk(quantized_model, monkeypatch):
    import lowbit.runtime.decoder as decoder_module

    ids = torch.randint(0, quantized_model.config.vocab_size, (1, 40))
    decoder = LeanDecoder(quantized_model, max_len=64)
    decoder(ids[:, :7], 0)
    whole = decoder(ids[:, 7:], 7, last_only=False)
    monkeypatch.setattr(decoder_module, "ATTENTION_CHUNK", 5)
    decoder(ids[:, :7], 0)
    chunked = decoder(ids[:, 7:], 7, last_only=False)
    torch.testing.assert_close(chunked, whole, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("all_layers", [False, True])  # the int8 or int4 table is the tied head's: one copy
def test_quantized_embeddings_run_in_the_lean_decoder(tiny_tokenizer, all_layers):
    from lowbit.pipeline.quantize import compress_weights

    model = make_model(len(tiny_tokenizer), hidden=128, intermediate=256)
    model.config.max_position_embeddings = 512
    compress_weights(model, "int4_sym", group_size=64, all_layers=all_layers)
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    decoder = LeanDecoder(model, max_len=64)
    assert decoder.shared_embedding
    out = decoder(ids, 0, last_only=False)[0]
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    decoder(ids[:, :19], 0)
    step = decoder(ids[:, 19:], 19)[0, -1]  # the compiled step when available
    assert float((step - ref[-1]).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.parametrize("model_type", sorted(t for t, a in ARCHITECTURES.items() if a.lean is not None))
def test_every_family_the_lean_decoder_claims_computes_as_transformers_does(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert LeanDecoder.supports(model)
    ids = torch.randint(1, 256, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    decoder = LeanDecoder(model, max_len=64, dtype=torch.float32, cache_dtype=torch.float32)
    torch.testing.assert_close(decoder(ids, 0, last_only=False)[0], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("kv_cache", ["bf16", "int8", "fp8", "int4"])
@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_prefills_and_decodes_each_sequence_as_it_would_alone(quantized_model, kv_cache, compiled):
    """Prompts of different lengths prefilled together in one pass, each into its own cache slot, then decoded by
    one batched step each token: each gets the logits it gets alone, so batching never changes a request's text
    (int4: past a whole group)."""
    alone = LeanDecoder(quantized_model, max_len=96, kv_cache=kv_cache)
    batch = LeanDecoder(quantized_model, max_len=96, kv_cache=kv_cache, slots=3)
    if compiled and batch.step is None:
        pytest.skip("lowbit's native code cannot be built on this machine")
    if not compiled:
        alone.step = batch.step = None
    g = torch.Generator().manual_seed(0)
    V, steps, slots = quantized_model.config.vocab_size, 4, [2, 0, 1]
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (5, 40, 17)]
    following = [torch.randint(0, V, (steps,), generator=g) for _ in prompts]
    expected, first = [], []
    for prompt, nxt in zip(prompts, following):
        first.append(alone(prompt, 0)[0, -1])
        n = prompt.shape[1]
        expected.append(torch.stack([alone(nxt[i : i + 1][None], n + i)[0, -1] for i in range(steps)]))
    prefilled = batch.prefill([(prompt[0].tolist(), slot) for prompt, slot in zip(prompts, slots)])
    for got, want in zip(prefilled, first):
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    rows = [batch.decode_batch([int(nxt[i]) for nxt in following], [p.shape[1] + i for p in prompts], slots)
            for i in range(steps)]
    for b, want in enumerate(expected):
        got = torch.stack([r[b] for r in rows])
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_cache_slots_are_checked(quantized_model):
    decoder = LeanDecoder(quantized_model, max_len=32, slots=2)
    with pytest.raises(ValueError, match="slot 2 of 2"):
        decoder(torch.tensor([[1, 2]]), 0, slot=2)
    with pytest.raises(ValueError, match="slot 2 of 2"):
        decoder.prefill([([1, 2], 0), ([3], 2)])
    if decoder.step is not None:
        with pytest.raises(RuntimeError, match="two sequences in one cache slot"):
            decoder.decode_batch([1, 2], [0, 0], [1, 1])
