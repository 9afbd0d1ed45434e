"""A GGUF's Q4_0 / Q8_0 linears on lowbit's kernels: the file's codes taken as they are, the rest named."""

import torch

from lowbit.formats.gguf.reader import gguf_model
from lowbit.formats.gguf.writer import write_gguf
from lowbit.models.architectures import architecture_of
from lowbit.quantized.modules import GGMLLinear, QuantLinear, replace_module
from lowbit.runtime.gguf_weights import adopt_blocks
from lowbit.schemes import ggml
from tests.conftest import make_model
from tests.formats.test_gguf import TOKENIZER


def test_the_runtime_takes_q4_0_and_q8_0_blocks_as_they_are_and_names_the_types_it_cannot(tmp_path):
    """A GGUF's Q4_0 / Q8_0 linears become lowbit's int4 / int8 g32 layers holding the file's codes and scales (q/k
    rows back in the model's order): exactly the weights written, and what transformers dequantized; a Q5_0 one
    stays dense, and the notice says so."""
    model = make_model(128, hidden=64, intermediate=96)
    kinds = {"down_proj": "Q8_0", "up_proj": "Q5_0"}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            kind = ggml.TYPES[kinds.get(name.rsplit(".", 1)[-1], "Q4_0")]
            replace_module(model, name, GGMLLinear(ggml.quantize(module.weight.detach(), kind)))
    path = tmp_path / "mixed.gguf"
    write_gguf(model, architecture_of(model), path, TOKENIZER, "mixed")
    loaded = gguf_model(path)
    adopted = adopt_blocks(loaded, path)
    assert adopted.kernels == {"Q4_0": 10, "Q8_0": 2} and adopted.dense == {"Q5_0": 2}
    assert "2 linears of mixed.gguf are in GGUF types lowbit's kernels do not read (Q5_0 ×2)" in adopted.notice(path)
    for name, mine in model.named_modules():
        if isinstance(mine, GGMLLinear):
            theirs = loaded.get_submodule(name)
            want = mine.quantized_weight().dequantize()
            if isinstance(theirs, QuantLinear):
                assert theirs.args.num_bits == (8 if name.endswith("down_proj") else 4)
                assert torch.equal(theirs.quantized_weight().dequantize(torch.float32), want)
            else:
                assert name.endswith("up_proj") and torch.equal(theirs.weight.detach(), want)
