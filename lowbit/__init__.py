"""lowbit: low-bit quantization for Hugging Face causal LMs — compress, save, measure, run."""

__version__ = "0.1.0"

from lowbit.runtime.cpu import apply_torch_switches  # noqa: E402  (before torch's first use)

apply_torch_switches()

from lowbit.api import compress, evaluate, quantize  # noqa: E402
from lowbit.pipeline.quantize import compress_weights  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.runtime.llm import LLM, RequestOutput  # noqa: E402
from lowbit.runtime.sampling import SamplingParams  # noqa: E402
from lowbit.schemes import (  # noqa: E402
    W2A16,
    W2A16_SYM,
    W3A16,
    W3A16_ASYM,
    W4A16,
    W4A16_ASYM,
    W8A16,
    W4A8,
    W8A8,
    W8A8_STATIC,
    FP8,
    FP8_DYNAMIC,
    QuantizationArgs,
    QuantizationScheme,
)

__all__ = [
    "LLM",
    "LowbitError",
    "RequestOutput",
    "SamplingParams",
    "QuantizationArgs",
    "QuantizationScheme",
    "W2A16",
    "W2A16_SYM",
    "W3A16",
    "W3A16_ASYM",
    "W4A16",
    "W4A16_ASYM",
    "W8A16",
    "W4A8",
    "W8A8",
    "W8A8_STATIC",
    "FP8",
    "FP8_DYNAMIC",
    "compress",
    "compress_weights",
    "evaluate",
    "quantize",
]
