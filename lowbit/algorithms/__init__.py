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


@dataclass(frozen=True)
class Method:
    """A weight quantization algorithm: ``quantize(W, H, args) -> (QuantizedWeight, loss)``, optionally
    preceded per block by a full-precision ``transform(block, calls, args, smoothings, norm_offset)``."""

    name: str
    quantize: Callable
    needs_calibration: bool
    uses_actorder: bool
    summary: str
    transform: Optional[Callable] = None
    uses_hessian: bool = False


METHODS = {
    "rtn": Method("rtn", rtn_quantize, False, False, "round-to-nearest, no data, seconds"),
    "hqq": Method("hqq", hqq_quantize, False, False, "HQQ: scale and zero point fitted without data (half-quadratic)"),
    "ternary": Method("ternary", ternary_quantize, False, False, "ternary {-1,0,+1}·absmean (BitNet b1.58 rule), 2-bit storage"),
    "gptq": Method("gptq", gptq_quantize, True, True, "GPTQ: Hessian-aware rounding from calibration text",
                   uses_hessian=True),
    "awq": Method("awq", awq_round, True, False, "AWQ: activation-aware scales and clipping, then RTN",
                  awq_transform_block),
    "awq+gptq": Method("awq+gptq", gptq_quantize, True, True, "AWQ scales, then GPTQ rounding",
                       partial(awq_transform_block, clip=False, rounding=gptq_rounding, n_grid=10),
                       uses_hessian=True),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
