"""The policy-loss settings ("knobs"), defined once.

``LOSS_KNOBS`` lists every setting of ``tapo::policy_loss`` and the fused front ends: its name,
its type in the op schema, its default and its rule (the accepted values). The op schemas
(``_library.py``) are generated from it, the Python kernels bind their trailing arguments with
``bind``, the front doors merge presets with ``resolve``, and ``check`` validates knobs against
the rules (the Python side of every backend; ``_checks.check_policy_loss`` calls it). Adding a
knob is a row here, the math (``reference.py``, ``docs/math.md``) and the kernels that use it
(C++, which checks the same rule with the same message, and Triton).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._numbers import finite32, number

# The choices of the string knobs (docs/math.md, section 3). The kernels number them in this
# order (ops/policy_loss.py: ALGO_IDS, KL_IDS, AGG_IDS).
ALGOS = ("grpo", "gspo", "sapo", "gspo-seq")
KL_TYPES = ("k1", "k2", "k3")
AGGS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
)


class Range(NamedTuple):
    """One condition on a number knob: ``ok(value)``, else ``ValueError("<knob> must be
    <phrase>, got <value>")``. A knob's ranges are checked in order, the first failing one
    raises."""

    ok: Callable[[float], bool]
    phrase: str


FINITE = Range(finite32, "finite")
AT_LEAST_0 = Range(lambda v: finite32(v) and v >= 0.0, "finite and >= 0")
ABOVE_0 = Range(lambda v: finite32(v) and v > 0.0, "finite and > 0")


class Knob(NamedTuple):
    """A row of ``LOSS_KNOBS``."""

    name: str
    kind: str  # type in the op schema: "str", "float", or "float?" (optional: None allowed)
    default: Any
    rule: tuple  # "str": the choices (strings); numbers: the ranges (Range), in order


# in schema order
LOSS_KNOBS: tuple[Knob, ...] = (
    Knob("algo", "str", "grpo", ALGOS),
    Knob(
        "eps_low",
        "float",
        0.2,
        (
            AT_LEAST_0,
            Range(lambda v: v < 1.0, "< 1 (the ratio floor 1 - eps_low must stay positive)"),
        ),
    ),
    Knob("eps_high", "float", 0.2, (AT_LEAST_0,)),
    Knob(
        "dual_clip_c",
        "float",
        3.0,
        (Range(lambda v: finite32(v) and (v == 0.0 or v > 1.0), "0 (off) or > 1"),),
    ),
    Knob("tau_pos", "float", 1.0, (ABOVE_0,)),
    Knob("tau_neg", "float", 1.05, (ABOVE_0,)),
    Knob("kl_coef", "float", 0.0, (FINITE,)),
    Knob("kl_type", "str", "k3", KL_TYPES),
    Knob("agg", "str", "token-mean", AGGS),
    Knob("norm_const", "float?", None, (ABOVE_0,)),
    Knob("global_count", "float?", None, (ABOVE_0,)),
)
NAMES: tuple[str, ...] = tuple(k.name for k in LOSS_KNOBS)
DEFAULTS: dict[str, Any] = {k.name: k.default for k in LOSS_KNOBS}

# Named presets matching the public recipes (docs/math.md, section 3). Any knob can be
# overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(
        algo="grpo",
        eps_low=0.2,
        eps_high=0.2,
        dual_clip_c=3.0,
        kl_type="k3",
        agg="seq-mean-token-mean",
    ),
    "dapo": dict(algo="grpo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, agg="token-mean"),
    "dr_grpo": dict(
        algo="grpo", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, agg="seq-mean-token-sum-norm"
    ),
    "gspo": dict(
        algo="gspo", eps_low=3e-4, eps_high=4e-4, dual_clip_c=0.0, agg="seq-mean-token-mean"
    ),
    "gspo_seq": dict(
        algo="gspo-seq", eps_low=3e-4, eps_high=4e-4, dual_clip_c=0.0, agg="seq-mean-token-mean"
    ),
    "sapo": dict(algo="sapo", tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"),
}


def _literal(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def schema_args() -> str:
    """The knobs as op-schema arguments: ``str algo="grpo", float eps_low=0.2, ...``."""
    return ", ".join(f"{k.kind} {k.name}={_literal(k.default)}" for k in LOSS_KNOBS)


def bind(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The knobs of a kernel call (trailing positional ``args`` in schema order, then
    ``kwargs``) as a complete dict, defaults filled in."""
    if len(args) > len(NAMES):
        raise TypeError(f"too many loss settings: {len(args)} given, {len(NAMES)} exist")
    knobs = dict(DEFAULTS)
    knobs.update(zip(NAMES, args, strict=False))
    _unknown(kwargs)
    knobs.update(kwargs)
    return knobs


def resolve(preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every knob: schema defaults, then the preset, then ``overrides``; types and ranges
    checked with errors that name the knob (``TypeError`` / ``ValueError``)."""
    _unknown(overrides)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    merged = {**DEFAULTS, **(PRESETS[preset] if preset else {}), **overrides}
    check(merged)
    return merged


def _unknown(names: Any) -> None:
    unknown = set(names) - set(NAMES)
    if unknown:
        raise TypeError(f"unknown policy loss arguments {sorted(unknown)}; expected {list(NAMES)}")


def check(knobs: dict[str, Any]) -> None:
    """Types and ranges of ``knobs`` (name -> value; every knob given is checked) by the rules
    of ``LOSS_KNOBS``, with errors that name the knob: ``TypeError`` for an unknown name or a
    number knob that is not a Python number, ``ValueError`` for a string outside its choices
    or a number outside its range. Choices first, then types, then ranges, in table order."""
    _unknown(knobs)
    given = [(k, knobs[k.name]) for k in LOSS_KNOBS if k.name in knobs]
    for k, v in given:
        if k.kind == "str" and (not isinstance(v, str) or v not in k.rule):
            raise ValueError(f"unknown {k.name} {v!r}; expected one of {k.rule}")
    numbers = [(k, v) for k, v in given if k.kind != "str"]
    for k, v in numbers:
        number(k.name, v, optional=k.kind.endswith("?"))
    for k, v in numbers:
        if v is None:
            continue
        for r in k.rule:
            if not r.ok(v):
                raise ValueError(f"{k.name} must be {r.phrase}, got {v}")
