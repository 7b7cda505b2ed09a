"""A safe arithmetic calculator (``+ - * / // % **`` and parentheses on numbers)."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from .base import Tool, ToolContext

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


MAX_BITS = 4096  # largest integer result (about 1,233 decimal digits)
MAX_LENGTH = 200  # characters of an expression


def _bits(value: float | int) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 64


def _check_size(op: ast.operator, left: float | int, right: float | int) -> None:
    """Reject an operation whose integer result would exceed ``MAX_BITS``, before computing it."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # float results are bounded (they overflow to an error, see evaluate)
    if isinstance(op, ast.Pow):
        if right < 0 or abs(left) <= 1:
            return  # a float, or 0 / 1 / -1 to any power
        if right > MAX_BITS or _bits(left) * right > MAX_BITS:
            raise ValueError(f"result too large (more than {MAX_BITS} bits)")
    elif isinstance(op, ast.Mult) and _bits(left) + _bits(right) > MAX_BITS:
        raise ValueError(f"result too large (more than {MAX_BITS} bits)")


def evaluate(expression: str) -> float | int:
    """Evaluate an arithmetic expression without ``eval`` (names and calls are rejected).

    Every intermediate integer is bounded by ``MAX_BITS`` *before* it is computed, so no
    expression of ``MAX_LENGTH`` characters runs for more than microseconds: nested powers
    such as ``(((9**64)**64)**64)**64`` are rejected at the second level.
    """

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if isinstance(node.value, int) and _bits(node.value) > MAX_BITS:
                raise ValueError(f"number too large (more than {MAX_BITS} bits)")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            _check_size(node.op, left, right)
            try:
                value = _BINARY[type(node.op)](left, right)
            except (OverflowError, ZeroDivisionError) as exc:
                raise ValueError(f"{type(exc).__name__}: {exc}") from exc
            if isinstance(value, complex):
                raise ValueError("the result is not a real number")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("the result is not finite")
            return value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expression) > MAX_LENGTH:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not an arithmetic expression ({type(exc).__name__})") from exc
    try:
        return walk(tree)
    except RecursionError as exc:
        raise ValueError("expression nested too deeply") from exc


class CalculatorTool(Tool):
    """``calculator(expression)``: the value of an arithmetic expression."""

    name = "calculator"
    description = "Evaluate an arithmetic expression."
    required = {"expression": str}
    argument_schemas = {
        "expression": {
            "description": (
                "Numbers combined with + - * / // % ** and parentheses, e.g. (3 + 4) * 12 "
                f"(at most {MAX_LENGTH} characters)."
            )
        }
    }

    def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        value = evaluate(arguments["expression"])
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def param_text(self, arguments: dict[str, Any]) -> str:
        return arguments["expression"]
