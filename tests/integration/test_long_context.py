"""Long context on the real models: SmolLM2 (context 8192) and Gemma 3 270m (32768: sliding-window layers of 512
positions between global ones) past 4096 positions of real text, under each cache format, against transformers'
own forward pass over the same tokens."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.data.corpora import evaluation_text
from lowbit.models.embedded import embedded_folder
from lowbit.runtime.llm import LLM

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2 minutes a case and 2 to 5 for each reference
DEPTH, STEPS = 6000, 16
# Perplexity of the STEPS tokens after DEPTH, as a ratio to transformers' float32: the bfloat16 cache rounds what
# transformers keeps in float32 (seen: 0.997 SmolLM2, 1.003 Gemma); the quantized caches seen: at most 1.056
# (fp8 on SmolLM2). A broken long context (positions, sliding window, chunk merging) costs far more.
WITHIN = {"bf16": 0.01, "int8": 0.10, "fp8": 0.10, "int4": 0.10}


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma-3-270m"])
def reference(request):
    """(model, token ids, transformers' negative log-likelihood of each of the STEPS tokens after DEPTH)."""
    folder = embedded_folder(request.param)
    tokens = AutoTokenizer.from_pretrained(folder)(evaluation_text("austen").text).input_ids
    assert len(tokens) > DEPTH + STEPS
    ids = torch.tensor([tokens[: DEPTH + STEPS]])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0, DEPTH - 1 : DEPTH + STEPS - 1]
    return request.param, ids, F.cross_entropy(logits, ids[0, DEPTH:], reduction="sum").item()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4"])
def test_decoding_at_depth_6000_matches_transformers(reference, fmt):
    model, ids, reference_nll = reference
    decoder = LLM(model, max_model_len=8192, lm_head="dense", kv_cache=fmt).decoder
    logits = decoder(ids[:, :DEPTH], 0)[0, -1]
    nll = 0.0
    for i in range(DEPTH, DEPTH + STEPS):
        nll += float(F.cross_entropy(logits[None], ids[0, i : i + 1]))
        logits = decoder(ids[:, i : i + 1], i)[0, -1]  # the compiled step where it takes the format
    ratio = math.exp((nll - reference_nll) / STEPS)
    assert abs(math.log(ratio)) < WITHIN[fmt], f"{model} {fmt} at depth {DEPTH}: perplexity ratio {ratio:.4f}"
