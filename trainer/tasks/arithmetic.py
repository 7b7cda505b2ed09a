"""A second, single-turn task for mixed batches: arithmetic the calculator tool can check.

From a seed it draws problems like "What is 487 * 36?" (two operands of 2-3 digits, one of
``+ - *``), whose answer the calculator returns exactly and a tiny model cannot compute in
its head: the policy has to call ``calculator`` with the expression and copy the result.
Each question carries its ground truth: a calculator observation holding the answer is a
*good* call (the same statistics as the search task's evidence). Demonstrations are solved
examples of separate problems (none of them is a training or held-out question).
"""

from __future__ import annotations

import random

from .base import Example, TaskData

OPERATORS = ("+", "-", "*")


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 99)
    op = rng.choice(OPERATORS)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b}", str(value)


def arithmetic_example(uid: str, expression: str, answer: str, corpus_id: int = 0) -> Example:
    return Example(
        uid=uid,
        question=f"What is {expression}?",
        answers=(answer,),
        corpus_id=corpus_id,
        query=expression,
        evidence=((answer,),),
        kind="arithmetic",
        task="arithmetic",
        tool="calculator",
        tool_arg="expression",
    )


def arithmetic_task(
    num_train: int = 256,
    num_heldout: int = 64,
    num_demos: int = 256,
    seed: int = 0,
    corpus_id: int = 0,
) -> TaskData:
    """Distinct problems split into train / held-out / demonstrations (no corpus: the
    calculator needs none; ``corpus_id`` is the context key its calls carry)."""
    rng = random.Random(f"arithmetic-{seed}")
    total = num_train + num_heldout + num_demos
    seen: dict[str, str] = {}
    while len(seen) < total:
        expression, answer = _problem(rng)
        seen.setdefault(expression, answer)
    examples = [
        arithmetic_example(f"arith-{i}", e, a, corpus_id) for i, (e, a) in enumerate(seen.items())
    ]
    return TaskData(
        train=examples[:num_train],
        heldout=examples[num_train : num_train + num_heldout],
        demos=examples[num_train + num_heldout :],
    )
