"""The gated activation and its slope as device code that Helion inlines into the kernels that
call them: the fused gate_up epilogue (notebook 10) and the layer's backward (notebook 11).
"""

from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "gate_activation", "gate_activation_slope"]

ACTIVATIONS = ("silu", "gelu_tanh")


# Device code shared by the gated kernels: Helion inlines a plain function called inside a
# kernel's loops, so these two are traced into each kernel that calls them (``activation`` is
# the kernel's compile-time flag, so only one branch is generated).
def gate_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) on a float32 tile. ``gelu_tanh`` is the tanh approximation of GELU, written as
    ``x * sigmoid(1.5958 (x + 0.044715 x^3))``, which equals it exactly (and needs no tanh,
    which Triton's CPU interpreter lacks).

    Taught in notebook 10.
    """
    if activation == "silu":
        return gate * torch.sigmoid(gate)
    return gate * torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))


def gate_activation_slope(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(gate) on a float32 tile: for x * sigmoid(z), sigmoid(z) + x sigmoid'(z) dz/dx,
    with z = x (SiLU) or z = c (x + 0.044715 x^3) (GELU's tanh approximation).

    Taught in notebook 11.
    """
    if activation == "silu":
        s = torch.sigmoid(gate)
        return s * (1.0 + gate * (1.0 - s))
    s = torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    dz = 1.5957691216057308 * (1.0 + 3 * 0.044715 * gate * gate)
    return s + gate * s * (1.0 - s) * dz
