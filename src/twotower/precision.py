"""Computations that stay in float32 (or float64) even under autocast.

Autocast runs matrix products in bfloat16 and decides by op, not by purpose. The Mamba scan and
the MoE router are float32 by design (as in the Mamba kernels and transformers' NemotronH: seeded
SSM states reach O(1e3), and the router's ranking must not depend on the activation dtype), so
they turn autocast off for their own products.
"""

from __future__ import annotations

import functools

import torch


def without_autocast(fn):
    """Decorate `fn(tensor, ...)`: it runs with autocast off on its first argument's device."""

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        if not torch.is_autocast_enabled(first.device.type):  # the common case, without a context's cost
            return fn(first, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper
