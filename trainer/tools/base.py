"""The tool interface: named, deterministic functions of JSON arguments that return text.

Every tool declares its argument types (checked before it runs), the similarity kind TAPO
uses to compare two of its calls (``cosine`` on encoded parameter text, ``iou`` on boxes)
and how its arguments become a parameter vector (``param_vector``). Tools receive a
``ToolContext`` naming the corpus of the current question, which is also the context key of
the call: calls against different corpora never match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tapo_kernels import encode_text

SIM_KINDS = {"cosine": 0, "iou": 1}  # the tool_sim_kind codes of tapo::fused_correct


@dataclass(frozen=True)
class ToolContext:
    """What a call may depend on besides its arguments (the question's corpus)."""

    corpus_id: int = 0


class ToolArgumentError(ValueError):
    """Arguments that do not fit the tool's declared parameters."""


class Tool(ABC):
    """A deterministic information tool.

    Subclasses set ``name``, ``description``, ``required`` / ``optional`` (argument name ->
    Python type) and implement ``run``. ``param_text`` names the argument text TAPO compares.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    sim_kind: ClassVar[str] = "cosine"
    required: ClassVar[dict[str, type]] = {}
    optional: ClassVar[dict[str, type]] = {}

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        """Return the arguments if they fit the declaration, else raise ``ToolArgumentError``."""
        if not isinstance(arguments, dict):
            raise ToolArgumentError(
                f"arguments of {self.name} must be a JSON object, got {type(arguments).__name__}"
            )
        for arg in self.required:
            if arg not in arguments:
                raise ToolArgumentError(f"{self.name} needs the argument '{arg}'")
        for arg, value in arguments.items():
            tp = self.required.get(arg) or self.optional.get(arg)
            if tp is None:
                allowed = sorted({**self.required, **self.optional})
                raise ToolArgumentError(f"{self.name} has no argument '{arg}' (allowed: {allowed})")
            ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ToolArgumentError(
                    f"argument '{arg}' of {self.name} must be {tp.__name__}, got {value!r}"
                )
        return arguments

    @abstractmethod
    def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        """The observation text for valid arguments (may raise; the registry reports it)."""

    def param_text(self, arguments: dict[str, Any]) -> str:
        """The text of the call that TAPO compares (all argument values by default)."""
        return " ".join(str(arguments[k]) for k in sorted(arguments))

    def param_vector(self, arguments: dict[str, Any]) -> Tensor:
        """``(D,)`` float32 parameter vector (hashed character n-grams of ``param_text``)."""
        return encode_text([self.param_text(arguments)])[0]

    @staticmethod
    def empty_vector() -> Tensor:
        return torch.zeros(encode_text([""]).shape[1], dtype=torch.float32)
