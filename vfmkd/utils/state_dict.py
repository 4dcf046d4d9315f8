"""Strict state-dict loading: every key present, none extra, every shape equal, or one clear error.

``torch.nn.Module.load_state_dict(strict=True)`` stops at the first shape that does not
fit and lists keys without a limit. :func:`load_state_dict_strict` first compares the
whole state dict with the module's and raises one ``ValueError`` that names the source
(the file, the teacher, the variant), counts each kind of problem and lists its first
keys, with the caller's hint on what the file probably is::

    checkpoint vit.pth for ViT backbone 'tiny' does not fit: 12 missing keys: blocks.11.norm1.weight,
    ... (+2 more); 1 shape mismatch: pos_embed (checkpoint (1, 197, 192), model (1, 17, 192)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "MAX_LISTED_KEYS",
    "StateDictProblems",
    "check_state_dict",
    "list_keys",
    "load_state_dict_strict",
    "state_dict_problems",
]

# Keys listed per kind of problem; the rest are counted.
MAX_LISTED_KEYS = 10

Shape = tuple[int, ...]


def list_keys(keys: Sequence[str], limit: int = MAX_LISTED_KEYS) -> str:
    """``"a, b, c (+2 more)"``: the first ``limit`` keys and how many are left out."""
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


@dataclass(frozen=True)
class StateDictProblems:
    """How a state dict differs from what a module expects; false when it fits.

    Attributes:
        missing: the module's keys that the state dict lacks, in the module's order.
        unexpected: keys the module does not have, in the state dict's order.
        mismatched: key -> (shape in the state dict, shape in the module).
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, tuple[Shape, Shape]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = MAX_LISTED_KEYS) -> str:
        """``"12 missing keys: a, b, ... (+2 more); 1 unexpected key: c; 1 shape mismatch: d (...)"``."""
        mismatched = [f"{key} (checkpoint {given}, model {own})" for key, (given, own) in self.mismatched.items()]
        parts = [
            f"{len(items)} {_plural(label, len(items))}: {list_keys(items, limit)}"
            for label, items in (("missing key", self.missing), ("unexpected key", self.unexpected),
                                 ("shape mismatch", mismatched))
            if items
        ]
        return "; ".join(parts)


def _plural(label: str, count: int) -> str:
    if count == 1:
        return label
    return label + ("es" if label.endswith("h") else "s")


def state_dict_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> StateDictProblems:
    """Compare ``state_dict`` with ``expected`` (a module's ``state_dict()``; meta tensors are fine)."""
    return StateDictProblems(
        missing=[key for key in expected if key not in state_dict],
        unexpected=[key for key in state_dict if key not in expected],
        mismatched={
            key: (tuple(value.shape), tuple(expected[key].shape))
            for key, value in state_dict.items()
            if key in expected and tuple(value.shape) != tuple(expected[key].shape)
        },
    )


Hint = str | Callable[[StateDictProblems], str] | None


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, hint: Hint = None) -> None:
    """Raise unless ``state_dict`` has exactly ``module``'s keys, with the same shapes.

    Args:
        module: the module the tensors are for (may live on the meta device).
        state_dict: the tensors.
        source: what is loaded into what, the subject of the message (e.g.
            ``"checkpoint a.pth for ViT backbone 'tiny'"``).
        hint: appended to the message: what the file probably is and what to do; a
            callable gets the problems (e.g. to spot a classifier of another size).

    Raises:
        ValueError: ``"<source> does not fit: <problems>. <hint>"``, each kind of problem
            counted with its first :data:`MAX_LISTED_KEYS` keys.
    """
    problems = state_dict_problems(module.state_dict(), state_dict)
    if not problems:
        return
    advice = hint(problems) if callable(hint) else hint
    raise ValueError(f"{source} does not fit: {problems.describe()}." + (f" {advice}" if advice else ""))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, hint: Hint = None) -> None:
    """:func:`check_state_dict`, then ``module.load_state_dict(state_dict, strict=True)``.

    Args:
        module: the module to fill.
        state_dict: its tensors, in its key names.
        source: what is loaded into what, for the message.
        hint: see :func:`check_state_dict`.

    Raises:
        ValueError: listing missing, unexpected and shape-mismatched keys.
    """
    check_state_dict(module, state_dict, source=source, hint=hint)
    module.load_state_dict(state_dict, strict=True)
