"""Algorithms that choose where weights land on a scheme's grid (RTN, HQQ, GPTQ), behind one registry."""

from dataclasses import dataclass
from typing import Callable

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Method:
    """A weight quantization algorithm: ``quantize(W, H, args) -> (QuantizedWeight, loss)``."""

    name: str
    quantize: Callable
    needs_calibration: bool
    uses_actorder: bool
    summary: str


METHODS = {
    "rtn": Method("rtn", rtn_quantize, False, False, "round-to-nearest, no data, seconds"),
    "hqq": Method("hqq", hqq_quantize, False, False, "HQQ: scale and zero point fitted without data (half-quadratic)"),
    "gptq": Method("gptq", gptq_quantize, True, True, "GPTQ: Hessian-aware rounding from calibration text"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
