"""The arguments of the ``tapo`` ops, by name.

The op schemas (``_library.py``) are the one list of every op's arguments: their names,
order and defaults. Python kernels take ``*args, **kwargs`` and read them through ``bind``,
so an argument is spelled in the schema and where it is used, nowhere in between.

The policy-loss ops share two runs of arguments: the loss tensors (``LOSS_TENSORS``, after
the log-probabilities or whatever the op computes them from) and the loss settings
(``knobs.LOSS_KNOBS``, last).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import knobs as _knobs

# name -> schema type, in schema order: the tensors every policy-loss op reads besides logp
_LOSS_TENSOR_TYPES = {
    "old_logp": "Tensor",
    "advantages": "Tensor",
    "mask": "Tensor",
    "ref_logp": "Tensor?",
    "call_map": "Tensor?",
    "call_delta": "Tensor?",
    "importance_weight": "Tensor?",
}
LOSS_TENSORS: tuple[str, ...] = tuple(_LOSS_TENSOR_TYPES)


def loss_tensor_schema() -> str:
    """The loss tensors as op-schema arguments (optional ones default to ``None``)."""
    return ", ".join(
        f"{t} {n}" + ("=None" if t.endswith("?") else "") for n, t in _LOSS_TENSOR_TYPES.items()
    )


class _Signature(NamedTuple):
    names: tuple[str, ...]  # in schema order
    defaults: dict[str, Any]
    tensors: tuple[tuple[str, bool], ...]  # (name, optional) of the tensor arguments


_SIGNATURES: dict[str, _Signature] = {}


def register(op: str) -> None:
    """Read the schema of ``tapo::<op>`` (just defined) once, for ``bind`` & co."""
    arguments = getattr(torch.ops.tapo, op).default._schema.arguments
    _SIGNATURES[op] = _Signature(
        names=tuple(a.name for a in arguments),
        defaults={a.name: a.default_value for a in arguments if a.has_default_value()},
        tensors=tuple(
            (a.name, str(a.type) == "Optional[Tensor]")
            for a in arguments
            if str(a.type) in ("Tensor", "Optional[Tensor]")
        ),
    )


def _signature(op: str) -> _Signature:
    return _SIGNATURES[op]


def names(op: str) -> tuple[str, ...]:
    """The argument names of ``tapo::<op>`` in schema order."""
    return _signature(op).names


def bind(op: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call of ``tapo::<op>`` (positional ``args`` in schema order, then ``kwargs``) as
    ``name -> value`` in schema order, defaults filled in; ``TypeError`` for an unknown or
    missing argument."""
    order, defaults, _ = _signature(op)
    if len(args) > len(order):
        raise TypeError(f"tapo::{op} takes {len(order)} arguments, got {len(args)}")
    bound = dict(zip(order, args, strict=False))
    for name, value in kwargs.items():
        if name not in order:
            raise TypeError(f"tapo::{op} got an unknown argument {name!r}")
        if name in bound:
            raise TypeError(f"tapo::{op} got multiple values for argument {name!r}")
        bound[name] = value
    missing = [n for n in order if n not in bound and n not in defaults]
    if missing:
        raise TypeError(f"tapo::{op} missing arguments {missing}")
    return {n: bound[n] if n in bound else defaults[n] for n in order}


def loss_tensors(bound: dict[str, Any]) -> tuple:
    """The loss tensors of a bound call, in schema order."""
    return tuple(bound[n] for n in LOSS_TENSORS)


def loss_knobs(bound: dict[str, Any]) -> dict[str, Any]:
    """The loss settings of a bound call."""
    return {n: bound[n] for n in _knobs.NAMES}


def tensor_arguments(op: str) -> tuple[tuple[str, bool], ...]:
    """``(name, optional)`` of every tensor argument of ``tapo::<op>``, in schema order."""
    return _signature(op).tensors
