"""Continuation log-likelihoods as lm-evaluation-harness computes them, batched or not."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lowbit.errors import LowbitError
from lowbit.evaluation.loglikelihood import encode_pair, loglikelihoods

from ..conftest import make_model

REQUESTS = [("It is a truth universally", " acknowledged"), ("a single man in possession of a good ", "fortune"),
            ("must be in", " want of a wife."), ("their", " daughters")]
CHOICES = [("However little known the feelings", ending) for ending in (" or views", " of such a man", " a", " may be")]
CHOICES_LONG = [("this truth is so well fixed in the minds of the surrounding families", ending)
                for ending in (" that he is considered", " as property", " of some one or other of their daughters")]


def _by_hand(model, tokenizer, context, continuation):
    c, x = encode_pair(tokenizer, context, continuation, None)
    ids = torch.tensor([c + x])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    rows = logprobs[len(c) - 1 : len(c) + len(x) - 1]
    target = torch.tensor(x)
    return float(rows[torch.arange(len(x)), target].sum()), bool((rows.argmax(-1) == target).all()), \
        bool(rows[-1].argmax() == target[-1])


def test_trailing_context_space_moves_to_the_continuation(tiny_tokenizer):
    c, x = encode_pair(tiny_tokenizer, "a good ", "fortune", None)
    c2, x2 = encode_pair(tiny_tokenizer, "a good", " fortune", None)
    assert (c, x) == (c2, x2)
    whole = tiny_tokenizer("a good fortune", add_special_tokens=False).input_ids
    assert c + x == whole
    assert encode_pair(tiny_tokenizer, "a good", " fortune", 7)[0] == [7] + c


def _tiny_gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding window shorter than a packed row
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_loglikelihoods_match_a_forward_per_request_in_the_requests_order(tiny_tokenizer, batch_size, family, capsys):
    """Packed: requests that share a context in one row (the context once), rows of different lengths
    batched together; the probe accepts both families, so this is the packed path."""
    model = make_model(len(tiny_tokenizer)) if family == "llama" else _tiny_gemma3(len(tiny_tokenizer))
    requests = CHOICES[:2] + CHOICES_LONG[:1] + REQUESTS + CHOICES[2:] + CHOICES_LONG[1:]
    scored = loglikelihoods(model, tiny_tokenizer, requests, batch_size=batch_size)
    assert "padded row" not in capsys.readouterr().err
    assert min(len(encode_pair(tiny_tokenizer, *r, None)[1]) for r in CHOICES) == 1
    for (context, continuation), s in zip(requests, scored):
        ll, greedy, last = _by_hand(model, tiny_tokenizer, context, continuation)
        assert s.loglikelihood == pytest.approx(ll, rel=1e-4, abs=1e-4)
        assert (s.greedy, s.last_greedy) == (greedy, last)
        assert s.tokens == len(encode_pair(tiny_tokenizer, context, continuation, None)[1])


class _IgnoresTheMask(LlamaForCausalLM):
    """A model that drops a custom attention mask (always causal): packing would let continuations see each other."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)


def test_a_model_that_ignores_the_packing_mask_is_probed_and_scored_unpacked_saying_so(tiny_tokenizer, capsys):
    model = make_model(len(tiny_tokenizer))
    ignoring = _IgnoresTheMask(model.config).eval()
    ignoring.load_state_dict(model.state_dict())
    scored = loglikelihoods(ignoring, tiny_tokenizer, CHOICES + REQUESTS, batch_size=4)
    assert "scoring each request in a padded row of its own" in capsys.readouterr().err
    for (context, continuation), s in zip(CHOICES + REQUESTS, scored):
        assert s.loglikelihood == pytest.approx(_by_hand(model, tiny_tokenizer, context, continuation)[0], rel=1e-4)


def test_a_request_longer_than_max_length_is_scored_on_its_last_tokens(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    requests = [CHOICES_LONG[0], CHOICES_LONG[2], REQUESTS[0]]
    max_length = 9
    scored = loglikelihoods(model, tiny_tokenizer, requests, max_length=max_length)
    for (context, continuation), s in zip(requests, scored):
        c, x = encode_pair(tiny_tokenizer, context, continuation, None)
        ids = (c + x)[-(max_length + 1):]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0], -1)[-len(x):]
        assert s.loglikelihood == pytest.approx(float(logprobs[torch.arange(len(x)), torch.tensor(x)].sum()), rel=1e-4)


def test_a_model_that_repeats_the_text_is_greedy_everywhere(tiny_tokenizer):
    """A model whose next token is the one after it in the request (a lookup table) scores greedy."""
    context, continuation = REQUESTS[0]
    c, x = encode_pair(tiny_tokenizer, context, continuation, None)
    ids = c + x
    table = torch.full((len(tiny_tokenizer), len(tiny_tokenizer)), -10.0)
    for a, b in zip(ids[:-1], ids[1:]):
        table[a, b] = 10.0

    class Lookup(torch.nn.Module):
        def forward(self, input_ids, **kw):
            return type("Out", (), {"logits": table[input_ids]})()

    (s,) = loglikelihoods(Lookup(), tiny_tokenizer, [(context, continuation)])
    assert s.greedy and s.last_greedy and s.loglikelihood > -0.01 * len(x)


def test_an_empty_context_is_the_eos_token_when_there_is_no_bos(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    (s,) = loglikelihoods(model, tiny_tokenizer, [("", "It is a truth")])
    x = tiny_tokenizer("It is a truth", add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([[tiny_tokenizer.eos_token_id] + x])).logits[0], -1)
    assert s.loglikelihood == pytest.approx(float(logprobs[torch.arange(len(x)), torch.tensor(x)].sum()), rel=1e-4)


def test_an_empty_continuation_is_refused(tiny_tokenizer):
    with pytest.raises(LowbitError, match="encodes to no tokens"):
        loglikelihoods(make_model(len(tiny_tokenizer)), tiny_tokenizer, [("a good", "")])
