"""Linear layers of the runtime, each computing from its weights as stored, the kernel chosen by shape.

* :class:`PackedLinear`: every integer grid lowbit saves that its kernels take (2/3/4/8 bits, sym or
  asym, groups of 32·k or per channel): the weights stay packed (:mod:`lowbit.runtime.layout`);
  up to ``DECODE_ROWS`` input rows run lowbit's GEMV for this CPU's ISA level (``csrc/qgemv.cpp``),
  more rows dequantize the layer once per call and run a dense GEMM in the compute dtype.
* :class:`DenseLinear`: full-precision weights in the compute dtype; also the stand-in, announced,
  for a quantized layer the kernels cannot take (code books, odd group sizes, no compiler).
* :class:`Fp8Linear`: float8 e4m3 weights, upcast per call (no FP8 arithmetic on CPU: FP8 runs for
  accuracy, and says so).
* :class:`Int8Linear`: W8A8 (int8 per-channel weights, int8 inputs per token, per call or with a
  calibrated scale): the input is quantized on the fly and lowbit's int8 × int8 GEMM
  (``csrc/int8_gemm.cpp``) sums in int32, for decode and prefill alike.
* :class:`InputQuantLinear`: any other activation scheme (W4A8, FP8 inputs) around the weight-only
  layer: the input is fake-quantized exactly as evaluation does, then the weight kernel runs (announced).

The compute dtype (:func:`lowbit.runtime.cpu.compute_dtype`) is bfloat16 only where the CPU has bf16
arithmetic; elsewhere bf16 GEMMs are several times slower than float32.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.runtime.cpu import compute_dtype, selected_isa
from lowbit.runtime.layout import DECODE_ROWS, PackedWeight, dequantize_packed, pack, why_not_packable
from lowbit.runtime.native import build_failure, disabled, native_module
from lowbit.schemes.activations import fake_quantize_activation
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.grid import QuantizedWeight


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FastLinear(nn.Module):
    """A runtime Linear: says which kernel computes it and, for a quantized layer off its fast path, why."""

    in_features: int
    out_features: int
    kernel: str = ""  # what computes this layer, in words
    fallback: Optional[str] = None  # why a quantized layer is not on its fast path (None: it is)

    def __init__(self, bias: Optional[torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PackedLinear(FastLinear):
    """A quantized layer in lowbit's packed layout: ``packed`` uint8, ``scale``/``offset`` float16."""

    def __init__(self, qw: QuantizedWeight, native, bias: Optional[torch.Tensor] = None, dtype=torch.float32):
        super().__init__(bias, dtype)
        self.native = native
        self.out_features, self.in_features = qw.shape
        pw = pack(qw)
        self.bits, self.group_size = pw.bits, pw.group_size
        self.register_buffer("packed", pw.packed)
        self.register_buffer("scale", pw.scale)
        self.register_buffer("offset", pw.offset)
        self.kernel = f"lowbit {self.bits}-bit GEMV ({native.ISA}), prefill: {_dtype_name(dtype)} GEMM"

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.native.dequantize(self.packed, self.scale, self.offset, self.bits, self.group_size,
                                      self.in_features, dtype or self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight in float32 (a tied head lends them to the embedding)."""
        flat = ids.reshape(-1)
        pw = PackedWeight(self.packed[flat], self.scale[flat], None if self.offset is None else self.offset[flat],
                          self.bits, self.group_size, (flat.numel(), self.in_features))
        return dequantize_packed(pw).reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= DECODE_ROWS:
            y = self.native.gemv(x2.float().contiguous(), self.packed, self.scale, self.offset, self.bits,
                                 self.group_size)
        else:
            y = F.linear(x2.to(self.dtype), self.dense_weight())
        return self._finish(y, x)


class DenseLinear(FastLinear):
    """A full-precision Linear held in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, dtype=torch.float32,
                 fallback: Optional[str] = None):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.fallback = fallback
        self.kernel = f"dense {_dtype_name(dtype)}" + (" (dequantized at load)" if fallback else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x.reshape(-1, self.in_features).to(self.dtype), self.weight), x)


class Fp8Linear(FastLinear):
    """float8 e4m3 weights [N, K] with a float32 scale per row (all equal for a per-tensor scale), upcast on every
    call: CPUs have no FP8 arithmetic, so FP8 here is for accuracy checks (what an FP8 GPU would compute), not speed."""

    fallback = "FP8 weights: no FP8 arithmetic on CPU, upcast on every call (for accuracy, not speed)"

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.float32):
        super().__init__(bias, dtype)
        self.out_features, self.in_features = qw.shape
        self.register_buffer("weight", qw.q.to(torch.float8_e4m3fn).contiguous())
        self.register_buffer("scale", qw.scale.float().reshape(-1, 1).to(dtype))
        self.kernel = f"fp8 upcast to {_dtype_name(dtype)} per call"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(self.dtype) * self.scale
        return self._finish(F.linear(x.reshape(-1, self.in_features).to(self.dtype), w), x)


# How a layer's input is quantized: the activation arguments and, when static, the calibrated scale.
InputQuantization = tuple[QuantizationArgs, Optional[torch.Tensor]]


class Int8Linear(FastLinear):
    """W8A8: int8 weights [N, K] with a float32 scale per row, in ``int8_gemm``'s panels; the input quantized
    to int8 in the kernel (per token, per call, or with the static scale) exactly as evaluation does."""

    def __init__(self, qw: QuantizedWeight, native, inputs: InputQuantization, bias=None, dtype=torch.float32):
        super().__init__(bias, dtype)
        self.native = native
        self.out_features, self.in_features = qw.shape
        self.input_args, scale = inputs
        self.per_tensor = self.input_args.strategy == "tensor"
        self.static_scale = 0.0 if scale is None else float(scale.float().reshape(()))
        self.register_buffer("panels", native.int8_pack(qw.q.to(torch.int8).contiguous()))
        self.register_buffer("weight_scale", qw.scale.float().reshape(-1).contiguous())
        self.kernel = f"lowbit int8 x int8 GEMM ({native.ISA}), inputs {self.input_args.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = self.native.int8_gemm(x2, self.panels, self.weight_scale, self.in_features, self.per_tensor,
                                  self.static_scale)
        return self._finish(y, x)


class InputQuantLinear(FastLinear):
    """``inner`` on x̂: the input fake-quantized as the checkpoint's ``input_activations`` say (static:
    ``input_scale``), for schemes the int8 kernel does not take; ``fallback`` says why."""

    def __init__(self, inner: FastLinear, inputs: InputQuantization, reason: str):
        super().__init__(None, inner.dtype)
        self.inner, (self.input_args, input_scale) = inner, inputs
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().reshape(1))
        self.kernel = f"{self.input_args.describe()} inputs in PyTorch, then {inner.kernel}"
        self.fallback = f"{reason}: inputs quantized in PyTorch, then the weight-only kernel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(fake_quantize_activation(x, self.input_args, self.input_scale))


def input_quantization(modules: list[nn.Module]) -> Optional[InputQuantization]:
    """The input quantization of ``modules`` (projections of one input, fused), None if they have none;
    static scales are shared as the largest (as vLLM does; lowbit's own checkpoints calibrate one scale per
    shared input, so theirs agree)."""
    args = {getattr(m, "input_args", None) for m in modules}
    if args == {None}:
        return None
    if len(args) > 1:
        raise LowbitError("projections that share an input have different activation schemes")
    scales = [m.input_scale for m in modules if getattr(m, "input_scale", None) is not None]
    return args.pop(), (torch.stack([s.float().reshape(()) for s in scales]).max() if scales else None)


def why_not_int8(qw: Optional[QuantizedWeight], args: QuantizationArgs) -> Optional[str]:
    """None when the int8 × int8 kernel computes this layer with these inputs, else the reason in a few words."""
    if args.is_fp8:
        return "FP8 inputs (no FP8 arithmetic on CPU: FP8 runs for accuracy, not speed)"
    w = None if qw is None else qw.args
    if w is None or not (w.type == "int" and w.num_bits == 8 and w.symmetric and w.strategy == "channel"):
        return f"{'full-precision' if w is None else w.describe()} weights (the int8 kernel takes int8 per-channel)"
    return unavailable_reason()


def with_inputs(layer: FastLinear, inputs: Optional[InputQuantization], reason: str) -> nn.Module:
    """``layer`` behind its input quantization (fake-quantized in PyTorch), if it has one."""
    return layer if inputs is None else InputQuantLinear(layer, inputs, reason)


def unavailable_reason() -> Optional[str]:
    """Why lowbit's kernels cannot run here (None when they can)."""
    if disabled():
        return "LOWBIT_NATIVE=0"
    if native_module() is None:
        return build_failure(selected_isa()) or "lowbit's kernels could not be built"
    return None


def fast_linear(qw: Optional[QuantizedWeight], weight=None, bias=None, device="cpu", dtype=None,
                inputs: Optional[InputQuantization] = None) -> nn.Module:
    """The fastest module that computes this layer as stored (with its input quantization), on this device and CPU."""
    dtype = dtype or compute_dtype()
    if inputs is not None:
        reason = why_not_int8(qw, inputs[0]) if device == "cpu" else f"no int8 kernel on {device}"
        if reason is None:
            return Int8Linear(qw, native_module(), inputs, bias, dtype)
        return with_inputs(fast_linear(qw, weight, bias, device, dtype), inputs, reason)
    if qw is None:
        return DenseLinear(weight, bias, dtype)
    if qw.args.is_fp8:
        return Fp8Linear(qw, bias, dtype)
    reason = why_not_packable(qw) if device == "cpu" else f"no packed kernel on {device}"
    if reason is None:
        reason = unavailable_reason()
    if reason is None:
        return PackedLinear(qw, native_module(), bias, dtype)
    return DenseLinear(qw.dequantize(torch.float32), bias, dtype, fallback=reason)


def kernels_by_kind(named: Iterable[tuple[str, nn.Module]]) -> dict[str, str]:
    """Kind of projection (the last part of its name) → the kernels its layers run."""
    kinds: dict[str, set[str]] = {}
    for name, m in named:
        kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(m.kernel)
    return {kind: " + ".join(sorted(k)) for kind, k in kinds.items()}


def fallback_notice(named: Iterable[tuple[str, nn.Module]]) -> Optional[str]:
    """One line naming the layers off their fast path, why, and what it costs (None if there are none)."""
    slow = [(name, m) for name, m in named if getattr(m, "fallback", None)]
    if not slow:
        return None
    reasons = sorted({m.fallback for _, m in slow})
    names = ", ".join(name for name, _ in slow[:3]) + (f", … ({len(slow)} in all)" if len(slow) > 3 else "")
    dense = [m for _, m in slow if isinstance(m, DenseLinear)]
    cost = ""
    if dense:
        extra = sum(m.weight.numel() * m.weight.element_size() for m in dense) / 1e6
        cost = (f"; held dequantized in {_dtype_name(dense[0].dtype)} ({extra:.0f} MB), so decode reads"
                f" {dense[0].weight.element_size() * 2}x the bytes of a 4-bit layer")
    return f"lowbit: {names} off the packed kernels ({'; '.join(reasons)}){cost}"
