"""HU <-> the networks' range [-1, 1], by a volume's own min-max (docs/training.md#hu-mapping).

The published loader normalises each volume by its min and max; training, protection, the
white-box loss and export all map back with the exact inverse, so what the attacker sees in
training is what protect.py stores. Works on NumPy arrays and torch tensors alike.
"""
from __future__ import annotations


def span(hu_min: float, hu_max: float) -> float:
    """hu_max - hu_min; a constant volume (no span) maps with a span of 1, not a division by 0."""
    return hu_max - hu_min if hu_max > hu_min else 1.0


def to_net(hu, hu_min: float, hu_max: float):
    """HU -> [-1, 1]: (hu - hu_min) / span * 2 - 1."""
    return (hu - hu_min) / span(hu_min, hu_max) * 2.0 - 1.0


def to_hu(v, hu_min: float, hu_max: float):
    """[-1, 1] -> HU: the exact inverse of to_net."""
    return (v + 1.0) / 2.0 * span(hu_min, hu_max) + hu_min
