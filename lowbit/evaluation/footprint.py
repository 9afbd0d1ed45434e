"""Size on disk, bits per weight and peak resident memory."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import psutil
import torch.nn as nn

from lowbit.quantized.modules import QuantEmbedding, QuantLinear


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _decoder_linears(model: nn.Module, kind: type) -> list[nn.Module]:
    """Modules of ``kind`` other than the output projection (which may be the embedding table, tied)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, kind) and m is not head]


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight of the decoder Linears: quantized ones with their scales, the rest at their dtype."""
    q = effective_bits(model)
    quantized = sum(m.weight_q.numel() for m in _decoder_linears(model, QuantLinear))
    dense = [m.weight for m in _decoder_linears(model, nn.Linear)]
    dense_bits = sum(w.numel() * w.element_size() * 8 for w in dense)
    dense_n = sum(w.numel() for w in dense)
    total_n = quantized + dense_n
    total_bits = (q * quantized if quantized else 0) + dense_bits
    return total_bits / total_n if total_n else float("nan")


def parameter_count(model: nn.Module) -> int:
    """Weights of the model, counting each quantized weight once (as a parameter of the original)."""
    tables = {m.weight_q.data_ptr(): m.weight_q.numel() for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    return sum(p.numel() for p in model.parameters()) + sum(tables.values())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (since :func:`reset_peak_rss`, where that worked)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Start the peak RSS afresh from the current RSS (Linux: ``/proc/self/clear_refs`` 5); False where
    the system cannot, so that the caller can say its later peak includes what came before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def effective_bits(model: nn.Module) -> float:
    """Average stored bits per quantized weight (codes, scales, zero points) over the decoder's QuantLinears."""
    bits = numel = 0
    for m in _decoder_linears(model, QuantLinear):
        n = m.weight_q.numel()
        numel += n
        bits += n * m.args.num_bits + m.weight_scale.numel() * m.weight_scale.element_size() * 8
        zp = m.weight_zero_point
        if zp is not None:
            bits += zp.numel() * (zp.element_size() * 8 if zp.is_floating_point() else m.args.num_bits)
    return bits / numel if numel else math.nan


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss
