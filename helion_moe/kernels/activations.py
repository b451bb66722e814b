"""The gated activation and its gradients as device code that Helion inlines into the kernels
that call them: the fused gate_up epilogue (notebook 10) and the layer's backward (notebook 11).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "ACTIVATIONS",
    "GPT_OSS_ACTIVATION",
    "GatedActivation",
    "activation_as_text",
    "activation_from_text",
    "as_gated_activation",
    "gate_activation",
    "gate_activation_slope",
    "gate_up_columns",
    "gated_product",
    "gated_product_grads",
]

ACTIVATIONS = ("silu", "gelu_tanh")


class GatedActivation(NamedTuple):
    """How an expert joins its gate and up projections: ``act(g) * (u + up_shift)``, with the
    gate clamped to at most ``limit`` (g = min(gate, limit)) and up to [-limit, limit]
    (u = clamp(up, -limit, limit)). ``act`` is ``name``'s activation: ``"silu"``,
    x * sigmoid(alpha x), or ``"gelu_tanh"``, GELU's tanh approximation (alpha 1 only).

    The defaults are plain SwiGLU, act(gate) * up. gpt-oss clamps, scales and shifts
    (``GPT_OSS_ACTIVATION``); other models clamp SwiGLU too.

    Taught in notebook 10.
    """

    name: str = "silu"  # one of ACTIVATIONS
    alpha: float = 1.0  # the sigmoid's slope in x * sigmoid(alpha x)
    limit: float = math.inf  # the clamp of gate (above) and up (both sides)
    up_shift: float = 0.0  # added to the clamped up before the product


# gpt-oss's experts (transformers' GptOssExperts): alpha 1.702, limit 7, (up + 1).
GPT_OSS_ACTIVATION = GatedActivation("silu", alpha=1.702, limit=7.0, up_shift=1.0)


def as_gated_activation(activation: str | GatedActivation) -> GatedActivation:
    """``activation`` as a ``GatedActivation`` (a name is the plain one); a ValueError naming
    ``activation`` for anything else.

    Taught in notebook 10.
    """
    if isinstance(activation, str):
        activation = GatedActivation(activation)
    if not isinstance(activation, GatedActivation) or activation.name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or a GatedActivation of one, "
            f"got {activation!r}"
        )
    name, alpha, limit, up_shift = activation
    numbers = (alpha, limit, up_shift)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in numbers):
        raise ValueError(f"activation's alpha, limit and up_shift must be numbers: {activation}")
    if not (alpha > 0 and limit > 0 and math.isfinite(alpha) and math.isfinite(up_shift)):
        raise ValueError(
            f"activation needs alpha > 0, limit > 0 (math.inf: no clamp) and a finite "
            f"up_shift: {activation}"
        )
    if name != "silu" and alpha != 1:
        raise ValueError(f"activation's alpha scales SiLU's sigmoid only: {activation}")
    return GatedActivation(name, float(alpha), float(limit), float(up_shift))


def activation_as_text(activation: GatedActivation) -> str:
    """A ``GatedActivation`` as the text a custom op takes: its name alone for the plain one,
    else ``"name:alpha:limit:up_shift"`` (plain string formatting, which torch.compile traces).

    Taught in notebook 10.
    """
    name, alpha, limit, up_shift = activation
    if (alpha, limit, up_shift) == (1.0, math.inf, 0.0):
        return name
    return f"{name}:{alpha!r}:{limit!r}:{up_shift!r}"


def activation_from_text(text: str) -> GatedActivation:
    """``activation_as_text`` undone.

    Taught in notebook 10.
    """
    name, *numbers = text.split(":")
    return GatedActivation(name, *(float(x) for x in numbers))


# Device code shared by the gated kernels: Helion inlines a plain function called inside a
# kernel's loops, so these are traced into each kernel that calls them. ``activation`` is the
# kernel's compile-time tuple (name, alpha, limit, up_shift), so every `if` on it is decided
# when the kernel compiles: plain SwiGLU compiles no clamp, scale or shift.
def gate_activation(gate: torch.Tensor, name: str, alpha: float = 1.0) -> torch.Tensor:
    """act(gate) on a float32 tile: x * sigmoid(alpha x) for ``"silu"``; for ``"gelu_tanh"``
    the tanh approximation of GELU, written as ``x * sigmoid(1.5958 (x + 0.044715 x^3))``,
    which equals it exactly (and needs no tanh, which Triton's CPU interpreter lacks).

    Taught in notebook 10.
    """
    if name == "silu":
        if alpha != 1.0:
            return gate * torch.sigmoid(alpha * gate)
        return gate * torch.sigmoid(gate)
    return gate * torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))


def gate_activation_slope(gate: torch.Tensor, name: str, alpha: float = 1.0) -> torch.Tensor:
    """act'(gate) on a float32 tile: for x * sigmoid(z), sigmoid(z) + x sigmoid'(z) dz/dx,
    with z = alpha x (SiLU) or z = c (x + 0.044715 x^3) (GELU's tanh approximation).

    Taught in notebook 11.
    """
    if name == "silu":
        if alpha != 1.0:
            s = torch.sigmoid(alpha * gate)
            return s * (1.0 + alpha * gate * (1.0 - s))
        s = torch.sigmoid(gate)
        return s * (1.0 + gate * (1.0 - s))
    s = torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    dz = 1.5957691216057308 * (1.0 + 3 * 0.044715 * gate * gate)
    return s + gate * s * (1.0 - s) * dz


def gate_up_columns(
    tile_n: object,  # a Helion tile of the I intermediate columns
    I: int,  # noqa: E741 (the course's name for the intermediate size)
    interleaved: bool,  # the kernel's compile-time flag
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of W_gate_up [.., 2I] that hold the gate and up weights of ``tile_n``'s
    intermediate columns n: n and I + n, or 2n and 2n + 1 when ``interleaved`` (gpt-oss's
    ``gate_up_proj``, gate = [..., ::2] and up = [..., 1::2]).

    Taught in notebook 10.
    """
    if interleaved:
        return 2 * tile_n.index, 2 * tile_n.index + 1
    return tile_n.index, I + tile_n.index


def gated_product(
    gate: torch.Tensor,  # float32 tile
    up: torch.Tensor,  # float32 tile, gate's shape
    activation: tuple,  # a GatedActivation as a tuple
) -> torch.Tensor:
    """``act(g) * (u + up_shift)`` of ``GatedActivation`` on float32 tiles.

    Taught in notebook 10.
    """
    name, alpha, limit, up_shift = activation
    if limit != math.inf:
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
    if up_shift != 0.0:
        up = up + up_shift
    return gate_activation(gate, name, alpha) * up


def gated_product_grads(
    gate: torch.Tensor,  # float32 tile
    up: torch.Tensor,  # float32 tile, gate's shape
    dh: torch.Tensor,  # float32 tile: the gradient of the product
    activation: tuple,  # a GatedActivation as a tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The product h = ``gated_product`` and the gradients of gate and up for ``dh``:
    d gate = dh * (u + up_shift) * act'(g) and d up = dh * act(g), each zero where its clamp
    held (at the limit itself the gradient passes, as torch.clamp's does).

    Taught in notebook 11.
    """
    name, alpha, limit, up_shift = activation
    if limit != math.inf:
        gate_free = (gate <= limit).to(torch.float32)
        up_free = ((up >= -limit) & (up <= limit)).to(torch.float32)
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
    if up_shift != 0.0:
        up = up + up_shift
    act = gate_activation(gate, name, alpha)
    d_gate = dh * up * gate_activation_slope(gate, name, alpha)
    d_up = dh * act
    if limit != math.inf:
        d_gate = d_gate * gate_free
        d_up = d_up * up_free
    return act * up, d_gate, d_up
