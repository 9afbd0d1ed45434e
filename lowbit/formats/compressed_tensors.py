"""The compressed-tensors checkpoint layout: save lowbit's quantized models and load them back.

On disk (per quantized Linear ``name``):
``name.weight_packed`` int32 [out, ⌈in·b/32⌉] (pack-quantized, b ≤ 4), ``name.weight`` int8
[out, in] (int-quantized, b = 8) or float8_e4m3fn (float-quantized, FP8); ``name.weight_scale``
[out, groups] ([1] for a per-tensor scale); ``name.input_scale`` [1] for static activation scales;
for asymmetric grids
``name.weight_zero_point`` (packed along dim 0 when pack-quantized; HQQ's fitted zero points are
floats, stored unpacked with ``zp_dtype`` in the config group); ``name.weight_shape``.
config.json carries ``quantization_config`` with one config group per distinct scheme. A calibrated KV cache
is ``kv_cache_scheme`` (fp8 per-tensor static) with each attention module's ``k_scale`` and ``v_scale`` [1].

lowbit extension: NF4 and FP4 code-book layers (``type`` "nf" / "float") are stored exactly like
4-bit pack-quantized ones (the packed value is the code, see :mod:`lowbit.schemes.codebooks`) in a
config group whose format is ``lowbit-codebook``. compressed-tensors has no such format, so a
checkpoint with such layers loads in lowbit only.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_int32, unpack_int32
from lowbit.quantized.modules import QuantEmbedding, QuantLinear, replace_module

QUANTIZED = (QuantLinear, QuantEmbedding)
from lowbit.schemes.activations import check_activation_args
from lowbit.schemes.args import QuantizationArgs
from lowbit.schemes.kv_cache import FP8_STATIC, SCALE_NAMES, format_of_scheme

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "lowbit_recipe.json"


CODEBOOK_FORMAT = "lowbit-codebook"


def _format(args: QuantizationArgs) -> str:
    if args.is_codebook:
        return CODEBOOK_FORMAT
    if args.is_fp8:
        return "float-quantized"
    return "int-quantized" if args.num_bits == 8 else "pack-quantized"


def _args_dict(args: QuantizationArgs) -> dict:
    return {
        "num_bits": args.num_bits,
        "type": args.type,
        "symmetric": args.symmetric,
        "strategy": args.strategy,
        "group_size": args.group_size,
        "actorder": args.actorder,
        "dynamic": args.dynamic,
        "observer": args.observer,
        "zp_dtype": f"torch.{args.zp_dtype}" if args.zp_dtype else None,
        "scale_dtype": f"torch.{args.scale_dtype}" if args.scale_dtype else None,
        "block_structure": None,
        "observer_kwargs": {},
    }


def _args_from_dict(d: dict) -> QuantizationArgs:
    try:
        return QuantizationArgs(
            num_bits=int(d["num_bits"]),
            type=d.get("type", "int"),
            symmetric=bool(d.get("symmetric", True)),
            strategy=d.get("strategy") or ("group" if d.get("group_size") else "channel"),
            group_size=d.get("group_size"),
            actorder=d.get("actorder"),
            dynamic=bool(d.get("dynamic", False)),
            zp_dtype=(d.get("zp_dtype") or "").removeprefix("torch.") or None,
            scale_dtype=(d.get("scale_dtype") or "").removeprefix("torch.") or None,
        )
    except KeyError as exc:
        raise LowbitError(f"quantization_config lacks {exc}") from None


_BLOCK_INDEX = re.compile(r"^.*?\.\d+\.")


def _schemes(layer: nn.Module) -> tuple[QuantizationArgs, Optional[QuantizationArgs]]:
    """(weights, input activations) of a quantized module."""
    return layer.args, getattr(layer, "input_args", None)


def config_groups(layers: dict[str, QuantLinear]) -> dict:
    """One config group per distinct (weights, input activations) scheme; targets are ``re:`` patterns on
    the name inside a block (e.g. ``re:.*self_attn\\.q_proj$``) when every block agrees, else exact names."""
    by_suffix: dict[str, set] = defaultdict(set)
    for name, layer in layers.items():
        by_suffix[_BLOCK_INDEX.sub("", name)].add(_schemes(layer))
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        suffix = _BLOCK_INDEX.sub("", name)
        if len(by_suffix[suffix]) == 1 and suffix != name:
            target = "re:.*" + re.escape(suffix) + "$"
        else:
            target = name
        if target not in groups[_schemes(layer)]:
            groups[_schemes(layer)].append(target)
    return {
        f"group_{i}": {
            "targets": targets,
            "weights": _args_dict(args),
            "input_activations": None if inputs is None else _input_args_dict(inputs),
            "output_activations": None,
            "format": _format(args),
        }
        for i, ((args, inputs), targets) in enumerate(groups.items())
    }


def _input_args_dict(args: QuantizationArgs) -> dict:
    """An activation scheme as compressed-tensors states it (no observer for dynamic scales)."""
    d = _args_dict(args)
    d.update(group_size=None, actorder=None, observer=None if args.dynamic else "minmax")
    return d


def _quantized_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(quantized modules by name, each stored once; 8-bit tied heads that read another module's codes).

    An 8-bit tied head is a target of its embedding's group, with its own copy of the scales: the
    codes stay one tensor (``weight``, tied by transformers), but transformers decompresses the
    embedding into a new tensor, which unties the head, so the head must be decompressed too. A
    4-bit table is ``weight_packed``, which transformers does not tie: lowbit alone loads those.
    """
    layers: dict[str, nn.Module] = {}
    tied: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            if module.weight_q.data_ptr() not in seen:
                layers[name] = module
            elif module.args.num_bits == 8:
                tied[name] = module
            seen.add(module.weight_q.data_ptr())
    return layers, tied


def quantization_config(model: nn.Module) -> dict:
    layers, tied = _quantized_modules(model)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    formats = {_format(m.args) for m in layers.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups({**layers, **tied}),
        "ignore": ignore,
        "kv_cache_scheme": _input_args_dict(FP8_STATIC) if _has_kv_scales(model) else None,
        "global_compression_ratio": None,
    }


def _has_kv_scales(model: nn.Module) -> bool:
    return any(getattr(m, SCALE_NAMES[0], None) is not None for m in model.modules())


def _attach_kv_scales(model: nn.Module, qc: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Give each attention module named by a ``k_scale`` / ``v_scale`` tensor its buffers (filled by the load), as
    the ``kv_cache_scheme`` says; a scheme lowbit does not run, or one without its scales, is refused."""
    if qc.get("kv_cache_scheme") is None:
        return
    format_of_scheme(_args_from_dict(qc["kv_cache_scheme"]))
    owners = {name.rsplit(".", 1)[0] for name in tensors if name.rsplit(".", 1)[-1] in SCALE_NAMES}
    if not owners:
        raise LowbitError(f"{folder} has a kv_cache_scheme but no k_scale / v_scale tensors")
    for owner in owners:
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise LowbitError(f"{folder} holds KV cache scales for {owner}, which the model does not have") from None
        for name in SCALE_NAMES:
            module.register_buffer(name, torch.empty(1, device="meta"))


def layer_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized Linear."""
    args = layer.args
    scale = layer.weight_scale[:1, :1].reshape(1) if args.strategy == "tensor" else layer.weight_scale
    out: dict[str, torch.Tensor] = {f"{name}.weight_scale": scale.contiguous()}
    if args.num_bits == 8:
        out[f"{name}.weight"] = layer.weight_q.contiguous()
        if layer.weight_zero_point is not None:
            out[f"{name}.weight_zero_point"] = layer.weight_zero_point.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_int32(layer.weight_q, args.num_bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(layer.weight_q.shape), dtype=torch.int64)
        if layer.weight_zero_point is not None and args.zp_dtype:
            out[f"{name}.weight_zero_point"] = layer.weight_zero_point.contiguous()  # fitted floats: not packed
        elif layer.weight_zero_point is not None:
            out[f"{name}.weight_zero_point"] = pack_int32(layer.weight_zero_point, args.num_bits, dim=0)
    if getattr(layer, "bias", None) is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    if getattr(layer, "input_scale", None) is not None:
        out[f"{name}.input_scale"] = layer.input_scale.detach().contiguous()
    return out


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save: quantized layers in the compressed layout, the rest as they are."""
    tensors: dict[str, torch.Tensor] = {}
    layers, tied = _quantized_modules(model)
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    for name, layer in tied.items():  # the codes are the embedding's; the scales are small
        own = {k: v.clone() for k, v in layer_tensors(name, layer).items() if "weight_scale" in k or "zero_point" in k}
        tensors.update(own)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    seen: dict[int, str] = {}
    for name, p in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:  # written by layer_tensors (a tied head: with the embedding)
            continue
        if p.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[p.data_ptr()] = name
        tensors[name] = p.detach().contiguous()
    return tensors


def save_quantized(model: nn.Module, tokenizer, folder: Path, record: dict) -> None:
    """Write config.json, model.safetensors, tokenizer files and the recipe into ``folder``."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    save_file(checkpoint_tensors(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2))


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def load_quantized(folder: Path, dtype: torch.dtype = torch.float32):
    """:func:`quantized_model` and its tokenizer."""
    from transformers import AutoTokenizer

    return quantized_model(folder, dtype), AutoTokenizer.from_pretrained(folder)


def _input_args_from(group: dict) -> Optional[QuantizationArgs]:
    d = group.get("input_activations")
    return None if d is None else check_activation_args(_args_from_dict(d))


def quantized_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model whose quantized Linears are :class:`QuantLinear` (dequantize on the fly)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ignore = set(qc.get("ignore") or [])
    groups = [(g["targets"], _args_from_dict(g["weights"]), _input_args_from(g)) for g in qc["config_groups"].values()]
    tensors = _read_tensors(folder)
    _attach_kv_scales(model, qc, tensors, folder)
    state: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)) or name in ignore:
            continue
        args, input_args = next(((a, i) for targets, a, i in groups if any(_matches(name, module, t) for t in targets)),
                                (None, None))
        if args is None:
            continue
        shape = tuple(module.weight.shape)
        if f"{name}.weight" not in tensors and f"{name}.weight_packed" not in tensors and _is_tied_head(model, module):
            tensors.pop(f"{name}.weight_scale", None)  # the head reads the embedding's table (tied below)
            tensors.pop(f"{name}.weight_zero_point", None)
            continue
        if args.num_bits == 8:
            q = tensors.pop(f"{name}.weight")
        else:
            q = unpack_int32(tensors.pop(f"{name}.weight_packed"), args.num_bits, shape)
            tensors.pop(f"{name}.weight_shape", None)
        if isinstance(module, nn.Embedding):
            layer = QuantEmbedding(*shape, args, dtype, device="meta", embed_scale=getattr(module, "embed_scale", None))
        else:
            layer = QuantLinear(*shape[::-1], args, module.bias is not None, dtype, device="meta", input_args=input_args)
            if layer.input_scale is not None:
                state[f"{name}.input_scale"] = tensors.pop(f"{name}.input_scale").to(dtype).reshape(1)
        state[f"{name}.weight_q"] = q
        scale = tensors.pop(f"{name}.weight_scale").to(dtype)
        state[f"{name}.weight_scale"] = scale.reshape(1, 1).expand(shape[0], 1).clone() if args.strategy == "tensor" else scale
        zp = tensors.pop(f"{name}.weight_zero_point", None)
        if zp is not None:
            state[f"{name}.weight_zero_point"] = zp if args.num_bits == 8 or args.zp_dtype else unpack_int32(
                zp, args.num_bits, state[f"{name}.weight_scale"].shape, dim=0
            )
        replace_module(model, name, layer)
    state.update({k: v.to(dtype) if v.is_floating_point() and k.rsplit(".", 1)[-1] not in SCALE_NAMES else v
                  for k, v in tensors.items()})
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise LowbitError(f"{folder} holds tensors the model does not have: {result.unexpected_keys[:3]}")
    _tie_output_projection(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b is not None and b.device.type == "meta"]
    if missing:
        raise LowbitError(f"{folder} is missing tensors: {missing[:3]}")
    model.config.quantization_config = qc
    return model.eval()


def _is_tied_head(model: nn.Module, module: nn.Module) -> bool:
    return module is model.get_output_embeddings() and getattr(model.config, "tie_word_embeddings", False)


def _tie_output_projection(model: nn.Module) -> None:
    """Tie lm_head to the embeddings as the config says: the same table, quantized or not."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantEmbedding):
        if getattr(model.config, "tie_word_embeddings", False):
            head = model.get_output_embeddings()
            name = next(n for n, m in model.named_modules() if m is head)
            replace_module(model, name, QuantLinear.from_quantized(embedding.quantized_weight()))
    else:
        model.tie_weights()


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
