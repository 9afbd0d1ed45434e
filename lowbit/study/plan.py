"""What a study measures: models × bit-widths, one row each, every option checked before any work.

A row is one model at one width: 16 is the model as it is (full precision), 8/4/3/2 its weights
quantized by ``method`` on a symmetric grid of ``group_size`` columns per scale. A row's ``key``
holds every setting its numbers depend on, so a rerun reuses a finished row exactly when nothing
that row measured would change.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lowbit.algorithms import get_method
from lowbit.data.corpora import calibration_text
from lowbit.errors import LowbitError
from lowbit.evaluation.tasks import TASKS
from lowbit.models.loader import resolve

FULL_PRECISION = 16
WIDTHS = (16, 8, 4, 3, 2)
# Evaluation is compute-bound (float32 GEMMs, ~70 GFLOP/s on 2 Zen 3 cores): at these sizes a row takes
# 4-5 minutes (SmolLM2) to 7 (Gemma 3, whose 262k-word head dominates) there, evaluation and running.
# Items per task: the standard error is about 0.05 at 100 items (0.025 at lowbit eval's 400); bits per
# byte over 8,192 tokens varies far less.
STUDY_TOKENS = 8192
STUDY_ITEMS = 100


@dataclass(frozen=True)
class StudyPlan:
    models: tuple[str, ...]
    bits: tuple[int, ...] = (16, 8, 4, 3, 2)
    method: str = "gptq"
    group_size: int = 64
    calib: str = "shakespeare"
    nsamples: int = 128
    seqlen: int = 512
    ppl: str = "austen"
    tasks: tuple[str, ...] = ("lambada", "nextsent")
    max_tokens: Optional[int] = STUDY_TOKENS
    limit: Optional[int] = STUDY_ITEMS
    seed: int = 0
    batch_size: int = 8
    output: Path = field(default=Path("out/study"))

    def rows(self) -> list["Row"]:
        return [Row(self, model, bits) for model in self.models for bits in self.bits]

    def quantize_argv(self, bits: int) -> list[str]:
        return ["--method", self.method, "--bits", str(bits), "--group-size", str(self.group_size),
                "--calib", self.calib, "--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen),
                "--seed", str(self.seed)]

    def eval_argv(self) -> list[str]:
        argv = ["--ppl", self.ppl, "--seed", str(self.seed), "--batch-size", str(self.batch_size)]
        argv += ["--tasks", ",".join(self.tasks)] if self.tasks else []
        argv += ["--max-tokens", str(self.max_tokens)] if self.max_tokens else []
        argv += ["--limit", str(self.limit)] if self.limit else []
        return argv

    def bench_argv(self) -> list[str]:
        return ["--prompt-tokens", "512", "--decode-tokens", "256", "--repeats", "2"]

    def record(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def _slug(model: str) -> str:
    """A file-name-safe name of a model (its last path part, or the hub id with '--' for '/')."""
    path = Path(model)
    name = path.stem if path.suffix == ".gguf" else (path.name if path.exists() else model.replace("/", "--"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


@dataclass(frozen=True)
class Row:
    plan: StudyPlan
    model: str
    bits: int

    @property
    def name(self) -> str:
        width = "fp" if self.bits == FULL_PRECISION else f"{self.plan.method}-w{self.bits}g{self.plan.group_size}"
        return f"{_slug(self.model)}-{width}"

    @property
    def label(self) -> str:
        """How tables and plots name the row."""
        return f"{self.model} {'full precision' if self.bits == FULL_PRECISION else f'W{self.bits}'}"

    @property
    def checkpoint(self) -> Optional[Path]:
        """Where the quantized checkpoint is kept (None: the row runs the model as it is)."""
        return None if self.bits == FULL_PRECISION else self.plan.output / "checkpoints" / self.name

    @property
    def runs(self) -> str:
        """What eval and bench are given: the checkpoint, or the model itself."""
        return self.model if self.checkpoint is None else str(self.checkpoint)

    @property
    def key(self) -> str:
        """A digest of every setting this row's numbers depend on."""
        p = self.plan
        settings = {"model": self.model, "bits": self.bits, "eval": p.eval_argv(), "bench": p.bench_argv(),
                    "quantize": None if self.checkpoint is None else p.quantize_argv(self.bits)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def result_file(self) -> Path:
        return self.plan.output / "rows" / f"{self.name}.json"


def check_plan(plan: StudyPlan) -> StudyPlan:
    """Refuse what cannot work before anything is quantized or measured."""
    if not plan.models:
        raise LowbitError("name at least one model to study")
    if len(set(plan.models)) != len(plan.models):
        raise LowbitError("a model is named twice")
    for model in plan.models:
        source = resolve(model)
        if source.quantized:
            raise LowbitError(f"{model} is already quantized; a study starts from full-precision models")
    bad = [b for b in plan.bits if b not in WIDTHS]
    if bad or not plan.bits:
        raise LowbitError(f"--bits takes widths among {', '.join(map(str, WIDTHS))} (16: full precision), got"
                          f" {bad[0] if bad else 'none'}")
    if len(set(plan.bits)) != len(plan.bits):
        raise LowbitError("a width is named twice in --bits")
    method = get_method(plan.method)
    if plan.group_size < 0:
        raise LowbitError(f"group size must be 0 (per channel) or positive, got {plan.group_size}")
    if method.needs_calibration:
        calibration_text(plan.calib)
    unknown = [t for t in plan.tasks if t not in TASKS]
    if unknown:
        raise LowbitError(f"a study runs the offline tasks ({', '.join(TASKS)}); {unknown[0]!r} is not one")
    if plan.limit is not None and plan.limit < 2:
        raise LowbitError(f"limit must be at least 2 items per task, got {plan.limit}")
    if plan.output.exists() and not plan.output.is_dir():
        raise LowbitError(f"{plan.output} exists and is not a folder")
    return plan
