"""Mixed 4/8-bit weights chosen by sensitivity, in the spirit of NNCF's ``ratio``.

Each quantizable layer ℓ gets a sensitivity: how much the primary (4-bit) grid hurts it, per weight,

    weight_error:               S_ℓ = max_i mean_j (W_ij − ŵ_ij)²     (its worst output channel, as NNCF)
    hessian_input_activation:   S_ℓ = mean_ij h_j (W_ij − ŵ_ij)²,   h_j = mean_n x_nj²  (diag of XᵀX / n)
    fisher:                     S_ℓ = mean_ij F_ij (W_ij − ŵ_ij)²,  F_ij = mean_s (∂L_s/∂W_ij)²

The last is the second-order term of the model's loss change, ½ δᵀ H δ with the loss Hessian's
diagonal approximated by the empirical Fisher over calibration sequences s: unlike the first two
it sees how an error in layer ℓ travels to the output. Layers are then taken from the least
sensitive up into the primary precision until ``ratio`` of the *parameters* (not of the layers) is
there; the rest use the backup precision (8-bit). Ranking by error per weight (rather than per
layer) is the greedy answer to "least total loss for a parameter budget".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SENSITIVITY_METRICS = ("weight_error", "hessian_input_activation", "fisher")


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    parameters: int
    sensitivity: float


def sensitivity(
    W: torch.Tensor, W_hat: torch.Tensor, activation_sq: Optional[torch.Tensor] = None,
    fisher: Optional[torch.Tensor] = None,
) -> float:
    """S_ℓ of W [out, in] quantized to W_hat: fisher with ``fisher`` [out, in], hessian_input_activation
    with ``activation_sq`` [in], else weight_error.

    Measured on SmolLM2 (int4 g64, ratio 0.8, 16k held-out tokens; RTN everywhere 49.3, full
    precision 37.0): weight_error 44.4 (the mean error 45.7), hessian_input_activation 43.8,
    fisher 41.1 from 8 calibration sequences. Each layer's own loss increase, measured one layer at
    a time, ranks at 42.2: errors do not add up exactly.
    """
    err = (W.float() - W_hat.float()) ** 2
    if fisher is not None:
        return float((err * fisher.float()).mean())
    if activation_sq is None:
        return float(err.mean(dim=1).max())
    return float((err * activation_sq.float()[None, :]).mean())


def choose_primary(layers: list[LayerSensitivity], ratio: float) -> set[str]:
    """Names of the least sensitive layers holding ``ratio`` of all parameters (to the nearest layer)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
    total = sum(layer.parameters for layer in layers)
    target = ratio * total
    chosen: set[str] = set()
    taken = 0
    for layer in sorted(layers, key=lambda layer: (layer.sensitivity, layer.name)):
        if taken >= target:
            break
        # take the layer if that lands closer to the target than stopping short of it
        if abs(taken + layer.parameters - target) > abs(taken - target):
            break
        chosen.add(layer.name)
        taken += layer.parameters
    return chosen
