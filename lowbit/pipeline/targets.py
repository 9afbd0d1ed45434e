"""Which modules a recipe quantizes, found through the family's architecture record."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from lowbit.models.architectures import architecture_of, decoder_blocks


def is_ignored(name: str, ignore: tuple) -> bool:
    """Whether ``name`` matches an ``ignore`` entry (an exact name, or ``re:`` and a regex)."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)


def target_linears(block: nn.Module, prefix: str, ignore: tuple) -> dict[str, nn.Linear]:
    """The block's Linear layers by full name, minus the ignored ones."""
    return {
        f"{prefix}.{n}": m for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and not is_ignored(f"{prefix}.{n}", ignore)
    }


@dataclass
class Targets:
    """``blocks[i]``: block i's target Linears by full name. ``extra``: the embedding table and an
    untied head (empty unless the recipe asks for them); ``tied_head``: the name of an lm_head that
    reads the embedding's table, so follows it; ``lm_head``: the head's name when it gets the
    primary scheme on its own (``include_lm_head``)."""

    blocks: list[dict[str, nn.Linear]]
    extra: dict[str, nn.Module] = field(default_factory=dict)
    tied_head: Optional[str] = None
    lm_head: Optional[str] = None

    def ranked(self, extra_ranked: bool) -> dict[str, nn.Module]:
        """The layers competing for the primary scheme under ``ratio``."""
        layers = {name: m for block in self.blocks for name, m in block.items()}
        return {**layers, **self.extra} if extra_ranked else layers


def select_targets(model: nn.Module, ignore: tuple, embeddings: Optional[str], include_lm_head: bool) -> Targets:
    """The recipe's targets in ``model`` (see :class:`~lowbit.pipeline.recipe.Recipe` for the options)."""
    prefix, blocks = decoder_blocks(model)
    arch = architecture_of(model)
    targets = Targets([target_linears(block, f"{prefix}.{i}", ignore) for i, block in enumerate(blocks)])
    head = model.get_submodule(arch.lm_head)
    embedding = model.get_submodule(arch.embed)
    tied = getattr(head, "weight", None) is getattr(embedding, "weight", None)
    if embeddings is not None:
        if isinstance(embedding, nn.Embedding) and not is_ignored(arch.embed, ignore):
            targets.extra[arch.embed] = embedding
            targets.tied_head = arch.lm_head if tied else None
        if isinstance(head, nn.Linear) and not tied and not is_ignored(arch.lm_head, ignore):
            targets.extra[arch.lm_head] = head
    if include_lm_head and isinstance(head, nn.Linear):
        targets.lm_head = arch.lm_head
    return targets
