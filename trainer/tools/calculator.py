"""A safe arithmetic calculator (``+ - * / // % **`` and parentheses on numbers)."""

from __future__ import annotations

import ast
import operator
from typing import Any

from .base import Tool, ToolContext

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> float | int:
    """Evaluate an arithmetic expression without ``eval`` (names and calls are rejected)."""

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression too long")
    return walk(ast.parse(expression, mode="eval"))


class CalculatorTool(Tool):
    """``calculator(expression)``: the value of an arithmetic expression."""

    name = "calculator"
    description = "Evaluate an arithmetic expression."
    required = {"expression": str}

    def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        value = evaluate(arguments["expression"])
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def param_text(self, arguments: dict[str, Any]) -> str:
        return arguments["expression"]
