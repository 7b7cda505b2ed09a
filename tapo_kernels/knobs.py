"""The policy-loss settings ("knobs"), defined once.

``LOSS_KNOBS`` lists every setting of ``tapo::policy_loss`` and the fused front ends: its name,
its type in the op schema and its default. The op schemas (``_library.py``) are generated
from it, the Python kernels bind their trailing arguments with ``bind``, and the front doors
merge presets with ``resolve``. Adding a knob is an edit here, in the math
(``reference.py``, ``docs/math.md``) and in the kernels that use it (C++ and Triton).
"""

from __future__ import annotations

from typing import Any

from . import _checks

# (name, schema type, default), in schema order
LOSS_KNOBS: tuple[tuple[str, str, Any], ...] = (
    ("algo", "str", "grpo"),
    ("eps_low", "float", 0.2),
    ("eps_high", "float", 0.2),
    ("dual_clip_c", "float", 3.0),
    ("tau_pos", "float", 1.0),
    ("tau_neg", "float", 1.05),
    ("kl_coef", "float", 0.0),
    ("kl_type", "str", "k3"),
    ("agg", "str", "token-mean"),
    ("norm_const", "float?", None),
    ("global_count", "float?", None),
)
NAMES: tuple[str, ...] = tuple(name for name, _, _ in LOSS_KNOBS)
DEFAULTS: dict[str, Any] = {name: default for name, _, default in LOSS_KNOBS}

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
    return ", ".join(f"{kind} {name}={_literal(default)}" for name, kind, default in LOSS_KNOBS)


def bind(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The knobs of a kernel call (trailing positional ``args`` in schema order, then
    ``kwargs``) as a complete dict, defaults filled in."""
    if len(args) > len(NAMES):
        raise TypeError(f"too many loss settings: {len(args)} given, {len(NAMES)} exist")
    knobs = dict(DEFAULTS)
    knobs.update(zip(NAMES, args, strict=False))
    unknown = set(kwargs) - set(NAMES)
    if unknown:
        raise TypeError(f"unknown policy loss arguments {sorted(unknown)}; expected {list(NAMES)}")
    knobs.update(kwargs)
    return knobs


def resolve(preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every knob: schema defaults, then the preset, then ``overrides``; types and ranges
    checked with errors that name the knob (``TypeError`` / ``ValueError``)."""
    unknown = set(overrides) - set(NAMES)
    if unknown:
        raise TypeError(f"unknown policy loss arguments {sorted(unknown)}; expected {list(NAMES)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    merged = {**DEFAULTS, **(PRESETS[preset] if preset else {}), **overrides}
    _checks.check_loss_knobs(**merged)
    return merged
