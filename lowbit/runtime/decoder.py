"""A lean decoder for Llama-style models (gpt-fast style): static shapes, a preallocated KV cache,
fused q/k/v and gate/up projections running on packed low-bit kernels, the residual stream in
float32 and GEMMs in the CPU's compute dtype (:func:`lowbit.runtime.cpu.compute_dtype`).

One step computes, for each block,

    x = RMSNorm(h);  q, k, v = x W_qkvᵀ;  q, k = RoPE(q, k);  cache[k, v] at positions p
    h = h + Attn(q, K_cache, V_cache, mask: p − window < position ≤ p) W_oᵀ
    x = RMSNorm(h);  h = h + (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ

Family differences are data, the family's record in :mod:`lowbit.models.architectures` (block layout,
norm offset, embedding scale, activation): per-head q/k norms, Gemma's (1 + w) norms, its norms after
attention and MLP (the block output is normalised before the residual add), its embedding scale √D and
GELU-tanh; per-layer sliding windows and RoPE tables come from the config. Other families use
transformers' own forward.
Single-token steps run in one call of lowbit's compiled ``DecodeStep`` (``csrc/decode_step.cpp``),
which calls packed and dense projections itself and any other module back through Python;
prompts run the PyTorch code below, which computes the same steps in the same precision.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.models.architectures import ARCHITECTURES, Architecture, architecture_of
from lowbit.runtime.cpu import compute_dtype
from lowbit.runtime.kv_cache import Entries, KVCache
from lowbit.runtime.layout import DECODE_ROWS
from lowbit.runtime.kernels import (
    DenseLinear,
    Int8Linear,
    PackedLinear,
    fast_linear,
    input_quantization,
    kernels_by_kind,
    unavailable_reason,
    with_inputs,
)
from lowbit.runtime.native import native_module
from lowbit.quantized.modules import QuantEmbedding, QuantLinear, replace_module
from lowbit.schemes.grid import QuantizedWeight
from lowbit.schemes.kv_cache import kv_format, quantize_query


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the codes DecodeStep takes

ATTENTION_CHUNK = 256

WeightQuantizer = Callable[[torch.Tensor, Optional[torch.Tensor], torch.dtype], nn.Module]


def _fused(modules: list[nn.Module], quantize: Optional[WeightQuantizer], dtype) -> nn.Module:
    """One fast linear computing several projections of the same input (outputs concatenated), with their
    input quantization if the checkpoint has one."""
    inputs = input_quantization(modules)
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, modules)]
    )
    if all(isinstance(m, QuantLinear) for m in modules) and len({m.args for m in modules}) == 1:
        parts = [m.quantized_weight() for m in modules]
        zp = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
        qw = QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zp, parts[0].args)
        return fast_linear(qw, bias=bias, dtype=dtype, inputs=inputs)
    weights = [m.quantized_weight().dequantize(torch.float32) if isinstance(m, QuantLinear) else m.weight for m in modules]
    weight = weights[0].detach().float() if len(weights) == 1 else torch.cat([w.detach().float() for w in weights])
    if quantize:
        return with_inputs(quantize(weight, bias, dtype), inputs, "weights rounded at load time")
    return fast_linear(None, weight=weight, bias=bias, dtype=dtype, inputs=inputs)


def _step_projection(native, m: nn.Module):
    """A projection as ``DecodeStep`` runs it: lowbit's packed kernel, a dense GEMV, or a call back into ``m``."""
    if isinstance(m, PackedLinear):
        return native.Projection.packed(m.packed, m.scale, m.offset, m.bits, m.group_size, m.in_features, m.bias)
    if isinstance(m, DenseLinear):
        return native.Projection.dense(m.weight, m.bias)
    if isinstance(m, Int8Linear):  # one row: a dynamic scale per token and per call agree
        return native.Projection.int8(m.panels, m.weight_scale, m.in_features, m.static_scale, m.bias)
    return native.Projection.callback(lambda x: m(x.to(torch.float32)), m.in_features, m.out_features)


def _tied(head: nn.Module, table: nn.Module) -> bool:
    """Whether the output projection reads the embedding table (full precision or quantized)."""
    if isinstance(table, QuantEmbedding):
        return getattr(head, "weight_q", None) is table.weight_q
    return getattr(head, "weight", None) is table.weight


def _norm_weight(norm: nn.Module, arch: Architecture) -> torch.Tensor:
    """The RMSNorm's multiplier as float32 (Gemma's 1 + w folded in)."""
    return arch.norm_offset + norm.weight.detach().float()


class _Block(nn.Module):
    def __init__(self, layer: nn.Module, arch: Architecture, quantize, dtype, window: int, rope: int):
        super().__init__()
        at, lay = layer.get_submodule, arch.lean

        def norm(path: Optional[str]) -> Optional[torch.Tensor]:
            return None if path is None else _norm_weight(at(path), arch)

        self.qkv = _fused([at(lay.q), at(lay.k), at(lay.v)], quantize, dtype)
        self.o = _fused([at(lay.o)], quantize, dtype)
        self.gate_up = _fused([at(lay.gate), at(lay.up)], quantize, dtype)
        self.down = _fused([at(lay.down)], quantize, dtype)
        self.window, self.rope = window, rope  # window 0: every earlier position
        self.norm_attn, self.norm_mlp = norm(lay.attn_norm), norm(lay.mlp_norm)
        self.post_attn, self.post_mlp = norm(lay.post_attn_norm), norm(lay.post_mlp_norm)
        self.q_norm, self.k_norm = norm(lay.q_norm), norm(lay.k_norm)
        self.q_size = at(lay.q).out_features
        self.kv_size = at(lay.k).out_features
        self.intermediate = at(lay.gate).out_features


class LeanDecoder(nn.Module):
    """Forward for one sequence: ``logits = decoder(ids [1, T], positions [T])`` with the KV cache kept inside."""

    def __init__(
        self,
        hf_model: nn.Module,
        max_len: int,
        quantize: Optional[WeightQuantizer] = None,
        quantize_head: Optional[WeightQuantizer] = None,
        dtype: Optional[torch.dtype] = None,
        cache_dtype: torch.dtype = torch.bfloat16,
        consume: bool = False,
        kv_cache: str = "bf16",
        kv_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        slots: int = 1,
    ):
        """``dtype``: compute dtype (default: what this CPU computes natively). ``kv_cache``: how K and V are
        stored (:mod:`lowbit.schemes.kv_cache`: bf16, int8, fp8, int4); bf16 by default on every CPU (half the
        bytes a decode step reads at depth, as llama.cpp's f16 cache), ``cache_dtype`` its storage dtype (float32
        for exact comparisons); ``kv_scales``: fp8's calibrated per-layer (k_scale, v_scale) [L] each, else
        dynamic scales per position. ``slots``: how many sequences the cache holds at once (batched decoding,
        :meth:`decode_batch`; each costs a full cache). ``consume``: take ``hf_model``'s layers
        apart while building (each one's tensors freed once its fused copy exists), so that the load never
        holds the model twice; ``hf_model`` cannot run afterwards."""
        super().__init__()
        config = hf_model.config
        arch = architecture_of(hf_model)
        if arch.lean is None:
            raise LowbitError(f"the lean decoder does not take {config.model_type}; use HFDecoder")
        dtype = dtype or compute_dtype()
        self.dtype, self.max_len = dtype, max_len
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.attn_scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.embed_scale = config.hidden_size**0.5 if arch.embed_scale else 1.0
        self.activation = arch.activation
        self.arch = arch
        layers = hf_model.get_submodule(arch.blocks)
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(layers))
        kinds = sorted(set(layer_types))  # one RoPE table per attention kind (Gemma 3: local and global bases)
        window = getattr(config, "sliding_window", None) or 0
        # The head and table first: under ``consume`` a full-precision table is gone before the blocks are fused.
        self.norm = _norm_weight(hf_model.get_submodule(arch.final_norm), arch)
        head = hf_model.get_submodule(arch.lm_head)
        self.lm_head = _fused([head], quantize_head, dtype)
        table = hf_model.get_submodule(arch.embed)
        # A tied packed head doubles as the embedding table (rows dequantized when looked up): one copy, not two.
        self.shared_embedding = _tied(head, table) and isinstance(self.lm_head, PackedLinear)
        quantized_table = isinstance(table, QuantEmbedding) and not self.shared_embedding
        self.quantized_embed = table if quantized_table else None  # rows dequantized when looked up
        plain = not self.shared_embedding and not quantized_table
        self.register_buffer("embed", table.weight.detach().to(dtype) if plain else None)
        if consume:
            for path in {arch.lm_head, arch.embed}:
                replace_module(hf_model, path, nn.Module())
            del head, table
        self.blocks = nn.ModuleList()
        for i, kind in enumerate(layer_types):
            self.blocks.append(_Block(layers[i], arch, quantize, dtype, window if kind == "sliding_attention" else 0,
                                      kinds.index(kind)))
            if consume:  # the layer's own tensors go as soon as its fused copies exist
                layers[i] = nn.Module()
        self.eos_token_id = getattr(hf_model.generation_config, "eos_token_id", None)
        positions = torch.arange(max_len)[None]
        probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
        rotary = hf_model.get_submodule(arch.rotary)
        per_kind = "layer_type" in inspect.signature(rotary.forward).parameters
        tables = [rotary(probe, positions, *([kind] if per_kind else [])) for kind in kinds]
        self.register_buffer("cos", torch.stack([cos[0].float() for cos, _ in tables]))  # [kinds, max_len, d]
        self.register_buffer("sin", torch.stack([sin[0].float() for _, sin in tables]))
        self.cache = KVCache(kv_format(kv_cache), len(self.blocks), self.kv_heads, max_len, self.head_dim, kv_scales,
                             dense_dtype=cache_dtype, slots=slots)
        self.step_unavailable = unavailable_reason() if self.dtype in (torch.float32, torch.bfloat16) else (
            f"compute dtype {self.dtype}")
        if not self.step_unavailable and kv_cache == "int4" and self.head_dim % 2:
            self.step_unavailable = f"the int4 KV cache packs pairs of channels; head_dim {self.head_dim} is odd"
        self.step = None if self.step_unavailable else self._compiled_step(native_module())

    @property
    def k_cache(self) -> torch.Tensor:
        return self.cache.k

    @property
    def v_cache(self) -> torch.Tensor:
        return self.cache.v

    def _compiled_step(self, native):
        """The one-call decode step over this decoder's weights and cache."""
        step = native.DecodeStep(
            self.heads, self.kv_heads, self.head_dim, self.eps, self.cos, self.sin, self.k_cache, self.v_cache,
            self.norm, self.attn_scale, self.embed_scale, ACTIVATIONS[self.activation],
        )
        for b in self.blocks:
            projections = [_step_projection(native, m) for m in (b.qkv, b.o, b.gate_up, b.down)]
            step.add_block(*projections, b.norm_attn, b.norm_mlp, b.q_norm, b.k_norm, b.post_attn, b.post_mlp,
                           b.window, b.rope)
        c = self.cache
        if c.fmt.per_token:
            step.set_cache_scales(c.k_scale, c.v_scale)
        elif c.fmt.name == "int4":
            step.set_int4_cache(c.k_scale, c.k_min, c.v_scale, c.v_min, c.k_residual, c.v_residual)
        head = _step_projection(native, self.lm_head)
        step.set_head(head)
        if self.shared_embedding:
            step.set_embedding_rows(head)
        elif self.embed is not None:
            step.set_embedding_table(self.embed)
        return step

    def projections(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every projection, named as the checkpoint's layers."""
        lay = self.arch.lean
        q_parent, gate_parent = lay.q.rpartition(".")[0], lay.gate.rpartition(".")[0]  # fused: named beside q, gate
        parts = (("qkv", f"{q_parent}.qkv"), ("o", lay.o), ("gate_up", f"{gate_parent}.gate_up"), ("down", lay.down))
        named = [(f"{self.arch.blocks}.{i}.{label}", getattr(b, attr)) for i, b in enumerate(self.blocks) for attr, label in parts]
        return named + [(self.arch.lm_head, self.lm_head)]

    def kernels(self) -> dict[str, str]:
        """Which kernel each kind of projection runs, and how a decode step runs."""
        report = kernels_by_kind(self.projections())
        report["decode step"] = ("compiled (csrc/decode_step.cpp)" if self.step is not None
                                 else f"PyTorch loop ({self.step_unavailable})")
        fmt = self.cache.fmt.name
        report["KV cache"] = str(self.k_cache.dtype).removeprefix("torch.") if fmt == "bf16" else (
            f"{fmt} ({'calibrated static' if self.cache.static else 'dynamic'} scales"
            f"{f', keys per {self.cache.key_block} channels' if self.cache.key_block else ''})" if self.cache.fmt.per_token
            else f"{fmt} (keys per channel over {self.cache.fmt.group} positions, values per position)")
        return report

    @staticmethod
    def supports(hf_model: nn.Module) -> bool:
        arch = ARCHITECTURES.get(getattr(hf_model.config, "model_type", None))
        return arch is not None and arch.lean is not None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized_embed is not None:
            return self.quantized_embed(ids).float()
        if self.shared_embedding:
            return self.lm_head.rows(ids)
        return F.embedding(ids, self.embed).float()

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attend(self, i: int, q: torch.Tensor, entries: Entries, start: int) -> torch.Tensor:
        """Attention of q [1, heads, T, d] at positions start … start + T − 1 over the cache ``entries`` each may read
        (causal, within the block's window, quantized or full precision as the cache format says; the query
        quantized as it reads int8 keys).

        Per chunk of ``ATTENTION_CHUNK`` query rows over only the entries they can see, so that the score matrix
        stays heads × chunk × context and the keys past the causal edge are never multiplied.
        """
        T, window, group = q.shape[2], self.blocks[i].window, self.cache.group
        t = torch.arange(start, start + T)
        q = quantize_query(q.float(), self.cache.fmt)
        if T == 1:  # float32, as the compiled step computes it
            seen = entries.visible(t, group, window)[0]
            k, v = entries.k[:, seen], entries.v[:, seen]
            return F.scaled_dot_product_attention(q.float(), k[None], v[None], enable_gqa=True, scale=self.attn_scale)
        k, v = entries.k.to(self.dtype), entries.v.to(self.dtype)
        q = q[0].to(self.dtype)
        out = torch.empty(self.heads, T, self.head_dim, dtype=torch.float32)
        for r0 in range(0, T, ATTENTION_CHUNK):
            r1 = min(T, r0 + ATTENTION_CHUNK)
            visible = entries.visible(t[r0:r1], group, window)
            cols = visible.any(0).nonzero()[:, 0]
            out[:, r0:r1] = self._attend_chunk(q[:, r0:r1], k[:, cols], v[:, cols], visible[:, cols])
        return out[None]

    def _attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale, where visible) v for q [heads, n, d], k and v [kv_heads, ctx, d].

        float32: torch's fused SDPA (on Zen 3, 512 prompt tokens of SmolLM2: 6.7 ms a layer against 12.8 ms
        for two matmuls); bfloat16: two matmuls, the query heads that share a key/value head stacked into one
        matrix (measured ~2x faster than SDPA in bf16 on Zen 4).
        """
        if q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=visible, enable_gqa=True,
                                                  scale=self.attn_scale)[0]
        (heads, n, d), ctx = q.shape, k.shape[1]
        rep = heads // self.kv_heads
        scores = (q.reshape(self.kv_heads, rep * n, d) @ k.transpose(1, 2)).float().view(heads, n, ctx)
        probs = (scores * self.attn_scale).masked_fill_(~visible, float("-inf")).softmax(-1).to(q.dtype)
        return (probs.view(self.kv_heads, rep * n, ctx) @ v).view(heads, n, d).float()

    def _act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")

    @property
    def slots(self) -> int:
        return self.cache.slots

    @torch.no_grad()
    def decode_batch(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [B, V] for B sequences' next tokens, sequence b's ``tokens[b]`` at ``positions[b]`` of its own cache
        slot ``slots[b]``: one compiled step for all (each weight read once), or, without the compiled step, one
        PyTorch step per sequence (the result is the same; ``batched`` says which)."""
        if any(p >= self.max_len for p in positions):
            raise ValueError(f"a position beyond the context of {self.max_len}")
        if self.step is None:
            return torch.cat([self.forward(torch.tensor([[t]]), p, slot=s)[0] for t, p, s in zip(tokens, positions, slots)])
        ids = torch.tensor(tokens)
        rows = None if self.quantized_embed is None else self._embed(ids[None])[0].float()
        return self.step.forward_batch(ids, torch.tensor(positions), torch.tensor(slots), rows)

    @property
    def batched(self) -> bool:
        """Whether :meth:`decode_batch` runs the sequences as one batch."""
        return self.step is not None

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int, last_only: bool = True, slot: int = 0) -> torch.Tensor:
        """Logits for ``ids`` [1, T] placed at positions start … start + T − 1 of cache slot ``slot`` (earlier ones
        cached)."""
        T = ids.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.max_len}")
        if not 0 <= slot < self.slots:
            raise ValueError(f"cache slot {slot} of {self.slots}")
        if T == 1 and self.step is not None:
            if slot:
                return self.decode_batch([int(ids[0, 0])], [start], [slot])[None]
            row = None if self.quantized_embed is None else self._embed(ids)[0, 0].float()
            return self.step.forward(int(ids[0, 0]), start, row)[None]
        return self._prompts([(ids[0], start, slot)], last_only)

    @torch.no_grad()
    def prefill(self, prompts: list[tuple[list[int], int]]) -> torch.Tensor:
        """Logits [n, V] of the last token of each of n prompts, prompt i's ids written from position 0 of its own
        cache slot, each exactly as it would be alone. The prompts longer than ``DECODE_ROWS`` tokens run in one
        pass, so each projection is one GEMM over all their rows (~1.5x the throughput of 128-row GEMMs at 1024
        rows here) and each weight is dequantized once; shorter ones run alone, as their projections take the
        packed GEMV (activations rounded to int8 as in a decode step), which a batch's GEMM would not."""
        for ids, slot in prompts:
            if len(ids) > self.max_len:
                raise ValueError(f"sequence of {len(ids)} tokens exceeds the context of {self.max_len}")
            if not 0 <= slot < self.slots:
                raise ValueError(f"cache slot {slot} of {self.slots}")
        segments = [(torch.tensor(ids), 0, slot) for ids, slot in prompts]
        long = [i for i, (ids, _) in enumerate(prompts) if len(ids) > DECODE_ROWS]
        rows = {i: self._prompts([segments[i]], True)[0, 0] for i in range(len(prompts)) if i not in long}
        if long:
            rows.update(zip(long, self._prompts([segments[i] for i in long], True)[0]))
        return torch.stack([rows[i] for i in range(len(prompts))])

    def _prompts(self, segments: list[tuple[torch.Tensor, int, int]], last_only: bool) -> torch.Tensor:
        """Logits [1, rows, V] for segments (ids [T_i], start_i, slot_i) laid end to end: the row-wise work (norms,
        projections, MLP) runs on all rows at once, RoPE at each row's own position, and attention per segment over
        its own cache slot. ``last_only``: each segment's last row only."""
        lengths = [len(ids) for ids, _, _ in segments]
        T = sum(lengths)
        bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
        positions = torch.cat([torch.arange(start, start + len(ids)) for ids, start, _ in segments])
        h = self._embed(torch.cat([ids for ids, _, _ in segments])[None]) * self.embed_scale
        for i, b in enumerate(self.blocks):
            cos, sin = self.cos[b.rope, positions][None, None], self.sin[b.rope, positions][None, None]
            x = self._rms(h, b.norm_attn)
            q, k, v = b.qkv(x).split([b.q_size, b.kv_size, b.kv_size], dim=-1)
            q = q.view(1, T, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            if b.q_norm is not None:
                q, k = self._rms(q, b.q_norm), self._rms(k, b.k_norm)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            attended = []
            for (_, start, slot), r0, r1 in zip(segments, bounds, bounds[1:]):
                entries = self.cache.update(i, start, k[0, :, r0:r1], v[0, :, r0:r1], slot)
                attended.append(self._attend(i, q[:, :, r0:r1], entries, start).transpose(1, 2).reshape(1, r1 - r0, -1))
            a = b.o(torch.cat(attended, dim=1))
            h = h + (a if b.post_attn is None else self._rms(a, b.post_attn))
            x = self._rms(h, b.norm_mlp)
            gate, up = b.gate_up(x).split([b.intermediate, b.intermediate], dim=-1)
            m = b.down(self._act(gate) * up)
            h = h + (m if b.post_mlp is None else self._rms(m, b.post_mlp))
        if last_only:
            h = h[:, [r1 - 1 for r1 in bounds[1:]]]
        return self.lm_head(self._rms(h, self.norm)).float()
