"""``LLM``: load a model once, then generate from it (offline batch, streaming, chat)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from lowbit.errors import LowbitError
from lowbit.evaluation.footprint import current_rss_bytes
from lowbit.models.allocator import lean_loading, release_freed_memory
from lowbit.models.loader import import_model_code, load_weights
from lowbit.runtime.cpu import describe, forced_isa, selected_isa
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.gguf_weights import adopt_blocks
from lowbit.runtime.hf_decoder import HFDecoder
from lowbit.runtime.kernels import fallback_notice
from lowbit.runtime.kv_cache import calibrated_scales
from lowbit.runtime.onthefly import ON_THE_FLY, quantizer_for
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.sequence import Sequence, Step
from lowbit.schemes.kv_cache import kv_format


@dataclass
class RequestOutput:
    """One finished generation (the fields an OpenAI-style response needs)."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prefill_s: float
    decode_s: float


class LLM:
    """A model ready to generate: ``LLM("out/smol-w4").generate(["Hello"], SamplingParams(max_tokens=32))``.

    ``quantization`` ("int8", "int4", "fp8") quantizes a full-precision checkpoint's decoder linears
    with RTN at load time; "fp8" is dynamic FP8 W8A8 as serving engines mean it (per-tensor FP8 weights,
    each call's input in FP8 with its own scale), run upcast on CPU (accuracy, not speed). ``lm_head="int8"`` (default) runs the output projection in per-channel
    int8 (a quarter of the bytes of bf16, perplexity unchanged within noise); "dense" keeps it in
    the compute dtype. ``kv_cache``: how keys and values are cached (bf16, int8, fp8, int4: see
    :mod:`lowbit.schemes.kv_cache`); None: the checkpoint's calibrated fp8 cache (its ``kv_cache_scheme``), else
    bf16; "fp8" on such a checkpoint uses its static scales, and any other format overrides them. Llama-style families run on lowbit's lean decoder; others on transformers'
    forward. A ``max_model_len`` beyond the model's positions is clamped to them with a notice, or, given
    ``exact_context`` (what needs it, for the message), refused. ``notices`` holds the lines (also printed to stderr) naming any slower path taken.
    ``max_batch``: how many sequences may decode together (:attr:`max_batch`; the server's batching), each with
    its own KV cache slot allocated up front.
    """

    def __init__(
        self,
        model: str,
        quantization: Optional[str] = None,
        max_model_len: int = 2048,
        lm_head: str = "int8",
        threads: Optional[int] = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        kv_cache: Optional[str] = None,
        exact_context: Optional[str] = None,
        max_batch: int = 1,
    ):
        if kv_cache is not None:
            kv_format(kv_cache)  # an unknown cache format is refused before the model loads
        if quantization is not None and quantization not in ON_THE_FLY:
            raise LowbitError(f"quantization {quantization!r} is not supported; choose one of {', '.join(ON_THE_FLY)}")
        if max_batch < 1:
            raise LowbitError(f"max_batch must be at least 1, got {max_batch}")
        if lm_head not in ("int8", "dense", "bf16"):
            raise LowbitError(f"lm_head must be 'int8' or 'dense', got {lm_head!r}")
        forced_isa()  # an unknown LOWBIT_ISA is refused before the model loads
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        import_model_code(model)
        self.rss_before_load_bytes = current_rss_bytes()
        hf_model, load_tokenizer, self.source = load_weights(model, torch.float32, allow_pickle, trust_remote_code)
        if quantization is not None and self.source.quantized:
            raise LowbitError(f"{model} is already quantized; drop --quantization")
        limit = getattr(hf_model.config, "max_position_embeddings", None) or max_model_len
        if exact_context and max_model_len > limit:
            raise LowbitError(f"{exact_context} needs a context of {max_model_len} tokens, beyond the model's {limit}")
        self.max_model_len = min(max_model_len, limit)
        self._clamped = f"lowbit: a context of {max_model_len} is beyond the model's {limit} positions; using {limit}" if (
            max_model_len > limit) else None
        self.name = model
        self.quantization = quantization or ("checkpoint" if self.source.quantized else None)
        self._gguf_notice = None
        if self.source.kind == "gguf" and quantization is None:  # run the file's Q4_0 / Q8_0 codes as they are
            adopted = adopt_blocks(hf_model, self.source.path)
            self._gguf_notice = adopted.notice(self.source.path)
            if adopted.kernels:
                self.quantization = "gguf " + "+".join(sorted(adopted.kernels))
        body = quantizer_for(quantization) if quantization else None
        head = quantizer_for("int8") if lm_head == "int8" else None
        scales = calibrated_scales(hf_model)
        self.kv_cache = kv_cache or ("fp8" if scales is not None else "bf16")
        self._kv_override = scales is not None and self.kv_cache != "fp8"
        scales = scales if self.kv_cache == "fp8" else None
        with lean_loading():
            if LeanDecoder.supports(hf_model):
                self.decoder = LeanDecoder(hf_model, self.max_model_len, body, head, consume=True,
                                           kv_cache=self.kv_cache, kv_scales=scales, slots=max_batch)
            elif self.kv_cache != "bf16":
                raise LowbitError(f"a {self.kv_cache} KV cache needs lowbit's lean decoder, which does not take"
                                  f" {hf_model.config.model_type}; drop --kv-cache")
            else:
                self.decoder = HFDecoder(hf_model, self.max_model_len, body)
            del hf_model
        release_freed_memory()
        self.asked_batch = max_batch
        self.max_batch = max_batch if isinstance(self.decoder, LeanDecoder) else 1
        self.tokenizer = load_tokenizer()  # after the build's temporaries: they and Gemma's 0.3 GB would add up
        self.notices = self._notices()
        for line in self.notices:
            print(line, file=sys.stderr, flush=True)
        self.eos_ids = self._eos_ids()
        self.load_time_s = time.perf_counter() - start
        release_freed_memory()
        self.rss_after_load_bytes = current_rss_bytes()

    def _notices(self) -> list[str]:
        """One line per slower path this model takes: layers off the packed kernels, no compiled step."""
        lines = [fallback_notice(self.decoder.projections())]
        if isinstance(self.decoder, HFDecoder):
            lines.append(f"lowbit: {self.decoder.model.config.model_type} has no lean decoder; decode runs transformers'"
                         " forward around lowbit's kernels with a dense output projection, several times slower than"
                         " the compiled step")
        if getattr(self.decoder, "step_unavailable", None):
            lines.append(f"lowbit: the compiled decode step is unavailable ({self.decoder.step_unavailable}); decode"
                         " runs the PyTorch loop, several times slower")
        if self.asked_batch > 1 and self.max_batch == 1:
            lines.append("lowbit: batched decoding needs lowbit's lean decoder; requests decode one at a time")
        elif self.max_batch > 1 and not self.decoder.batched:
            lines.append("lowbit: without the compiled decode step a batch decodes one PyTorch step per sequence")
        if self._clamped:
            lines.append(self._clamped)
        if self._gguf_notice:
            lines.append(self._gguf_notice)
        if self._kv_override:
            lines.append(f"lowbit: the checkpoint's calibrated fp8 KV cache is not used: --kv-cache {self.kv_cache} given")
        return [line for line in lines if line]

    def kv_cache_bytes_per_token(self) -> Optional[float]:
        """What one more cached position costs (over every layer's K and V), or None for transformers' own cache."""
        if not isinstance(self.decoder, LeanDecoder):
            return None
        d, cache = self.decoder, self.decoder.cache
        return cache.fmt.bytes_per_token(len(d.blocks), d.kv_heads, d.head_dim, cache.static) * (
            cache.k.element_size() / 2 if cache.fmt.name == "bf16" else 1)

    def cpu(self) -> dict:
        """What was detected about this CPU and chosen from it (``lowbit env``)."""
        return describe()

    def kernels(self) -> dict[str, str]:
        """What this CPU was found to compute and which kernel each kind of layer runs."""
        return {"kernel ISA": selected_isa(), "compute dtype": str(self.decoder.dtype).removeprefix("torch."),
                **self.decoder.kernels()}

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        config_eos = getattr(self.decoder, "eos_token_id", None)
        if config_eos is not None:
            ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
        return ids

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template (generation prompt added)."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.tokenizer(text, add_special_tokens=True).input_ids
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True).input_ids

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise LowbitError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context of"
                f" {self.max_model_len} tokens"
            )

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[tuple[str, Optional[str]]]:
        """Yield (text delta, finish reason or None) as tokens are generated; the last item has the reason."""
        for step in self.stream_steps(prompt_ids, params):
            yield step.delta, step.finish

    def stream_steps(self, prompt_ids: list[int], params: SamplingParams,
                     top_logprobs: Optional[int] = None) -> Iterator[Step]:
        """One :class:`Step` per generated token (text held back while a stop string may still match; logprobs
        when ``top_logprobs`` is not None); the last has the finish reason."""
        if not prompt_ids:
            raise LowbitError("the prompt is empty")
        self.check_length(len(prompt_ids), params.max_tokens)
        sequence = Sequence(self.tokenizer, params, self.eos_ids, top_logprobs)
        logits = self.decoder(torch.tensor([prompt_ids]), 0)[0, -1]
        position = len(prompt_ids)
        while True:
            step = sequence.advance(logits)
            yield step
            if step.finish:
                return
            logits = self.decoder(torch.tensor([[step.token]]), position)[0, -1]
            position += 1

    def _run(self, prompt: str, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        start = time.perf_counter()
        pieces, reason, first = [], "length", None
        for delta, finish in self.stream_ids(prompt_ids, params):
            first = first or time.perf_counter()
            pieces.append(delta)
            reason = finish or reason
        end = time.perf_counter()
        text = "".join(pieces)
        return RequestOutput(
            prompt, text, self.tokenizer(text, add_special_tokens=False).input_ids, len(prompt_ids), reason,
            (first or end) - start, end - (first or end),
        )

    def generate(
        self, prompts: Union[str, list[str]], params: Optional[SamplingParams] = None
    ) -> list[RequestOutput]:
        """Complete each prompt (one at a time)."""
        params = params or SamplingParams()
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return [self._run(p, self.encode(p), params) for p in prompts]

    def chat(self, messages: list[dict], params: Optional[SamplingParams] = None) -> RequestOutput:
        """Answer the last message of a conversation, through the chat template."""
        return self._run("", self.encode_chat(messages), params or SamplingParams())
