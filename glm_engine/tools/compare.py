"""Comparing the engine with a reference: how far its logits are, and where two
token outputs part."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def relative_error(ours: "torch.Tensor", reference: "torch.Tensor") -> float:
    """||ours - reference|| / ||reference||, computed in float64 (torch tensors)."""
    reference = reference.double()
    return ((ours.double() - reference).norm() / reference.norm()).item()


def first_divergence(first: list[int], second: list[int]) -> int:
    """Index of the first token where two outputs differ (the shorter length when one
    is a prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
