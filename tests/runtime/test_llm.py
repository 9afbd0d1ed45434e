import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.runtime.llm import LLM
from lowbit.runtime.sampling import SamplingParams, sample


def test_sampling_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, SamplingParams(temperature=0), None) == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.4), g) for _ in range(100)}
    assert picks == {1}


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5),
                                    dict(top_k=-1), dict(presence_penalty=2.5)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(LowbitError):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), quantization="int4", max_model_len=64)


def test_greedy_generation_is_deterministic_and_respects_max_tokens(llm):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a, b = llm.generate(["a single man"], params)[0], llm.generate("a single man", params)[0]
    assert a.text == b.text and a.finish_reason == "length"
    assert len(llm.tokenizer(a.text, add_special_tokens=False).input_ids) <= 8


def test_seeded_sampling_reproduces(llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    assert llm.generate("truth", params)[0].text == llm.generate("truth", params)[0].text


def test_stop_strings_cut_the_text(llm):
    free = llm.generate("a single", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    stop = free.strip()[:2]
    out = llm.generate("a single", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text


def test_a_stop_string_spanning_tokens_never_leaks_a_prefix(llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = llm.generate("a single", params)[0].text
    pieces = [d for d, _ in llm.stream_ids(llm.encode("a single"), params)]
    cuts = [len("".join(pieces[:i])) for i in range(1, len(pieces))]
    start = next(c for c in cuts if 0 < c < len(free) - 4)  # a stop string that begins where a token does
    stop = free[start : start + 4] + "\u2603"  # ... and never matches: its first 4 characters are held back, then shown
    params.stop = [free[start : start + 4]]
    deltas = [d for d, _ in llm.stream_ids(llm.encode("a single"), params)]
    assert "".join(deltas) == free[: free.index(params.stop[0])]
    params.stop = [stop]
    deltas = [d for d, _ in llm.stream_ids(llm.encode("a single"), params)]
    assert "".join(deltas) == free


def test_too_long_prompt_is_refused(llm):
    with pytest.raises(LowbitError, match="exceeds the context"):
        llm.generate("fortune " * 80, SamplingParams(max_tokens=4))


def test_unknown_on_the_fly_quantization(tiny_model_dir):
    with pytest.raises(LowbitError, match="int8, int4, fp8"):
        LLM(str(tiny_model_dir), quantization="int3")


def test_a_family_without_lean_decoder_says_decode_takes_the_slower_forward(tmp_path, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_model_len=32)
    assert any("gpt2 has no lean decoder" in line for line in llm.notices)
    assert "gpt2 has no lean decoder" in capsys.readouterr().err
    assert llm.kernels()["decode step"].startswith("transformers forward")


def test_a_checkpoint_s_calibrated_fp8_cache_is_the_default_and_a_given_format_overrides_it(tiny_model_dir, tmp_path):
    from lowbit import api

    api.quantize(str(tiny_model_dir), method="rtn", output_dir=tmp_path / "q", kv_cache="fp8", calib="shakespeare",
                 nsamples=2, seqlen=32, progress=False)
    calibrated = LLM(str(tmp_path / "q"), max_model_len=64)
    assert calibrated.kernels()["KV cache"] == "fp8 (calibrated static scales)" and not calibrated.notices
    scales = calibrated.decoder.cache.k_scale
    assert scales.shape == (2,) and torch.all(scales > 0)
    overridden = LLM(str(tmp_path / "q"), max_model_len=64, kv_cache="int8")
    assert overridden.kernels()["KV cache"] == "int8 (dynamic scales)"
    assert overridden.notices == ["lowbit: the checkpoint's calibrated fp8 KV cache is not used: --kv-cache int8 given"]
    evaluated = api.evaluate(str(tmp_path / "q"), "austen", seqlen=32, max_tokens=64, progress=False)
    assert evaluated.kv_cache == "fp8 static"


def test_a_context_beyond_the_model_s_positions_is_clamped_with_a_notice_or_refused(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), max_model_len=1000)
    assert llm.max_model_len == 256
    assert "lowbit: a context of 1000 is beyond the model's 256 positions; using 256" in llm.notices
    with pytest.raises(LowbitError, match="a long test needs a context of 1000 tokens, beyond the model's 256"):
        LLM(str(tiny_model_dir), max_model_len=1000, exact_context="a long test")


def test_penalties_follow_openai_formula():
    from lowbit.runtime.sampling import penalize

    logits, counts = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 3.0])
    out = penalize(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), counts)
    assert torch.allclose(out, torch.tensor([1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5]))


def test_a_frequency_penalty_stops_greedy_repetition(llm):
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    penalized = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    ids = lambda params: llm.generate("a single", params)[0].token_ids  # noqa: E731
    distinct = lambda tokens: len(set(tokens)) / len(tokens)  # noqa: E731
    assert distinct(ids(penalized)) > distinct(ids(plain))
