"""Named feature taps: forward hooks by dotted module path, removed on exit.

A model declares ``taps()`` -> {name: Tap}. ``record(model, names)`` is a context manager
that registers one hook per requested tap and collects outputs into a dict that the caller
reads after the forward pass. Validation happens before any training so a typo fails early
with the valid names listed.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from kdcompress.errors import KdError


@dataclass(frozen=True)
class Tap:
    """Where a named feature lives: the module whose *output* is the feature, and its stride."""

    path: str
    stride: int
    note: str = ""


def check_taps(names: Sequence[str], available: Sequence[str], who: str, needed_by: str | None = None) -> None:
    """The one tap check: a one-line KdError naming the tap, ``who`` lacks it, and the valid taps.

    ``needed_by`` names a method whose *default* taps are asked for (the user typed no tap, so a
    "did you mean" would be noise).
    """
    available = list(available)
    valid = ", ".join(available) or "(none)"
    for name in names:
        if name in available:
            continue
        if needed_by is not None:
            raise KdError(f"method '{needed_by}' needs a {name} tap; {who} has none. Its taps: {valid}")
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KdError(f"Unknown tap '{name}' for {who}.{hint} Valid taps: {valid}")


def validate_taps(model: nn.Module, names: Sequence[str]) -> None:
    """Raise a one-line KdError for tap names the model does not declare."""
    check_taps(names, model.taps(), f"model '{getattr(model, 'arch', type(model).__name__)}'")  # type: ignore[operator]


@contextlib.contextmanager
def record(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the named taps during forward passes inside the block.

    The dict is overwritten by each forward pass; callers should read (and ``clear()``) it
    after every step so no activations are kept alive longer than needed.
    """
    validate_taps(model, names)
    taps = model.taps()  # type: ignore[operator]
    out: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    # DDP wraps the model: resolve paths on the inner module.
    for name in names:
        path = taps[name].path
        mod = modules.get(path)
        if mod is None:
            raise KdError(f"Tap '{name}' points at missing module '{path}' (model definition bug)")

        def hook(_m: nn.Module, _inp: object, output: torch.Tensor, _name: str = name) -> None:
            out[_name] = output

        handles.append(mod.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        out.clear()


@torch.no_grad()
def tap_shapes(model: nn.Module, input_size: tuple[int, int], names: Sequence[str] | None = None,
               batch: int = 1) -> dict[str, torch.Size]:
    """Dry run: shape of every tap for an input of ``input_size`` (H, W). No training."""
    names = list(model.taps()) if names is None else list(names)  # type: ignore[operator]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(batch, 3, *input_size, device=device)
        with record(model, names) as feats:
            model(x)
            shapes = {n: feats[n].shape for n in names}
    finally:
        model.train(was_training)
    return shapes
