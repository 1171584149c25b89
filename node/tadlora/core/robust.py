"""Robust variants of the mixing step, for neighbours that may send absurd or hostile values.

`--robust-mixing none|clip:TAU|trim:F` picks one; both drivers pass it to `apply_method_mixing`.

* ``clip:TAU`` (centered clipping): every neighbour's difference x_j − x_i is scaled down to norm at most TAU
  (the norm over every tensor that is mixed, as one vector), then the usual MH weights apply:
  x_i ← x_i + Σ_j w_ij clip(x_j − x_i). While no difference exceeds TAU this *is* MH mixing, so the network
  average is preserved exactly. Once a difference is clipped, the average is preserved only if the other end
  clips the mirror difference x_i − x_j by the same factor: the clip is symmetric in norm (‖x_j − x_i‖ =
  ‖x_i − x_j‖) and W stays symmetric, so with the same TAU on both ends of a link the pair's contributions
  still cancel (both ends clip by the same factor). It does not hold when ends use different TAUs, or when one
  neighbour's factors differ on the two ends (they never do in the daemon: both ends mix the same two
  snapshots).
* ``trim:F`` (coordinate-wise trimmed mean): per coordinate, the F largest and F smallest neighbour values are
  dropped; the kept neighbours share the neighbours' total MH weight in proportion to their own weights
  (w_ii is unchanged). With fewer than 2F+1 neighbours nothing is kept and the node keeps its own value. This
  bounds what F hostile neighbours can do, but the network average is **not** preserved in general: the
  dropped values differ from node to node and W is no longer one symmetric matrix.

Pure functions on literal tensors; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["RobustMixing", "clip_differences", "parse_robust_mixing", "trimmed_combination"]


@dataclass(frozen=True)
class RobustMixing:
    """A robust mixing rule: ``clip`` with ``value`` = TAU (> 0), or ``trim`` with ``value`` = F (>= 1)."""

    kind: Literal["clip", "trim"]
    value: float

    def __post_init__(self) -> None:
        if self.kind == "clip" and not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"clip:TAU needs a finite TAU > 0, got {self.value}")
        if self.kind == "trim" and not (self.value >= 1 and float(self.value).is_integer()):
            raise ValueError(f"trim:F needs an integer F >= 1, got {self.value}")
        if self.kind not in ("clip", "trim"):
            raise ValueError(f"unknown robust mixing {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}" if self.kind == "clip" else f"trim:{int(self.value)}"


def parse_robust_mixing(text: str) -> RobustMixing | None:
    """``"none"`` -> None, ``"clip:0.5"`` -> clip with TAU 0.5, ``"trim:1"`` -> trim one value on each side."""
    text = text.strip()
    if text in ("", "none"):
        return None
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("clip", "trim"):
        raise ValueError(f"robust mixing {text!r}: expected none, clip:TAU or trim:F")
    try:
        number = float(value) if kind == "clip" else int(value)
    except ValueError:
        what = "a number" if kind == "clip" else "an integer"
        raise ValueError(f"robust mixing {text!r}: {value!r} is not {what}") from None
    return RobustMixing(kind, float(number))  # type: ignore[arg-type]


def clip_differences(
    own: Mapping[str, torch.Tensor], neighbours: Mapping[Hashable, Mapping[str, torch.Tensor]], tau: float
) -> dict[Hashable, dict[str, torch.Tensor]]:
    """Each neighbour's values moved to x_i + clip(x_j − x_i, TAU) over the keys of ``own`` (float64).

    The norm is taken over all those keys at once (one vector per neighbour); a difference of norm <= TAU is
    kept as it is, a longer one is scaled to norm TAU.
    """
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"TAU must be finite and > 0, got {tau}")
    base = {k: v.detach().to(torch.float64) for k, v in own.items()}
    out: dict[Hashable, dict[str, torch.Tensor]] = {}
    for j, values in neighbours.items():
        diffs = {k: values[k].detach().to(torch.float64) - base[k] for k in base}
        norm = math.sqrt(sum(float(d.square().sum()) for d in diffs.values()))
        scale = 1.0 if norm <= tau else tau / norm
        out[j] = {k: base[k] + diffs[k] * scale for k in base}
    return out


def trimmed_combination(
    own: torch.Tensor,
    neighbours: list[torch.Tensor],
    self_weight: float,
    weights: list[float],
    f: int,
) -> torch.Tensor:
    """w_ii x_i + Σ_j w_ij x_j with, per coordinate, the ``f`` largest and ``f`` smallest neighbour values
    dropped and the kept neighbours' weights rescaled to the neighbours' total weight (float64).

    Ties are broken by neighbour order (a stable sort), so equal inputs give equal outputs on every driver.
    """
    if len(neighbours) != len(weights):
        raise ValueError(f"{len(neighbours)} neighbour values but {len(weights)} weights")
    if f < 1:
        raise ValueError(f"F must be >= 1, got {f}")
    x = own.detach().to(torch.float64)
    n = len(neighbours)
    if n <= 2 * f:  # nothing survives the trim: the neighbours' weight returns to self
        return x.clone()
    values = torch.stack([v.detach().to(torch.float64) for v in neighbours])  # (n, *shape)
    w = torch.tensor(weights, dtype=torch.float64, device=x.device).reshape((n,) + (1,) * x.dim()).expand_as(values)
    order = torch.sort(values, dim=0, stable=True).indices
    kept_values = torch.gather(values, 0, order)[f : n - f]
    kept_weights = torch.gather(w, 0, order)[f : n - f]
    total = float(sum(weights))
    kept_total = kept_weights.sum(dim=0)
    share = torch.where(kept_total > 0, total / kept_total, torch.zeros_like(kept_total))
    return (
        x * self_weight
        + (kept_values * kept_weights).sum(dim=0) * share
        + x * torch.where(kept_total > 0, torch.zeros_like(kept_total), torch.full_like(kept_total, total))
    )
