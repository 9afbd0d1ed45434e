"""Quantization schemes (what grid) and the pure quantize/dequantize functions onto it."""

from lowbit.schemes.args import (
    MODES,
    PRESETS,
    W2A16,
    W2A16_SYM,
    W3A16,
    W3A16_ASYM,
    W4A16,
    W4A16_ASYM,
    W8A16,
    QuantizationArgs,
    QuantizationScheme,
    make_scheme,
    mode_scheme,
)
from lowbit.schemes.grid import QuantizedWeight, dequantize, fit_qparams, quantize, quantize_with

__all__ = [
    "MODES",
    "PRESETS",
    "W2A16",
    "W2A16_SYM",
    "W3A16",
    "W3A16_ASYM",
    "W4A16",
    "W4A16_ASYM",
    "W8A16",
    "QuantizationArgs",
    "QuantizationScheme",
    "QuantizedWeight",
    "dequantize",
    "fit_qparams",
    "make_scheme",
    "mode_scheme",
    "quantize",
    "quantize_with",
]
