"""Long context on the real models: SmolLM2 (context 8192) and Gemma 3 270m (32768: sliding-window layers of 512
positions between global ones) past 4096 positions of real text, under each cache format."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.data.corpora import evaluation_text
from lowbit.runtime.llm import LLM

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~3 (SmolLM2) to 6 (Gemma) minutes a case, two busy cores
DEPTH, STEPS = 6000, 8


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4"])
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_decoding_at_depth_6000_still_predicts_real_text(model, fmt):
    llm = LLM(model, max_model_len=8192, lm_head="dense", kv_cache=fmt)
    tokens = llm.tokenizer(evaluation_text("austen").text).input_ids
    assert len(tokens) > DEPTH + STEPS
    ids = torch.tensor([tokens[: DEPTH + STEPS]])
    decoder = llm.decoder
    logits = decoder(ids[:, :DEPTH], 0)[0, -1]
    nll = []
    for i in range(DEPTH, DEPTH + STEPS):
        nll.append(float(F.cross_entropy(logits[None], ids[0, i : i + 1])))
        logits = decoder(ids[:, i : i + 1], i)[0, -1]  # the compiled step where it takes the format
    assert math.exp(sum(nll) / STEPS) < 60  # still reads Austen at depth 6000 (36.6, 34.9 over 512-token windows)
