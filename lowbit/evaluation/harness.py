"""lowbit as an lm-evaluation-harness model ("lowbit"), running lowbit's quantized layers: the same
numerics as ``lowbit eval``, the same log-likelihood engine as the offline tasks.

    lowbit-lm-eval --model lowbit --model_args pretrained=out/smol-w4 --tasks lambada_openai

runs lm-eval's own command line with the model registered (:mod:`lowbit.evaluation.harness_cli`;
lowbit also declares the ``lm_eval.models`` entry point, for lm-eval versions that discover
installed backends by it, so that ``lm_eval --model lowbit`` works there as it is).

lm-eval is an optional extra (``pip install 'lowbit[lm-eval]'``); without it :data:`AVAILABLE` is
False and nothing here can be used. BOS is handled per model: it is put first exactly when the
tokenizer itself starts texts with it (Gemma yes, SmolLM2 no); an empty context is the prefix
token (BOS, else EOS), as lm-eval's own backends do.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.data.tokens import bos_id
from lowbit.errors import LowbitError
from lowbit.evaluation.loglikelihood import score_tokens
from lowbit.evaluation.tasks import TASKS
from lowbit.models.loader import dtype_named, load_model

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    AVAILABLE = True
except ImportError:  # the optional extra is not installed
    AVAILABLE = False

DEFAULT_MAX_LENGTH = 2048


def require() -> None:
    if not AVAILABLE:
        raise LowbitError("lm-evaluation-harness tasks need lm-eval: pip install 'lowbit[lm-eval]'")


if AVAILABLE:

    @register_model("lowbit")
    class LowbitLM(TemplateLM):
        """``lm_eval --model lowbit --model_args pretrained=out/smol-w4,batch_size=8``."""

        def __init__(self, pretrained: str, batch_size: int = 8, max_length: Optional[int] = None,
                     dtype: str = "float32", max_gen_toks: int = 256, model=None, tokenizer=None, **_ignored):
            super().__init__()
            if model is None:
                model, tokenizer, _ = load_model(pretrained, dtype_named(dtype))
            self.model, self.tokenizer = model, tokenizer
            self.batch_size = int(batch_size)
            limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
            self.max_length = int(max_length or min(limit, DEFAULT_MAX_LENGTH))
            self.max_gen_toks = int(max_gen_toks)
            self.bos = bos_id(tokenizer)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.name_or_path.replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=False).input_ids

        def _with_bos(self, context: list[int]) -> list[int]:
            return context if self.bos is None or context[:1] == [self.bos] else [self.bos] + context

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            pairs = [(self._with_bos(c), x) for _, c, x in requests]
            return [(s.loglikelihood, s.greedy) for s in score_tokens(self.model, pairs, self.batch_size, self.max_length)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Σ log p over every token of each text, in disjoint windows of ``max_length`` tokens."""
            totals = []
            for (text,) in [req.args for req in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
                scored = score_tokens(self.model, windows, self.batch_size, self.max_length)
                totals.append(sum(s.loglikelihood for s in scored))
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuation of each context, cut at the first stop string (or EOS)."""
            outputs = []
            for context, gen_kwargs in [req.args for req in requests]:
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = self._with_bos(self.tok_encode(context))[-(self.max_length - budget):]
                prompt = torch.tensor([ids])
                out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=budget,
                                          do_sample=False, pad_token_id=self.eot_token_id)
                text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
                cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
                outputs.append(text[:cut])
            return outputs


def load_tasks(names: list[str], include_path: Optional[str] = None) -> dict:
    """lm-eval's tasks by name (``include_path``: a folder of task YAMLs, e.g. local datasets), their
    datasets fetched now, before any model is loaded."""
    require()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LowbitError(f"unknown task {unknown[0]!r}: not an lm-eval task, nor an offline one ({', '.join(TASKS)})")
    try:
        return get_task_dict(names, manager)
    except Exception as error:  # the datasets library raises many kinds when the hub is unreachable
        raise LowbitError(
            f"lm-eval could not load the data of {', '.join(names)} ({type(error).__name__}: {error});"
            " standard tasks download it from the Hugging Face hub, which needs a network"
        ) from error


def run_tasks(model, tokenizer, task_dict: dict, batch_size: int, limit: Optional[int] = None) -> dict[str, dict]:
    """Each task's metrics and their standard errors, in the shape of :class:`TaskResult`'s dict."""
    from lm_eval.evaluator import evaluate

    lm = LowbitLM(pretrained="", model=model, tokenizer=tokenizer, batch_size=batch_size)
    out = evaluate(lm=lm, task_dict=task_dict, limit=limit)
    results = {}
    for name, values in out["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if not isinstance(value, (int, float)) or not _filter:
                continue
            if metric.endswith("_stderr"):
                stderr[metric.removesuffix("_stderr")] = float(value)
            else:
                metrics[metric] = float(value)
        items = out.get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {"task": name, "corpus": "lm-eval", "items": items, "metrics": metrics, "stderr": stderr}
    return results

