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
    windows = evaluation_windows(text, tiny_tokenizer, 16, None)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens == windows.shape[0] * 15
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_max_tokens_limits_the_windows(tiny_tokenizer, text_file):
    text = evaluation_text(str(text_file))
    assert evaluation_windows(text, tiny_tokenizer, 16, 64).shape == (4, 16)


def test_bos_is_prepended_to_each_window_when_the_tokenizer_wants_it(tiny_tokenizer, text_file, monkeypatch):
    from lowbit.evaluation import perplexity as module

    monkeypatch.setattr(module, "_wants_bos", lambda tok: True)
    windows = evaluation_windows(evaluation_text(str(text_file)), tiny_tokenizer, 16, None)
    assert torch.all(windows[:, 0] == tiny_tokenizer.bos_token_id)


def test_perplexity_refuses_calibration_text(tiny_tokenizer, text_file):
    with pytest.raises(TypeError):
        perplexity(make_model(len(tiny_tokenizer)), tiny_tokenizer, calibration_text(str(text_file)))
