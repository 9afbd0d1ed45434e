"""The weight-compression family on the real packaged model and held-out text."""

import pytest

from lowbit import api
from lowbit.data.corpora import evaluation_text
from lowbit.evaluation.perplexity import perplexity
from lowbit.models.loader import load_model
from lowbit.schemes import make_scheme

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


def ppl(model, tokenizer, tokens=4096):
    return perplexity(model, tokenizer, evaluation_text("austen"), seqlen=512, max_tokens=tokens).perplexity


@pytest.fixture(scope="module")
def rtn_w4():
    _, model, tokenizer = api.quantize(MODEL, make_scheme(4, 64), method="rtn", progress=False, return_model=True)
    return ppl(model, tokenizer)


@pytest.mark.slow  # ~115 s on two Zen 4 cores; NF4 and HQQ are also checked against RTN on tiny layers
def test_nf4_and_hqq_beat_rtn_without_data(rtn_w4):
    _, nf4, tok = api.compress(MODEL, mode="nf4", group_size=64, ignore=("model.embed_tokens",), progress=False,
                               return_model=True)
    _, hqq, tok = api.quantize(MODEL, make_scheme(4, 64, symmetric=False), method="hqq", progress=False,
                               return_model=True)
    assert ppl(nf4, tok) < rtn_w4
    assert ppl(hqq, tok) < rtn_w4


def test_mixed_precision_keeps_the_sensitive_layers_and_helps(rtn_w4):
    result, model, tok = api.compress(MODEL, mode="int4_sym", group_size=64, ratio=0.8, progress=False,
                                      return_model=True)
    rows = {row["scheme"].split()[0]: row for row in result.distribution}
    assert abs(rows["int4"]["ratio_defining_pct"] - 80) < 2
    assert ppl(model, tok) < rtn_w4


def test_fisher_ranking_without_data_closes_half_the_gap_at_ratio_0_8(rtn_w4):
    full, tok, _ = load_model(MODEL)
    fp = ppl(full, tok)
    _, model, tok = api.compress(MODEL, mode="int4_sym", group_size=64, ratio=0.8, sensitivity_metric="fisher",
                                 progress=False, return_model=True)
    assert ppl(model, tok) < rtn_w4 - 0.5 * (rtn_w4 - fp)


@pytest.mark.slow  # ~4 minutes on two cores; AWQ's mechanics are covered by tests/algorithms/test_awq.py
def test_awq_beats_rtn_with_a_little_calibration(rtn_w4):
    _, model, tok = api.quantize(MODEL, make_scheme(4, 64), method="awq", calib="shakespeare", nsamples=16,
                                 seqlen=256, progress=False, return_model=True)
    assert ppl(model, tok) < rtn_w4


def test_ternary_is_much_worse_than_4_bit(rtn_w4):
    _, model, tok = api.quantize(MODEL, make_scheme(2, 64), method="ternary", progress=False, return_model=True)
    assert ppl(model, tok, tokens=1024) > 3 * rtn_w4


@pytest.mark.slow
def test_gemma_3_270m_takes_awq_and_keeps_its_function():
    full, tok, _ = load_model("gemma-3-270m")
    fp = ppl(full, tok, tokens=2048)
    _, model, tok = api.quantize("gemma-3-270m", make_scheme(4, 128), method="awq", calib="shakespeare", nsamples=8,
                                 seqlen=256, progress=False, return_model=True)
    assert fp < ppl(model, tok, tokens=2048) < 1.5 * fp
