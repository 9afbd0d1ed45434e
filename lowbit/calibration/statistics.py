"""What the algorithms learn from calibration data, collected through one forward-hook helper.

    H_ℓ  = 2/n Σ x xᵀ                 the inputs' Hessian of each Linear's ‖W X − Ŵ X‖² (GPTQ)
    h_ℓj = 1/n Σ x_j²                 its diagonal / 2, the activations' second moments (mixed precision)
    F_ij = 1/S Σ_s (∂L_s/∂W_ij)²      the empirical Fisher of the loss over sequences s (mixed precision)

    max |K|, max |V|                    over the keys and values an attention caches (static KV cache scales)

plus the inputs themselves (the hidden states and keyword arguments entering each decoder block,
AWQ's samples of a module's inputs). Shapes: x [.., in]; H [in, in]; h [in]; F like W [out, in].
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.schemes.activations import fake_quantize_activation, static_scale
from lowbit.schemes.args import QuantizationArgs

Call = tuple[torch.Tensor, dict]  # (hidden states entering a block, that block's keyword arguments)


@contextmanager
def observe_inputs(modules: Mapping[str, nn.Module], observe: Callable[[str, tuple, dict], None]) -> Iterator[None]:
    """While inside, every forward of a named module first calls ``observe(name, args, kwargs)``."""
    handles = [
        module.register_forward_pre_hook(lambda _m, a, k, name=name: observe(name, a, k), with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


KV_OBSERVER = "lowbit_observe_kv"


@contextmanager
def observe_kv(attention: nn.Module, observe: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While inside, each forward of ``attention`` (a transformers attention module) calls ``observe(k, v)`` with the
    keys and values [B, kv_heads, T, d] it hands to its attention function: after k_norm and RoPE, what a KV cache
    stores. The attention itself runs transformers' SDPA (on the mask the caller already built)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, *args, **kwargs):
        if module is attention:
            observe(key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    config = attention.config
    original = config._attn_implementation
    AttentionInterface.register(KV_OBSERVER, forward)
    config._attn_implementation = KV_OBSERVER
    try:
        yield
    finally:
        config._attn_implementation = original


class AbsMax:
    """max |K| and max |V| over everything observed (``observe_kv``'s callback)."""

    def __init__(self):
        self.k = self.v = torch.zeros(())

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = torch.maximum(self.k, k.abs().amax().float())
        self.v = torch.maximum(self.v, v.abs().amax().float())


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a module is called on (positional, or a block's ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over calibration inputs x [.., in] (float32, [in, in])."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)


def run_block(block: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    """The block's output hidden states for each call."""
    outputs = []
    for x, kw in calls:
        y = block(x, **kw)
        outputs.append(y[0] if isinstance(y, tuple) else y)
    return outputs


@torch.no_grad()
def collect_hessians(block: nn.Module, linears: Mapping[str, nn.Linear], calls: list[Call]) -> dict[str, torch.Tensor]:
    """H for each Linear's input over the block's calls; Linears fed the same tensor (q/k/v, gate/up) share one H."""
    accumulators: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}  # holds x so its id stays unique

    def observe(name: str, args: tuple, kwargs: dict) -> None:
        x = first_input(args, kwargs)
        if name not in accumulators:
            accumulators[name] = seen[id(x)][1] if id(x) in seen else HessianAccumulator(x.shape[-1])
        if id(x) not in seen:
            seen[id(x)] = (x, accumulators[name])
            accumulators[name].add(x)

    with observe_inputs(linears, observe):
        for x, kw in calls:
            seen.clear()
            block(x, **kw)
    return {name: acc.H for name, acc in accumulators.items()}


class CrossAccumulator:
    """Running G = 2/n Σ x x̃ᵀ of paired inputs: x [.., in] the full-precision model's, x̃ the quantized one's."""

    def __init__(self, in_features: int):
        self.G = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        x, x_tilde = (t.reshape(-1, t.shape[-1]).float() for t in (x, x_tilde))
        m = x.shape[0]
        self.G *= self.n / (self.n + m)
        self.n += m
        self.G.addmm_(x.t(), x_tilde, alpha=2 / self.n)


@torch.no_grad()
def collect_asymmetric(block: nn.Module, linears: Mapping[str, nn.Linear], calls: list[Call], fp_calls: list[Call]):
    """For each Linear: H̃ = 2/n Σ x̃ x̃ᵀ over the inputs it gets on ``calls`` (the quantized model's hidden states)
    and G = 2/n Σ x x̃ᵀ pairing them with those on ``fp_calls`` (the full-precision model's, same tokens); and the
    block's outputs on ``fp_calls``, the full-precision stream's next hidden states. Linears fed one tensor share
    their H̃ and G. Returns (H̃, G, outputs)."""
    pairs: dict[str, tuple[HessianAccumulator, CrossAccumulator]] = {}
    fp_outputs = []
    for (x_fp, kw_fp), (x, kw) in zip(fp_calls, calls):
        reference: dict[str, torch.Tensor] = {}
        seen: dict[int, tuple[torch.Tensor, tuple]] = {}  # holds x̃ so its id stays unique

        def keep(name: str, args: tuple, kwargs: dict) -> None:
            reference.setdefault(name, first_input(args, kwargs))

        def observe(name: str, args: tuple, kwargs: dict) -> None:
            x_tilde = first_input(args, kwargs)
            if name not in pairs:
                width = x_tilde.shape[-1]
                pairs[name] = seen[id(x_tilde)][1] if id(x_tilde) in seen else (
                    HessianAccumulator(width), CrossAccumulator(width))
            if id(x_tilde) not in seen:
                seen[id(x_tilde)] = (x_tilde, pairs[name])
                pairs[name][0].add(x_tilde)
                pairs[name][1].add(reference[name], x_tilde)

        with observe_inputs(linears, keep):
            y = block(x_fp, **kw_fp)
        fp_outputs.append(y[0] if isinstance(y, tuple) else y)
        with observe_inputs(linears, observe):
            block(x, **kw)
    return {n: h.H for n, (h, _) in pairs.items()}, {n: c.G for n, (_, c) in pairs.items()}, fp_outputs


@torch.no_grad()
def capture_inputs(block: nn.Module, calls: list[Call], modules: Mapping[str, nn.Module], rows: int = 0) -> dict:
    """Inputs of each named module for every call of ``block``: (args, kwargs) pairs, or with
    ``rows`` > 0 just that many evenly spaced input rows per call (a list of [rows, in] tensors)."""
    seen: dict[str, list] = {name: [] for name in modules}

    def observe(name: str, args: tuple, kwargs: dict) -> None:
        if not rows:
            seen[name].append((args, kwargs))
            return
        x = first_input(args, kwargs)
        x = x.reshape(-1, x.shape[-1])
        seen[name].append(x[torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0])).long()].clone())

    with observe_inputs(modules, observe):
        for x, kw in calls:
            block(x, **kw)
    return seen


@torch.no_grad()
def activation_second_moments(
    model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """h_j = mean over tokens of x_j² for the input of each named Linear [in]."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, args: tuple, kwargs: dict) -> None:
        x = first_input(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    with observe_inputs({n: model.get_submodule(n) for n in names}, observe):
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    return {n: sums[n] / counts[n] for n in sums}


def empirical_fisher(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """F for the weight of each named module, L_s the summed next-token loss of window s (one
    backward pass per window). Memory: two copies of the named weights (gradient and running sum)."""
    weights = {n: model.get_submodule(n).weight for n in names}
    wanted = {id(w) for w in weights.values()}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    try:
        with torch.enable_grad():
            for window in windows.split(1):
                logits = model(input_ids=window, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
                grads = torch.autograd.grad(loss, list(weights.values()))
                for n, g in zip(weights, grads):
                    fisher[n].addcmul_(g, g, value=1 / len(windows))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])
    return fisher


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]):
    """Hidden states entering block 0 for each batch, and the keyword arguments each block gets for
    each batch (families such as Gemma 3 give sliding-window and global blocks different masks and
    rotary tables). Blocks are swapped for recorders that pass their input through, so this costs
    about an embedding lookup per batch."""
    inputs: list[torch.Tensor] = []
    block_kwargs: list[list[dict]] = [[] for _ in blocks]

    def recorder(i: int):
        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            for key in ("past_key_values", "past_key_value"):
                kw.pop(key, None)
            kw["use_cache"] = False
            if i == 0:
                inputs.append(hidden)
            block_kwargs[i].append(kw)
            if i == len(blocks) - 1:
                raise _Captured
            return hidden  # only the kwargs of later blocks are recorded, so its shape there does not matter

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        for block in blocks:
            del block.forward
    return inputs, block_kwargs


# Clipping ratios r tried for a static input range r · max|x| (the unclipped range first).
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05)


@torch.no_grad()
def input_ranges(block: nn.Module, linears: Mapping[str, nn.Linear], calls: list[Call], args: QuantizationArgs,
                 stride: int = 4) -> dict[str, tuple[torch.Tensor, float]]:
    """(range, r) per Linear: the calibrated per-tensor range r · max|x| of its input, the static scale's
    numerator, with r ∈ ``CLIP_RATIOS`` minimising the diagonal estimate of the Linears' output error

        E(r) = Σ_t Σ_j c_j (x_tj − x̂_tj(r))²,   c_j = Σ_ℓ ‖W_ℓ[:, j]‖²   (ℓ: the Linears fed this input)

    on every ``stride``-th token. On int8's uniform grid, max|x| alone lets one outlier token (a model's
    attention-sink token carries activations 100x the rest) set a step that rounds every other token to a
    few levels; clipping trades that token's error against all the others' (the MSE observers of Neural
    Compressor and llm-compressor). FP8's error is relative to each value, nearly independent of the
    range: its range stays max|x| (r = 1). Linears fed the same tensor (q/k/v, gate/up) share the range,
    so a fused runtime layer can share the scale.
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def observe(name: str, a: tuple, kw: dict) -> None:
        x = first_input(a, kw).detach()
        seen[name].append(x.reshape(-1, x.shape[-1]))

    with observe_inputs(linears, observe):
        for x, kw in calls:
            block(x, **kw)
    groups: dict[tuple, list[str]] = {}
    for name, xs in seen.items():  # the same tensors (alive, so distinct addresses) = the same input
        groups.setdefault(tuple(x.data_ptr() for x in xs), []).append(name)
    ranges = {}
    ratios = (1.0,) if args.is_fp8 else CLIP_RATIOS
    for names in groups.values():
        X = torch.cat(seen[names[0]]).float()
        amax = X.abs().amax()
        c = sum(linears[n].weight.detach().float().pow(2).sum(0) for n in names)
        sample = X[::stride]
        errors = [float(((fake_quantize_activation(sample, args, static_scale(amax * r, args)) - sample) ** 2).sum(0) @ c)
                  for r in ratios]
        r = ratios[min(range(len(errors)), key=errors.__getitem__)]
        ranges.update({n: (amax * r, r) for n in names})
    return ranges
