"""The tool interface: named, deterministic functions of JSON arguments that return text.

Every tool declares its argument types (checked before it runs), the similarity kind TAPO
uses to compare two of its calls (``cosine`` on parameter vectors, ``iou`` on boxes) and
what its parameter vector encodes (``witness``): its ``arguments`` (the text of
``param_text``, hashed character 3-grams) or its ``results`` (the references a call
retrieved, for tools whose results define when two calls are equivalent). Tools receive a
``ToolContext`` naming the corpus of the current question, which is also the context key of
the call: calls against different corpora never match.

``Tool.schema()`` describes a tool as an OpenAI-style function (JSON Schema of its
arguments), built from the same ``required`` / ``optional`` declarations the parser checks
calls against, so the names and types a chat template shows the model are the ones a call
must use.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

SIM_KINDS = {"cosine": 0, "iou": 1}  # the tool_sim_kind codes of tapo::fused_correct
WITNESS_KINDS = ("arguments", "results")
# the JSON Schema type of each Python argument type a tool may declare
JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class ToolResult:
    """What ``Tool.run`` may return instead of plain text: the observation and the
    references (e.g. document texts or ids) it was built from."""

    text: str
    refs: tuple[str, ...] = ()
    image: bytes | None = None  # an image observation, PNG-encoded (e.g. a zoomed region)


@dataclass(frozen=True)
class ToolContext:
    """What a call may depend on besides its arguments (the question's corpus)."""

    corpus_id: int = 0
    # the images of the episode so far, each as the region (x1, y1, x2, y2) of the
    # question's scene it shows, in normalised coordinates (image 0: the whole scene)
    views: tuple[tuple[float, float, float, float], ...] = ()


class ToolArgumentError(ValueError):
    """Arguments that do not fit the tool's declared parameters."""


class Tool(ABC):
    """A deterministic information tool.

    Subclasses set ``name``, ``description``, ``required`` / ``optional`` (argument name ->
    Python type), optionally ``argument_schemas`` (argument name -> JSON Schema details such
    as its description, merged over the declared type in ``schema()``) and implement
    ``run``. ``param_text`` names the argument text TAPO compares when
    ``witness = "arguments"``; with ``witness = "results"`` it compares the references of
    the ``ToolResult`` that ``run`` returned.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    sim_kind: ClassVar[str] = "cosine"
    witness: ClassVar[str] = "arguments"
    required: ClassVar[dict[str, type]] = {}
    optional: ClassVar[dict[str, type]] = {}
    argument_schemas: ClassVar[dict[str, dict[str, Any]]] = {}

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function: ``{"type": "function", "function": {"name",
        "description", "parameters"}}``, ``parameters`` being the JSON Schema of the arguments
        ``check_arguments`` accepts (required ones first, in declaration order)."""
        properties = {}
        for arg, tp in {**self.required, **self.optional}.items():
            details = copy.deepcopy(self.argument_schemas.get(arg, {}))
            properties[arg] = {"type": JSON_TYPES[tp], **details}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": list(self.required),
                },
            },
        }

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
    def run(self, arguments: dict[str, Any], context: ToolContext) -> str | ToolResult:
        """The observation for valid arguments (may raise; the registry reports it)."""

    def param_text(self, arguments: dict[str, Any]) -> str:
        """The text of the call that TAPO compares (all argument values by default)."""
        return " ".join(str(arguments[k]) for k in sorted(arguments))
