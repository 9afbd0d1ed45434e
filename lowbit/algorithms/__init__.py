"""Algorithms that choose where weights land on a scheme's grid (RTN, HQQ, GPTQ), behind one registry."""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from lowbit.algorithms.awq import awq_round, awq_transform_block, gptq_rounding
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.ternary import ternary_quantize
from lowbit.errors import LowbitError
from lowbit.schemes.args import QuantizationArgs


@dataclass(frozen=True, kw_only=True)
class Method:
    """A weight quantization algorithm: ``quantize(W, H, args) -> (QuantizedWeight, loss)``, optionally
    preceded per block by a full-precision ``transform(block, calls, args, smoothings, norm_offset)``.

    ``asymmetric``: the Hessians come with the full-precision model's inputs beside the quantized model's, and each
    weight is first moved to :func:`~lowbit.algorithms.gptq.asymmetric_target` (GPTAQ).
    ``unsuitable(args)`` says why a scheme does not suit the method (None: it does); ``own_grid``: the
    method keeps its own grid whatever the bit width asked for, so layers kept at 8 bits use RTN; ``ggml``: it
    also rounds onto llama.cpp's grids (:class:`lowbit.schemes.ggml.GGMLType`), for GGUF files.
    """

    name: str
    quantize: Callable
    summary: str
    needs_calibration: bool = False
    uses_actorder: bool = False
    uses_hessian: bool = False
    asymmetric: bool = False
    transform: Optional[Callable] = None
    unsuitable: Callable[[QuantizationArgs], Optional[str]] = lambda args: None
    own_grid: bool = False
    ggml: bool = False


def _ternary_unsuitable(args: QuantizationArgs) -> Optional[str]:
    if args.num_bits == 2 and args.symmetric and args.type == "int":
        return None
    return ("ternary weights are stored as symmetric 2-bit codes: pass --bits 2 without --asym"
            " (compress: --mode int2_sym)")


METHODS = {
    m.name: m
    for m in (
        Method(name="rtn", quantize=rtn_quantize, summary="round to nearest, no data, seconds", ggml=True),
        Method(name="hqq", quantize=hqq_quantize, summary="HQQ: scale and zero point fitted without data"),
        Method(name="ternary", quantize=ternary_quantize, summary="{-1,0,+1}·absmean (BitNet b1.58), no data",
               unsuitable=_ternary_unsuitable, own_grid=True),
        Method(name="gptq", quantize=gptq_quantize, summary="Hessian-aware rounding from calibration text",
               needs_calibration=True, uses_actorder=True, uses_hessian=True, ggml=True),
        Method(name="gptaq", quantize=gptq_quantize,
               summary="GPTQ rounding for the full-precision model's outputs (asymmetric calibration)",
               needs_calibration=True, uses_actorder=True, uses_hessian=True, asymmetric=True, ggml=True),
        Method(name="awq", quantize=awq_round, summary="activation-aware scales and clipping, then RTN",
               needs_calibration=True, transform=awq_transform_block, ggml=True),
        Method(name="awq+gptq", quantize=gptq_quantize, summary="AWQ's scales, then GPTQ's rounding",
               needs_calibration=True, uses_actorder=True, uses_hessian=True, ggml=True,
               transform=partial(awq_transform_block, clip=False, rounding=gptq_rounding, n_grid=10)),
    )
}


def data_free_methods() -> list[str]:
    return [name for name, m in METHODS.items() if not m.needs_calibration]


def methods_help(data_free: bool = False) -> str:
    """The method list for ``--help``, from the registry."""
    chosen = [m for m in METHODS.values() if not (data_free and m.needs_calibration)]
    return "; ".join(f"{m.name}: {m.summary}" for m in chosen)


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
