"""Non-uniform 4-bit grids: a scale per group times one of 16 fixed levels.

* NF4 (``type="nf"``, a lowbit extension of compressed-tensors' vocabulary): QLoRA's normal-float
  levels, the quantiles of a unit normal rescaled to [-1, 1] with an exact zero (Dettmers et al. 2023).
* FP4 (``type="float"``, ``num_bits=4``): the E2M1 float values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.

A weight is stored as the signed 4-bit code ``q = index − 8``; ``index`` picks the level (for FP4
it is the E2M1 bit pattern: sign bit, then two exponent bits and one mantissa bit), and
ŵ = level[q + 8] · scale. Scales map each group's max |w| onto the largest level.
"""

from __future__ import annotations

from typing import Optional

import torch

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

LEVELS = {"nf": NF4_LEVELS, "float": FP4_E2M1_LEVELS}
CODE_OFFSET = 8


def levels(grid_type: str) -> Optional[torch.Tensor]:
    """The 16 levels of a code-book grid type, or None for the uniform integer grid."""
    values = LEVELS.get(grid_type)
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def max_level(grid_type: str) -> float:
    return max(abs(v) for v in LEVELS[grid_type])


def nearest_code(x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Signed code (index − 8) of the level nearest to each element of ``x`` (already divided by its scale)."""
    values, order = torch.sort(book)
    midpoints = (values[1:] + values[:-1]) / 2
    index = order[torch.bucketize(x.float().contiguous(), midpoints)]
    return (index - CODE_OFFSET).to(torch.int8)


def decode(q: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Levels of signed codes ``q`` (float32)."""
    return book[q.long() + CODE_OFFSET]
