"""A recipe: everything one quantization run does to a model, checked before any work.

``lowbit quantize`` and ``lowbit compress`` are two front-ends that build a recipe; the pipeline
(:func:`lowbit.pipeline.quantize.quantize_model`) is the one body that applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from lowbit.algorithms import Method, data_free_methods, get_method
from lowbit.algorithms.mixed_precision import SENSITIVITY_METRICS
from lowbit.errors import LowbitError
from lowbit.schemes.activations import check_activation_args
from lowbit.schemes.args import QuantizationArgs, QuantizationScheme, mode_scheme
from lowbit.schemes.kv_cache import format_of_scheme

# the precision of layers kept out of the primary scheme (too sensitive, or embeddings), as in NNCF
BACKUP = QuantizationArgs(num_bits=8, symmetric=True, strategy="channel", group_size=None, observer="minmax")
EXTRA_LAYERS = (None, "backup", "ranked")


@dataclass(frozen=True)
class Recipe:
    """What to quantize, onto which grid, by which method.

    ``ratio``: share of the ranked parameters on ``scheme``; the most sensitive rest (by
    ``sensitivity_metric``) gets ``backup``. ``embeddings``: the embedding table and an untied
    ``lm_head``: None keeps them in full precision, "backup" puts them at ``backup``, "ranked" ranks
    them with the decoder's linears (a tied head reads the embedding's quantized table).
    ``include_lm_head``: the head on ``scheme``, calibrated on the final norm's outputs (its tied
    embedding stays full precision). ``ignore``: module names or ``re:`` patterns left alone.
    ``scheme.input_activations``: the decoder linears' inputs quantized too (not the head's);
    ``smoothquant``: α (0–1) or "auto" (tuned per smoothing) of SmoothQuant before the rounding, for
    activation schemes, from calibration text. ``kv_cache_scheme`` (compressed-tensors' name): the KV cache's
    calibrated scheme (fp8 per-tensor static, :data:`lowbit.schemes.kv_cache.FP8_STATIC`), scales from the
    calibration text.
    ``preset``: the compress mode the scheme came from, for the record.
    """

    scheme: QuantizationScheme
    method: Method
    ratio: float = 1.0
    sensitivity_metric: Optional[str] = None
    embeddings: Optional[str] = None
    include_lm_head: bool = False
    ignore: tuple = ()
    backup: QuantizationArgs = BACKUP
    kv_cache_scheme: Optional[QuantizationArgs] = None
    preset: Optional[str] = None
    smoothquant: Optional[Union[float, str]] = None

    @property
    def needs_data(self) -> bool:
        """Calibration text is read: by the method, SmoothQuant, static activation or KV cache scales."""
        acts = self.scheme.input_activations
        return (self.method.needs_calibration or self.smoothquant is not None or (acts is not None and not acts.dynamic)
                or self.kv_cache_scheme is not None)

    def checked(self, has_data: bool) -> "Recipe":
        """This recipe with its defaults filled in (act-order dropped where the method has no column
        order, the sensitivity metric chosen), or a :class:`LowbitError` saying what is wrong."""
        method, weights = self.method, self.scheme.weights
        problem = method.unsuitable(weights)
        if problem:
            raise LowbitError(problem)
        if method.needs_calibration and not has_data:
            raise LowbitError(f"method {method.name} needs calibration text: pass --calib")
        acts = self.scheme.input_activations
        if acts is not None:
            check_activation_args(acts)
            if not acts.dynamic and not has_data:
                raise LowbitError("static activation scales are calibrated: pass --calib")
        if self.smoothquant is not None:
            check_smoothquant(self.smoothquant, acts)
            if method.transform is not None:
                raise LowbitError(f"SmoothQuant and {method.name} both rescale channels: choose rtn or gptq with it")
            if not has_data:
                raise LowbitError("SmoothQuant measures activations: pass --calib")
        if self.kv_cache_scheme is not None:
            format_of_scheme(self.kv_cache_scheme)
            if not has_data:
                raise LowbitError("the KV cache's static scales are calibrated: pass --calib")
        if self.embeddings not in EXTRA_LAYERS:
            raise LowbitError(f"embeddings must be one of {EXTRA_LAYERS}, got {self.embeddings!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise LowbitError(f"ratio must be between 0 and 1, got {self.ratio}")
        metric = self.sensitivity_metric
        if metric is not None and metric not in SENSITIVITY_METRICS:
            raise LowbitError(
                f"sensitivity metric {metric!r} is not supported; choose one of {', '.join(SENSITIVITY_METRICS)}"
            )
        if self.ratio < 1.0:
            if method.needs_calibration:
                raise LowbitError(f"mixed precision by ratio takes a data-free method; {method.name} needs data")
            metric = metric or ("fisher" if has_data else "weight_error")
            if metric == "hessian_input_activation" and not has_data:
                raise LowbitError("sensitivity metric 'hessian_input_activation' needs a dataset (calibration text)")
        else:
            metric = None
        scheme = self.scheme
        if weights.actorder and not method.uses_actorder:
            scheme = replace(scheme, weights=replace(weights, actorder=None))
        return replace(self, scheme=scheme, sensitivity_metric=metric)

    def describe(self) -> str:
        what = self.scheme.describe() if self.preset is None else f"{self.preset} g{self.scheme.weights.group_size}"
        if self.preset and self.scheme.weights.group_size is None:
            what = f"{self.preset} per-channel"
        return f"{what} ratio {self.ratio}" if self.ratio < 1.0 or self.preset else what

    def record(self) -> dict:
        """The recipe as the checkpoint's ``lowbit_recipe.json`` states it."""
        return {
            "method": self.method.name,
            "scheme": self.scheme.describe(),
            "mode": self.preset,
            "weights": self.scheme.weights.to_dict(),
            "input_activations": None if self.scheme.input_activations is None
            else self.scheme.input_activations.to_dict(),
            "smoothquant": self.smoothquant,
            "kv_cache_scheme": None if self.kv_cache_scheme is None else self.kv_cache_scheme.to_dict(),
            "ratio": self.ratio,
            "backup": self.backup.describe() if self.ratio < 1.0 or self.embeddings else None,
            "sensitivity_metric": self.sensitivity_metric,
            "embeddings": self.embeddings,
            "lm_head_quantized": self.include_lm_head,
            "ignored": list(self.ignore),
        }


def compress_recipe(
    mode: str = "int4_sym", group_size: Optional[int] = 128, ratio: float = 1.0, method: str = "rtn",
    sensitivity_metric: Optional[str] = None, all_layers: bool = False, ignore: tuple = (),
) -> Recipe:
    """``lowbit compress``'s recipe: a mode preset, a data-free method, int8 embeddings (ranked with
    the decoder's linears under ``all_layers``)."""
    if method.lower() not in data_free_methods():
        raise LowbitError(f"compress takes a data-free method ({', '.join(data_free_methods())}); got {method!r}")
    return Recipe(
        scheme=mode_scheme(mode, group_size or None), method=get_method(method), ratio=ratio,
        sensitivity_metric=sensitivity_metric, embeddings="ranked" if all_layers else "backup", ignore=tuple(ignore),
        preset=mode,
    )


def check_smoothquant(alpha, input_activations: Optional[QuantizationArgs]) -> None:
    """A one-line :class:`LowbitError` unless ``alpha`` is "auto" or a number in [0, 1] and activations are quantized."""
    if input_activations is None:
        raise LowbitError("SmoothQuant is for quantized activations: choose an activation scheme (e.g. --scheme W8A8)")
    if alpha == "auto":
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise LowbitError(f"SmoothQuant alpha is 'auto' or a number between 0 and 1, got {alpha!r}")
