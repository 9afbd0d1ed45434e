"""A GGUF file's own Q4_0 / Q8_0 codes on lowbit's kernels, instead of float32 weights to re-quantize.

Q4_0 and Q8_0 are d · q with a float16 d per 32 weights: lowbit's symmetric int4 / int8 grids in groups of 32,
code for code, so the runtime packs the file's codes and scales as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from gguf import GGUFReader

from lowbit.formats.gguf.blocks import exact_args, unpack_symmetric
from lowbit.formats.gguf.writer import Names
from lowbit.models.architectures import architecture_of, decoder_blocks
from lowbit.quantized.modules import QuantLinear, replace_module
from lowbit.schemes.ggml import TYPES
from lowbit.schemes.grid import QuantizedWeight

KERNEL_TYPES = ("Q4_0", "Q8_0")


@dataclass
class Adopted:
    """What :func:`adopt_blocks` did: linears now on their file codes, by type, and those left dense, by type."""

    kernels: Counter = field(default_factory=Counter)
    dense: Counter = field(default_factory=Counter)

    def notice(self, path: Path) -> Optional[str]:
        """The line saying which linears do not run on lowbit's kernels, if any do not."""
        quantized = Counter({k: n for k, n in self.dense.items() if k not in ("F32", "F16", "BF16")})
        if not quantized:
            return None
        kinds = ", ".join(f"{k} ×{n}" for k, n in quantized.most_common())
        return (f"lowbit: {sum(quantized.values())} linears of {path.name} are in GGUF types lowbit's kernels do not"
                f" read ({kinds}); they run dequantized in float32, slower than its {'/'.join(KERNEL_TYPES)} kernels")


def adopt_blocks(model: nn.Module, path: Path) -> Adopted:
    """Swap each decoder Linear of ``model`` (loaded from ``path`` and dequantized by transformers) whose tensor is
    Q4_0 or Q8_0 for a :class:`QuantLinear` holding the file's own codes and float16 scales (q/k rows put back in
    the model's order), so the runtime packs them instead of re-quantizing float32. Each swap is checked: the
    codes times the scales must equal what transformers dequantized, bit for bit, or the layer stays dense."""
    arch = architecture_of(model)
    if arch.gguf is None:
        return Adopted()
    names = Names(model, arch)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    blocks_path, _ = decoder_blocks(model)
    done = Adopted()
    for name, linear in list(model.named_modules()):
        if not (isinstance(linear, nn.Linear) and name.startswith(blocks_path + ".")):
            continue
        t = tensors.get(names.gguf_name(name + ".weight"))
        kind = None if t is None else t.tensor_type.name
        if kind not in KERNEL_TYPES:
            done.dense[kind or "missing"] += 1
            continue
        q, d = unpack_symmetric(t.data, TYPES[kind])
        order = names.row_order(name, q.shape[0])
        if order is not None:
            back = torch.argsort(order)
            q, d = q[back], d[back]
        qw = QuantizedWeight(q, d.float(), None, exact_args(TYPES[kind]))
        if not torch.equal(qw.dequantize(torch.float32), linear.weight.detach().float()):
            done.dense[f"{kind} (did not read back exactly)"] += 1
            continue
        replace_module(model, name, QuantLinear.from_quantized(qw, linear.bias))
        done.kernels[kind] += 1
    return done
