import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.data.corpora import calibration_text, evaluation_text
from lowbit.evaluation.perplexity import evaluation_windows, perplexity

from ..conftest import make_model


def test_perplexity_is_exp_of_mean_token_nll_over_non_overlapping_windows(tiny_tokenizer, text_file):
    model = make_model(len(tiny_tokenizer))
    text = evaluation_text(str(text_file))
    result = perplexity(model, tiny_tokenizer, text, seqlen=16, batch_size=3)
    windows = evaluation_windows(text, tiny_tokenizer, 16, None).ids
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens == windows.shape[0] * 15
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_windows_whose_logits_exceed_the_budget_run_fewer_at_a_time_with_the_same_result(tiny_tokenizer, text_file):
    model = make_model(len(tiny_tokenizer))
    text = evaluation_text(str(text_file))
    window_logits = 16 * model.config.vocab_size * 4
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    whole = perplexity(model, tiny_tokenizer, text, seqlen=16, batch_size=4)
    assert max(calls) == 4
    calls.clear()
    split = perplexity(model, tiny_tokenizer, text, seqlen=16, batch_size=4, logits_bytes=2 * window_logits + 1)
    assert max(calls) == 2 and sum(calls) == whole.windows
    assert split.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def test_max_tokens_limits_the_windows(tiny_tokenizer, text_file):
    text = evaluation_text(str(text_file))
    assert evaluation_windows(text, tiny_tokenizer, 16, 64).ids.shape == (4, 16)


def test_bos_is_prepended_to_each_window_when_the_tokenizer_wants_it(tiny_tokenizer, text_file, monkeypatch):
    from lowbit.evaluation import perplexity as module

    monkeypatch.setattr(module, "bos_id", lambda tok: tok.bos_token_id)
    windows = evaluation_windows(evaluation_text(str(text_file)), tiny_tokenizer, 16, None).ids
    assert torch.all(windows[:, 0] == tiny_tokenizer.bos_token_id)


def test_perplexity_refuses_calibration_text(tiny_tokenizer, text_file):
    with pytest.raises(TypeError):
        perplexity(make_model(len(tiny_tokenizer)), tiny_tokenizer, calibration_text(str(text_file)))


@pytest.mark.parametrize("bos", [False, True])
def test_bits_per_byte_and_word_perplexity_count_the_text_the_scored_tokens_cover(tiny_tokenizer, text_file,
                                                                                   monkeypatch, bos):
    from lowbit.evaluation import perplexity as module

    monkeypatch.setattr(module, "bos_id", lambda tok: tok.bos_token_id if bos else None)
    model = make_model(len(tiny_tokenizer))
    text = evaluation_text(str(text_file))
    result = perplexity(model, tiny_tokenizer, text, seqlen=16, batch_size=3)
    windows = evaluation_windows(text, tiny_tokenizer, 16, None).ids
    body = windows[:, 1:]  # the scored tokens; the text is ASCII and byte-level, so they decode to their bytes
    assert result.bytes == sum(len(tiny_tokenizer.decode(w).encode()) for w in body)
    nll = math.log(result.perplexity) * result.tokens
    assert result.bits_per_byte == pytest.approx(nll / (result.bytes * math.log(2)), rel=1e-6)
    assert result.word_perplexity == pytest.approx(math.exp(nll / result.words), rel=1e-6)
    covered = tiny_tokenizer.decode(windows[:, int(bos):].reshape(-1))
    # each word is counted once, in the window scoring its last character; at most one per window ends unscored
    assert len(covered.split()) - len(windows) <= result.words <= len(covered.split())


@pytest.mark.parametrize("bos", [False, True])
def test_llama_cpp_protocol_scores_the_second_half_of_each_window_of_the_stream(tiny_tokenizer, text_file,
                                                                               monkeypatch, bos):
    """llama-perplexity's windows: the stream (BOS first, where the tokenizer adds one) cut every seqlen tokens,
    each window's first token replaced by BOS, only targets seqlen/2 + 1 … seqlen − 1 scored, and its ±."""
    from lowbit.data.tokens import tokenize_text
    from lowbit.evaluation import perplexity as module

    if bos:
        monkeypatch.setattr(module, "bos_id", lambda tok: tok.bos_token_id)
    model = make_model(len(tiny_tokenizer))
    text = evaluation_text(str(text_file))
    stream = tokenize_text(text, tiny_tokenizer)[0]
    if bos:
        stream = torch.cat([torch.tensor([tiny_tokenizer.bos_token_id]), stream])
    n = stream.numel() // 16
    windows = stream[: n * 16].reshape(n, 16).clone()
    if bos:
        windows[:, 0] = tiny_tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, 8:-1].reshape(-1, logits.shape[-1]), windows[:, 9:].reshape(-1), reduction="none")
    result = perplexity(model, tiny_tokenizer, text, seqlen=16, batch_size=3, protocol="llama.cpp")
    assert (result.windows, result.tokens) == (n, n * 7)
    assert result.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    spread = float((nll.double() ** 2).mean() - nll.double().mean() ** 2)
    assert result.stderr == pytest.approx(result.perplexity * math.sqrt(spread / (n * 7 - 1)), rel=1e-4)


def test_an_unknown_protocol_is_refused(tiny_tokenizer, text_file):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="unknown perplexity protocol 'llama'; choose one of lowbit, llama.cpp"):
        evaluation_windows(evaluation_text(str(text_file)), tiny_tokenizer, 16, None, "llama")
