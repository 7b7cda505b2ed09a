"""The ``tapo`` op library: schemas, fake kernels, autograd, backend registration.

Every op is defined here exactly once. Backends attach through the dispatcher:

* CPU: the C++ kernels of ``tapo_kernels._C`` (``TORCH_LIBRARY_IMPL(tapo, CPU, m)``) when
  the native build is present, else the pure-torch reference (validated in Python).
  ``TAPO_DISABLE_NATIVE=1`` forces the reference even when the build exists. The native
  build also registers the autograd of ``policy_loss`` for CPU tensors in C++ (AutogradCPU).
* CUDA: the Triton launchers in ``tapo_kernels/ops/``, imported on first call, so that
  ``import tapo_kernels`` neither imports Triton nor initialises CUDA.
* Meta/fake: shape-only kernels, so the ops trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from . import _args, _checks, reference
from . import fused as _fused  # the composite kernels of the logits / hidden-state ops
from . import knobs as _knobs
from . import vocab as _vocab  # the chunked torch vocabulary passes
from .reference import METRIC_NAMES

lib = torch.library.Library("tapo", "DEF")  # noqa: TOR901 (the library lives for the process)

FUSED_CORRECT_SCHEMA = (
    "fused_correct(Tensor advantages, Tensor seq_advantages, Tensor group_ids, Tensor call_seq, "
    "Tensor call_start, Tensor call_end, Tensor call_tool, Tensor call_key, Tensor call_params, "
    "Tensor tool_sim_kind, float theta, float alpha_min, float beta, bool batch_scope, "
    "bool coverage=True) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_LOSS_TENSOR_ARGS = _args.loss_tensor_schema()  # old_logp ... call_delta
_LOSS_KNOB_ARGS = _knobs.schema_args()  # algo ... global_count, defined once in knobs.py
_LOSS_ARGS = f"Tensor logp, {_LOSS_TENSOR_ARGS}, {_LOSS_KNOB_ARGS}"
POLICY_LOSS_SCHEMA = f"policy_loss({_LOSS_ARGS}) -> (Tensor, Tensor)"
POLICY_LOSS_BACKWARD_SCHEMA = f"policy_loss_backward(Tensor grad_loss, {_LOSS_ARGS}) -> Tensor"
# (loss, metrics, d loss / d logp for d loss = 1): value and gradient from one token pass
POLICY_LOSS_WITH_GRAD_SCHEMA = f"policy_loss_with_grad({_LOSS_ARGS}) -> (Tensor, Tensor, Tensor)"


def _define(schema: str) -> None:
    """Define the op and index its arguments by name (``_args``)."""
    lib.define(schema)
    _args.register(schema.split("(", 1)[0])


_define(FUSED_CORRECT_SCHEMA)
_define(POLICY_LOSS_SCHEMA)
_define(POLICY_LOSS_BACKWARD_SCHEMA)
_define(POLICY_LOSS_WITH_GRAD_SCHEMA)

OPS = ("fused_correct", "policy_loss", "policy_loss_backward", "policy_loss_with_grad")

# --------------------------------------------------------------------------------------
# fake (meta) kernels
# --------------------------------------------------------------------------------------


def _register_fake(qualname: str):
    """``register_fake`` with a device check first: the dispatcher runs the fake kernel when
    any input is a ``meta`` tensor, so a meta tensor among real ones must be an error naming
    the argument, not shape-only outputs of uninitialised memory on the real device."""
    name = qualname.split("::", 1)[1]

    def wrap(fake):
        def checked(*args, **kwargs):
            schema = getattr(torch.ops.tapo, name).default._schema
            names = [a.name for a in schema.arguments]
            bound = list(zip(names, args, strict=False)) + list(kwargs.items())
            tensors = [(n, a) for n, a in bound if isinstance(a, torch.Tensor)]
            if tensors:
                first_name, first = tensors[0]
                for arg_name, t in tensors[1:]:
                    if t.device != first.device:
                        raise ValueError(
                            f"{arg_name} is on {t.device} but {first_name} is on "
                            f"{first.device}: every tensor of tapo::{name} must be on one device"
                        )
            return fake(*args, **kwargs)

        return torch.library.register_fake(qualname)(checked)

    return wrap


@_register_fake("tapo::fused_correct")
def _fused_correct_fake(advantages, seq_advantages, group_ids, call_seq, *rest):
    n = call_seq.shape[0]
    return (
        torch.empty_like(advantages),
        advantages.new_empty((n,)),
        advantages.new_empty((n,)),
        advantages.new_empty((n,), dtype=torch.int64),
    )


@_register_fake("tapo::policy_loss")
def _policy_loss_fake(logp, *rest):
    return logp.new_empty(()), logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32)


@_register_fake("tapo::policy_loss_backward")
def _policy_loss_backward_fake(grad_loss, logp, *rest):
    return torch.empty_like(logp)


@_register_fake("tapo::policy_loss_with_grad")
def _policy_loss_with_grad_fake(logp, *rest):
    # the gradient is a new contiguous (B, T) tensor, whatever logp's strides
    grad = logp.new_empty(logp.shape)
    return logp.new_empty(()), logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32), grad


# --------------------------------------------------------------------------------------
# autograd: the loss is differentiable with respect to logp only
# --------------------------------------------------------------------------------------

_N_LOSS_TENSORS = 1 + len(_args.LOSS_TENSORS)  # logp, then the loss tensors, then the knobs


def _policy_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_N_LOSS_TENSORS])
    ctx.knobs = inputs[_N_LOSS_TENSORS:]  # in schema order


def _policy_loss_backward(ctx, grad_loss, grad_metrics):
    grad_logp = torch.ops.tapo.policy_loss_backward(grad_loss, *ctx.saved_tensors, *ctx.knobs)
    return (grad_logp,) + (None,) * (_N_LOSS_TENSORS + len(ctx.knobs) - 1)


# The Autograd alias kernel: CUDA (Triton) and the reference build. The native build also
# registers a C++ kernel at AutogradCPU (csrc/policy_loss.cpp), which takes precedence for CPU
# tensors: it runs tapo::policy_loss_with_grad and saves only the gradient.
torch.library.register_autograd(
    "tapo::policy_loss", _policy_loss_backward, setup_context=_policy_loss_setup_context
)


# tapo::policy_loss_with_grad returns its own gradient: none of its outputs is differentiable
# (they never require grad, whatever the inputs).
def _policy_loss_with_grad_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _policy_loss_with_grad_backward(ctx, *grads):  # pragma: no cover - outputs never need it
    raise RuntimeError("tapo::policy_loss_with_grad is not differentiable")


torch.library.register_autograd(
    "tapo::policy_loss_with_grad",
    _policy_loss_with_grad_backward,
    setup_context=_policy_loss_with_grad_setup_context,
)

# --------------------------------------------------------------------------------------
# Python kernels: the validated reference (CPU fallback) and the lazy Triton launchers
# --------------------------------------------------------------------------------------


def fused_correct_reference_kernel(*args, **kwargs):
    """Reference implementation of ``tapo::fused_correct`` with full input validation."""
    call = _args.bind("fused_correct", args, kwargs)
    _checks.check_fused_correct(**call)
    return reference.fused_correct(**call)


def _loss_call(op: str, args: tuple, kwargs: dict) -> tuple:
    """``(logp, loss tensors, knobs)`` of a call of a policy-loss op, validated."""
    call = _args.bind(op, args, kwargs)
    tensors, knobs = _args.loss_tensors(call), _args.loss_knobs(call)
    _checks.check_policy_loss(call["logp"], tensors, knobs)
    return call["logp"], tensors, knobs


def policy_loss_reference_kernel(*args, **kwargs):
    """Reference implementation of ``tapo::policy_loss`` with full input validation."""
    logp, tensors, knobs = _loss_call("policy_loss", args, kwargs)
    return reference.policy_loss(logp, *tensors, **knobs)


@contextlib.contextmanager
def _autograd_enabled():
    """Run autograd inside a kernel even where the dispatcher has excluded the autograd keys.

    The reference backward differentiates ``reference.policy_loss`` with autograd. Below the
    autograd layer (e.g. under the dispatch modes of ``torch.library.opcheck``) the autograd
    keys are in the thread-local exclude set, so they are removed from it for this block.
    """
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradCPU, K.AutogradCUDA, K.AutogradOther, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def policy_loss_backward_reference_kernel(grad_loss, *args, **kwargs):
    """Backward of the reference policy loss: autograd through ``reference.policy_loss``."""
    logp, tensors, knobs = _loss_call("policy_loss", args, kwargs)
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must have one element, got shape {tuple(grad_loss.shape)}")
    with _autograd_enabled():
        x = logp.detach().requires_grad_(True)
        loss, _ = reference.policy_loss(x, *tensors, **knobs)
        (grad,) = torch.autograd.grad(loss, x, grad_loss.reshape(()).to(loss.dtype))
    return grad


def policy_loss_with_grad_reference_kernel(*args, **kwargs):
    """Reference ``tapo::policy_loss_with_grad``: the reference forward, then autograd for
    d loss / d logp (d loss = 1). Outputs are detached; the gradient is contiguous."""
    logp, tensors, knobs = _loss_call("policy_loss_with_grad", args, kwargs)
    with _autograd_enabled():
        x = logp.detach().requires_grad_(True)
        loss, metrics = reference.policy_loss(x, *tensors, **knobs)
        (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad.contiguous()


def policy_loss_with_grad_cuda_kernel(logp, *args, **kwargs):
    """``tapo::policy_loss_with_grad`` on CUDA: the Triton forward and backward ops."""
    loss, metrics = torch.ops.tapo.policy_loss(logp, *args, **kwargs)
    one = torch.ones((), dtype=logp.dtype, device=logp.device)
    grad = torch.ops.tapo.policy_loss_backward(one, logp, *args, **kwargs)
    return loss, metrics, grad.contiguous()


_REFERENCE_KERNELS = {
    "fused_correct": fused_correct_reference_kernel,
    "policy_loss": policy_loss_reference_kernel,
    "policy_loss_backward": policy_loss_backward_reference_kernel,
    "policy_loss_with_grad": policy_loss_with_grad_reference_kernel,
}


def _triton_kernel(op: str):
    """A CUDA kernel that imports its Triton module on first use (falls back to the reference)."""

    def kernel(*args, **kwargs):
        try:
            from . import ops as triton_ops  # imports triton
        except ImportError:  # pragma: no cover - CUDA machine without triton
            return _REFERENCE_KERNELS[op](*args, **kwargs)
        return getattr(triton_ops, f"{op}_triton")(*args, **kwargs)

    kernel.__name__ = f"{op}_cuda"
    return kernel


# --------------------------------------------------------------------------------------
# backend registration
# --------------------------------------------------------------------------------------

NATIVE_ERROR: str | None = None
if os.environ.get("TAPO_DISABLE_NATIVE", "0") == "1":
    NATIVE_ERROR = "disabled by TAPO_DISABLE_NATIVE=1"
else:
    if importlib.util.find_spec("tapo_kernels._C") is None:  # the native build is optional
        NATIVE_ERROR = "native extension not built (pip install --no-build-isolation -e .)"
    else:
        from . import _C  # noqa: F401  (registers the C++ CPU kernels on load)


def _has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tapo::{op}", "CPU")


CPU_BACKEND = {}
for _op in OPS:
    if _has_cpu_kernel(_op):
        CPU_BACKEND[_op] = "native"
    else:
        lib.impl(_op, _REFERENCE_KERNELS[_op], "CPU")
        CPU_BACKEND[_op] = "reference"
    if _op == "policy_loss_with_grad":  # no Triton kernel of its own
        lib.impl(_op, policy_loss_with_grad_cuda_kernel, "CUDA")
    else:
        lib.impl(_op, _triton_kernel(_op), "CUDA")


# ======================================================================================
# Fused front ends: the policy loss from logits or from hidden states (docs/math.md, section 5)
# ======================================================================================

POLICY_LOSS_FROM_LOGITS_SCHEMA = (
    f"policy_loss_from_logits(Tensor logits, Tensor labels, {_LOSS_TENSOR_ARGS}, "
    f"float temperature=1.0, bool with_entropy=False, bool inplace_backward=False, "
    f"{_LOSS_KNOB_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)"
)
POLICY_LOSS_FROM_HIDDEN_SCHEMA = (
    f"policy_loss_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
    f"{_LOSS_TENSOR_ARGS}, float temperature=1.0, bool with_entropy=False, "
    f"int? chunk_size=None, {_LOSS_KNOB_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)"
)
# Backward ops take d loss / d logp (from tapo::policy_loss_backward), not the loss arguments.
SELECTIVE_LOG_SOFTMAX_BACKWARD_SCHEMA = (
    "selective_log_softmax_backward(Tensor grad_logp, Tensor logits, Tensor labels, "
    "Tensor logp, float temperature=1.0) -> Tensor"
)
SELECTIVE_LOG_SOFTMAX_BACKWARD_INPLACE_SCHEMA = (
    "selective_log_softmax_backward_inplace(Tensor grad_logp, Tensor(a!) logits, Tensor labels, "
    "Tensor logp, float temperature=1.0) -> ()"
)
SELECTIVE_LOG_SOFTMAX_FROM_HIDDEN_BACKWARD_SCHEMA = (
    "selective_log_softmax_from_hidden_backward(Tensor grad_logp, Tensor hidden, Tensor weight, "
    "Tensor? bias, Tensor labels, Tensor logp, float temperature=1.0, int? chunk_size=None, "
    "bool weight_grad=True, bool bias_grad=True) -> (Tensor, Tensor, Tensor)"
)

_define(POLICY_LOSS_FROM_LOGITS_SCHEMA)
_define(POLICY_LOSS_FROM_HIDDEN_SCHEMA)
_define(SELECTIVE_LOG_SOFTMAX_BACKWARD_SCHEMA)
_define(SELECTIVE_LOG_SOFTMAX_BACKWARD_INPLACE_SCHEMA)
_define(SELECTIVE_LOG_SOFTMAX_FROM_HIDDEN_BACKWARD_SCHEMA)

# Internal ops: the vocabulary passes (selective log-softmax rows, dlogits rows, the chunked
# LM-head passes). The composite kernels of the public ops (fused.py) validate the inputs, then
# call these; the dispatcher picks C++ (csrc/logprob.cpp, when built) or the chunked torch
# passes (vocab.py) on the CPU, Triton on CUDA.
NATIVE_LOGPROB_SCHEMAS = (
    "_logprob_rows(Tensor logits, Tensor labels, float temperature, bool with_entropy) "
    "-> (Tensor, Tensor)",
    "_dlogits_rows(Tensor grad_logp, Tensor logits, Tensor labels, Tensor logp, "
    "float temperature, Tensor(a!) out, Tensor? grad_entropy=None, Tensor? entropy=None) -> ()",
    "_logprob_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
    "float temperature, bool with_entropy, int chunk) -> (Tensor, Tensor)",
    "_logprob_from_hidden_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor labels, Tensor logp, float temperature, int chunk, bool weight_grad, "
    "bool bias_grad, Tensor? grad_entropy=None, Tensor? entropy=None) -> (Tensor, Tensor, Tensor)",
)
for _schema in NATIVE_LOGPROB_SCHEMAS:
    _define(_schema)
NATIVE_LOGPROB_OPS = tuple(s.split("(", 1)[0] for s in NATIVE_LOGPROB_SCHEMAS)
NATIVE_LOGPROB = all(_has_cpu_kernel(op) for op in NATIVE_LOGPROB_OPS)


def _triton_pass(op: str):
    """The CUDA kernel of an internal vocabulary op: its Triton pass, imported on first use
    (the chunked torch pass on a CUDA machine without Triton)."""
    name = {
        "_logprob_rows": "logprob_rows",
        "_dlogits_rows": "dlogits_rows",
        "_logprob_from_hidden": "logprob_from_hidden",
        "_logprob_from_hidden_backward": "logprob_from_hidden_backward",
    }[op]

    def kernel(*args):
        try:
            from .ops import logprob_loss as triton_passes  # imports triton
        except ImportError:  # pragma: no cover - CUDA machine without triton
            return _vocab.PASSES[op](*args)
        return getattr(triton_passes.TRITON, name)(*args)

    kernel.__name__ = f"{op}_cuda"
    return kernel


for _op in NATIVE_LOGPROB_OPS:
    if not NATIVE_LOGPROB:
        lib.impl(_op, _vocab.PASSES[_op], "CPU")
    lib.impl(_op, _triton_pass(_op), "CUDA")

LOGPROB_OPS = (
    "policy_loss_from_logits",
    "policy_loss_from_hidden",
    "selective_log_softmax_backward",
    "selective_log_softmax_backward_inplace",
    "selective_log_softmax_from_hidden_backward",
)


def _logprob_outputs_fake(like: torch.Tensor, B: int, T: int, with_entropy: bool):
    f32 = torch.float32
    entropy = like.new_empty((B, T) if with_entropy else (0,), dtype=f32)
    return (
        like.new_empty((), dtype=f32),
        like.new_empty((len(METRIC_NAMES),), dtype=f32),
        like.new_empty((B, T), dtype=f32),
        entropy,
    )


@_register_fake("tapo::policy_loss_from_logits")
def _policy_loss_from_logits_fake(*args, **kwargs):
    call = _args.bind("policy_loss_from_logits", args, kwargs)
    logits = call["logits"]
    return _logprob_outputs_fake(logits, *logits.shape[:2], call["with_entropy"])


@_register_fake("tapo::policy_loss_from_hidden")
def _policy_loss_from_hidden_fake(*args, **kwargs):
    call = _args.bind("policy_loss_from_hidden", args, kwargs)
    hidden = call["hidden"]
    return _logprob_outputs_fake(hidden, *hidden.shape[:2], call["with_entropy"])


@_register_fake("tapo::selective_log_softmax_backward")
def _selective_log_softmax_backward_fake(grad_logp, logits, *rest):
    return torch.empty_like(logits)


@_register_fake("tapo::selective_log_softmax_backward_inplace")
def _selective_log_softmax_backward_inplace_fake(grad_logp, logits, *rest):
    return None


def _hidden_backward_fake(op: str):
    """The fake kernel of a hidden-state backward op: ``(dhidden, dweight, dbias)``, the last
    two empty when not asked for."""

    def fake(*args, **kwargs):
        call = _args.bind(op, args, kwargs)
        hidden, weight, bias = call["hidden"], call["weight"], call["bias"]
        dweight = torch.empty_like(weight) if call["weight_grad"] else weight.new_empty((0,))
        want_bias = bias is not None and call["bias_grad"]
        dbias = torch.empty_like(bias) if want_bias else hidden.new_empty((0,))
        return torch.empty_like(hidden), dweight, dbias

    return fake


_register_fake("tapo::selective_log_softmax_from_hidden_backward")(
    _hidden_backward_fake("selective_log_softmax_from_hidden_backward")
)


# autograd: d loss / d logp from tapo::policy_loss_backward (tiny), then one pass over the
# logits (or one chunked pass over the LM head) turns it into the input gradients.


def _save_front_call(ctx, op: str, inputs: tuple, output: tuple, leading: tuple[str, ...]):
    """Save what the backward of a front-end op needs: its ``leading`` tensors, logp and
    entropy (outputs), the loss tensors; its other arguments and the knobs as attributes.

    The entropy is differentiable (an entropy bonus adds its gradient to the loss's); the
    metrics and logp are not."""
    call = dict(zip(_args.names(op), inputs, strict=True))
    leading_tensors = (call[n] for n in leading)
    ctx.save_for_backward(*leading_tensors, output[2], output[3], *_args.loss_tensors(call))
    ctx.call = {n: v for n, v in call.items() if not isinstance(v, torch.Tensor)}
    ctx.knobs = tuple(_args.loss_knobs(call).values())
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1], output[2])  # metrics, logp
    ctx.set_materialize_grads(False)  # an unused loss or entropy gives None, not zeros


def _grad_logp(ctx, grad_loss, logp, loss_tensors):
    if grad_loss is None:  # only the entropy is differentiated
        return torch.zeros_like(logp)
    return torch.ops.tapo.policy_loss_backward(grad_loss, logp, *loss_tensors, *ctx.knobs)


def _with_entropy_grad(grad_entropy, entropy) -> bool:
    return grad_entropy is not None and entropy.numel() > 0


def _logits_grad(grad_logp, grad_entropy, logits, labels, logp, entropy, temperature):
    """``d / d logits`` of the log-probability (and, when it has a gradient, entropy) terms:
    the one-pass ``selective_log_softmax_backward`` kernels without an entropy gradient."""
    grad_logp = torch.zeros_like(logp) if grad_logp is None else grad_logp.contiguous()
    if not _with_entropy_grad(grad_entropy, entropy):
        return torch.ops.tapo.selective_log_softmax_backward(
            grad_logp, logits, labels, logp, temperature
        )
    return torch.ops.tapo.logprobs_backward(
        grad_logp, grad_entropy.contiguous(), logits, labels, logp, entropy, temperature
    )


def _hidden_grads(grad_logp, grad_entropy, hidden, weight, bias, labels, logp, entropy, settings):
    """``(dhidden, dweight, dbias)`` of the log-probability (and entropy) terms."""
    grad_logp = torch.zeros_like(logp) if grad_logp is None else grad_logp.contiguous()
    if not _with_entropy_grad(grad_entropy, entropy):
        return torch.ops.tapo.selective_log_softmax_from_hidden_backward(
            grad_logp, hidden, weight, bias, labels, logp, *settings
        )
    return torch.ops.tapo.logprobs_from_hidden_backward(
        grad_logp, grad_entropy.contiguous(), hidden, weight, bias, labels, logp, entropy, *settings
    )


def _from_logits_setup_context(ctx, inputs, output):
    _save_front_call(ctx, "policy_loss_from_logits", inputs, output, ("logits", "labels"))


def _from_logits_backward(ctx, grad_loss, _grad_metrics, _grad_logp_out, grad_entropy):
    nones = (None,) * (ctx.n_inputs - 1)
    if not ctx.needs_input_grad[0] or (grad_loss is None and grad_entropy is None):
        return (None, *nones)
    logits, labels, logp, entropy, *loss_tensors = ctx.saved_tensors
    grad_logp = _grad_logp(ctx, grad_loss, logp, loss_tensors)
    temperature = ctx.call["temperature"]
    if _with_entropy_grad(grad_entropy, entropy):
        grad_logits = _logits_grad(
            grad_logp, grad_entropy, logits, labels, logp, entropy, temperature
        )
        if ctx.call["inplace_backward"]:  # the promise holds: the buffer holds the gradient
            return (logits.copy_(grad_logits), *nones)
        return (grad_logits, *nones)
    if ctx.call["inplace_backward"]:
        torch.ops.tapo.selective_log_softmax_backward_inplace(
            grad_logp, logits, labels, logp, temperature
        )
        return (logits, *nones)  # the logits buffer now holds the gradient
    grad_logits = torch.ops.tapo.selective_log_softmax_backward(
        grad_logp, logits, labels, logp, temperature
    )
    return (grad_logits, *nones)


def _leaf_grads(ctx, grad_logp, grad_entropy, head, settings):
    """``(dhidden, dweight, dbias)`` of a hidden-state op, ``None`` where not needed;
    ``head``: hidden, weight, bias, labels, logp, entropy; ``settings``: temperature, chunk."""
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    hidden, weight, bias, labels, logp, entropy = head
    want_bias = bias is not None and need_bias
    grad_hidden, grad_weight, grad_bias = _hidden_grads(
        grad_logp,
        grad_entropy,
        hidden,
        weight,
        bias,
        labels,
        logp,
        entropy,
        (*settings, need_weight, want_bias),
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if want_bias else None,
    )


def _from_hidden_setup_context(ctx, inputs, output):
    leading = ("hidden", "weight", "bias", "labels")
    _save_front_call(ctx, "policy_loss_from_hidden", inputs, output, leading)


def _from_hidden_backward(ctx, grad_loss, _grad_metrics, _grad_logp_out, grad_entropy):
    nones = (None,) * (ctx.n_inputs - 3)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias) or (
        grad_loss is None and grad_entropy is None
    ):
        return (None, None, None, *nones)
    hidden, weight, bias, labels, logp, entropy, *loss_tensors = ctx.saved_tensors
    grad_logp = _grad_logp(ctx, grad_loss, logp, loss_tensors)
    head = (hidden, weight, bias, labels, logp, entropy)
    settings = (ctx.call["temperature"], ctx.call["chunk_size"])
    return (*_leaf_grads(ctx, grad_logp, grad_entropy, head, settings), *nones)


torch.library.register_autograd(
    "tapo::policy_loss_from_logits", _from_logits_backward, setup_context=_from_logits_setup_context
)
torch.library.register_autograd(
    "tapo::policy_loss_from_hidden", _from_hidden_backward, setup_context=_from_hidden_setup_context
)

_REFERENCE_KERNELS.update(_fused.KERNELS)

# ======================================================================================
# Standalone log-probabilities and entropies (differentiable through both), for frameworks
# that compute log-probabilities inside their model forward (docs/math.md, section 5.4)
# ======================================================================================

LOGPROBS_FROM_LOGITS_SCHEMA = (
    "logprobs_from_logits(Tensor logits, Tensor labels, float temperature=1.0, "
    "bool with_entropy=True) -> (Tensor, Tensor)"
)
LOGPROBS_FROM_HIDDEN_SCHEMA = (
    "logprobs_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
    "float temperature=1.0, bool with_entropy=True, int? chunk_size=None) -> (Tensor, Tensor)"
)
# the backward ops with an entropy gradient (without one, the selective_log_softmax_* ops)
LOGPROBS_BACKWARD_SCHEMA = (
    "logprobs_backward(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, "
    "Tensor logp, Tensor entropy, float temperature=1.0) -> Tensor"
)
LOGPROBS_FROM_HIDDEN_BACKWARD_SCHEMA = (
    "logprobs_from_hidden_backward(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, "
    "Tensor weight, Tensor? bias, Tensor labels, Tensor logp, Tensor entropy, "
    "float temperature=1.0, int? chunk_size=None, bool weight_grad=True, bool bias_grad=True) "
    "-> (Tensor, Tensor, Tensor)"
)
for _schema in (
    LOGPROBS_FROM_LOGITS_SCHEMA,
    LOGPROBS_FROM_HIDDEN_SCHEMA,
    LOGPROBS_BACKWARD_SCHEMA,
    LOGPROBS_FROM_HIDDEN_BACKWARD_SCHEMA,
):
    _define(_schema)
LOGPROBS_OPS = tuple(_fused.LOGPROBS_KERNELS)


def _logprobs_fake(like: torch.Tensor, B: int, T: int, with_entropy: bool):
    f32 = torch.float32
    entropy = like.new_empty((B, T) if with_entropy else (0,), dtype=f32)
    return like.new_empty((B, T), dtype=f32), entropy


@_register_fake("tapo::logprobs_from_logits")
def _logprobs_from_logits_fake(logits, labels, temperature=1.0, with_entropy=True):
    return _logprobs_fake(logits, *logits.shape[:2], with_entropy)


@_register_fake("tapo::logprobs_from_hidden")
def _logprobs_from_hidden_fake(
    hidden, weight, bias, labels, temperature=1.0, with_entropy=True, *_
):
    return _logprobs_fake(hidden, *hidden.shape[:2], with_entropy)


@_register_fake("tapo::logprobs_backward")
def _logprobs_backward_fake(grad_logp, grad_entropy, logits, *rest):
    return torch.empty_like(logits)


_register_fake("tapo::logprobs_from_hidden_backward")(
    _hidden_backward_fake("logprobs_from_hidden_backward")
)


def _logprobs_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], *output)
    ctx.temperature = inputs[2]
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logp, grad_entropy):
    if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
        return None, None, None, None
    logits, labels, logp, entropy = ctx.saved_tensors
    grad = _logits_grad(grad_logp, grad_entropy, logits, labels, logp, entropy, ctx.temperature)
    return grad, None, None, None


def _logprobs_from_hidden_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, _, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, *output)
    ctx.settings = (temperature, chunk_size)
    ctx.set_materialize_grads(False)


def _logprobs_from_hidden_backward(ctx, grad_logp, grad_entropy):
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    nones = (None,) * 4
    if not (need_hidden or need_weight or need_bias) or (
        grad_logp is None and grad_entropy is None
    ):
        return (None, None, None, *nones)
    return (*_leaf_grads(ctx, grad_logp, grad_entropy, ctx.saved_tensors, ctx.settings), *nones)


torch.library.register_autograd(
    "tapo::logprobs_from_logits", _logprobs_backward, setup_context=_logprobs_setup_context
)
torch.library.register_autograd(
    "tapo::logprobs_from_hidden",
    _logprobs_from_hidden_backward,
    setup_context=_logprobs_from_hidden_setup_context,
)
for _op in LOGPROBS_OPS:
    for _device in ("CPU", "CUDA"):
        lib.impl(_op, _fused.LOGPROBS_KERNELS[_op], _device)

for _op in LOGPROB_OPS:
    # validation and the loss in Python (fused.py); the vocabulary passes by the dispatcher
    lib.impl(_op, _fused.KERNELS[_op], "CPU")
    CPU_BACKEND[_op] = "native" if NATIVE_LOGPROB else "chunked-torch"
    lib.impl(_op, _triton_kernel(_op), "CUDA")
