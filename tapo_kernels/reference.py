"""Readable pure-torch semantics of every tapo op.

This module is the contract in code (``docs/math.md``, sections 1-5). It is the oracle of every
test, the baseline of every benchmark, and the CPU kernel when the native build is absent.
Functions here do no input validation (see ``_checks.py``) and work in whatever floating
dtype they are given (float64 for tight oracles, float32 for the kernels' own dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

# the choices of the string knobs, defined with the knobs (re-exported for the kernels and tests)
from .knobs import AGGS, ALGOS, KL_TYPES  # noqa: F401

SIM_COSINE = 0
SIM_IOU = 1
# Similarities within SIM_TOL below theta count as reaching it: the cosine of a vector with
# itself is 1 +- 1 ulp in fp32, so theta = 1 must still match identical calls, on every
# backend alike (each compares with fp(theta) - SIM_TOL in its working precision).
SIM_TOL = 2.0**-20

# Order of the entries of the metrics tensor returned by ``policy_loss``.
# clip_frac: PPO clip strictly active (verl's pg_clipfrac); dual_clip_frac: the dual clip
# (verl's pg_clipfrac_lower); ppo_kl: masked mean of old_logp - logp (verl's ppo_kl)
METRIC_NAMES = ("clip_frac", "mean_ratio", "mean_kl", "lifted_frac", "dual_clip_frac", "ppo_kl")


# --------------------------------------------------------------------------------------
# Section 1: group advantages
# --------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_ids: Tensor, *, scale_by_std: bool = True) -> Tensor:
    """GRPO outcome advantage ``(R_i - mean_g R) / (std_g R + 1e-6)`` per prompt group.

    Unbiased std; a singleton group has mean 0 and std 1 (so its advantage is ``R_i``
    divided by ``1 + 1e-6``). ``scale_by_std=False`` is Dr. GRPO (no std division).
    """
    rewards = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(torch.float64)
    total = torch.zeros_like(n).index_add_(0, inverse, rewards)
    mean = torch.where(n > 1, total / n, torch.zeros_like(n))
    sq = torch.zeros_like(n).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.ones_like(n))
    adv = rewards - mean[inverse]
    if scale_by_std:
        adv = adv / (std[inverse] + 1e-6)
    return adv.to(torch.float32)


# --------------------------------------------------------------------------------------
# Section 2: TAPO credit correction
# --------------------------------------------------------------------------------------


def encode_text(texts: list[str], dim: int = 256, n: int = 3) -> Tensor:
    """The definition of ``tapo_kernels.encode_text``, one n-gram at a time.

    Each text is lower-cased and its whitespace folded; every run of ``n`` characters (the
    whole text if shorter) adds 1 to bucket ``crc32(utf8(gram)) % dim``; rows are then
    L2-normalised (an empty text stays the zero vector).
    """
    import zlib

    out = torch.zeros(len(texts), dim, dtype=torch.float32)
    for row, text in enumerate(texts):
        folded = " ".join(text.lower().split())
        if not folded:
            continue
        grams = (
            [folded] if len(folded) < n else [folded[i : i + n] for i in range(len(folded) - n + 1)]
        )
        for gram in grams:
            out[row, zlib.crc32(gram.encode("utf-8")) % dim] += 1.0
    norm = out.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, out / norm.clamp(min=1e-12), out)


def build_call_map(
    call_seq: Tensor, call_start: Tensor, call_end: Tensor, B: int, T: int
) -> Tensor:
    """``(B, T) int32``: the index of the call whose span covers each token, -1 elsewhere.

    Spans must not overlap (validated by the ops); with overlaps the last call wins.
    """
    call_map = torch.full((B, T), -1, dtype=torch.int32, device=call_seq.device)
    lengths = (call_end - call_start).clamp(min=0)
    if call_seq.numel() == 0 or int(lengths.sum()) == 0:
        return call_map
    idx = torch.repeat_interleave(torch.arange(call_seq.numel(), device=call_seq.device), lengths)
    # position of each token inside its span: global arange minus the span's first slot
    first = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(idx.numel(), device=call_seq.device) - first[idx]
    call_map[call_seq[idx], call_start[idx] + offset] = idx.to(torch.int32)
    return call_map


def pairwise_similarity(p: Tensor, q: Tensor, kind: Tensor) -> Tensor:
    """``(F, C)`` similarity of rows of ``p`` (F, D) to rows of ``q`` (C, D).

    ``kind[f]`` picks the measure for row ``f``: cosine ``min(1, max(0, <p, q>))`` on the
    vectors as given (unit vectors from the encoders; the clamp bounds what unnormalised ones
    can do, and a dot product that overflows fp32 into NaN counts as 0), or the IoU of the
    boxes ``p[:4]``, ``q[:4]`` (``(x1, y1, x2, y2)``).
    """
    dot = p @ q.T
    # NaN only from an fp32 overflow (inf - inf) of unnormalised vectors: no match
    cos = torch.where(dot > 0, dot.clamp(max=1), torch.zeros_like(dot))
    if not bool((kind == SIM_IOU).any()):
        return cos
    a, b = p[:, None, :4], q[None, :, :4]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), 0.0)
    return torch.where(kind[:, None] == SIM_IOU, iou, cos)


def fused_correct(
    advantages: Tensor,  # [B, T]
    seq_advantages: Tensor,  # [B]
    group_ids: Tensor,  # [B] int64
    call_seq: Tensor,  # [N] int64
    call_start: Tensor,  # [N] int64
    call_end: Tensor,  # [N] int64
    call_tool: Tensor,  # [N] int64, < 0 = invalid call
    call_key: Tensor,  # [N] int64
    call_params: Tensor,  # [N, D]
    tool_sim_kind: Tensor,  # [num_tools] int64
    theta: float,
    alpha_min: float,
    beta: float,
    batch_scope: bool,
    coverage: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TAPO credit correction. Returns (corrected, delta, confidence, witness).

    For every valid call ``k`` of a failing trajectory (``A_i < 0``), over the candidate
    calls ``c`` (same tool id, same key, valid, in a successful trajectory of the pool):
    ``s_k`` best similarity, ``w_k`` lowest-index candidate reaching it, ``T_k`` the pool
    trajectories whose best match is ``>= theta``, ``cov_k = |T_k| / |pool|``,
    ``conf_k = s_k * cov_k``, ``d_k = [s_k >= theta and conf_k >= alpha_min] * beta *
    conf_k * mean_{T_k} A_j``, and ``A' = min(0, A + d_k)`` on the call's negative tokens.

    The per-call support set ``T_k`` replaces the paper's clustering of successful calls
    (one independent computation per failing call). Calls that are not failing-and-valid
    get ``delta = confidence = 0`` and ``witness = -1``.

    ``coverage=False`` is the ablation without the support factor: ``conf_k = s_k`` (the
    support set ``T_k`` still defines ``Abar_k``).
    """
    B, T = advantages.shape
    N = call_seq.numel()
    dtype, device = advantages.dtype, advantages.device
    delta = torch.zeros(N, dtype=dtype, device=device)
    confidence = torch.zeros(N, dtype=dtype, device=device)
    witness = torch.full((N,), -1, dtype=torch.int64, device=device)
    if N == 0:
        return advantages.clone(), delta, confidence, witness

    params = call_params.to(dtype)  # similarity math in the advantages' dtype (fp32)
    valid = call_tool >= 0
    success = seq_advantages > 0  # [B] trajectories that can witness
    scope = torch.zeros_like(group_ids) if batch_scope else group_ids
    pool_size = (success[None, :] & (scope[:, None] == scope[None, :])).sum(1)  # [B]

    fail = (valid & (seq_advantages[call_seq] < 0)).nonzero().squeeze(1)  # [F]
    cand = (valid & success[call_seq]).nonzero().squeeze(1)  # [C], ascending call index
    if fail.numel() == 0 or cand.numel() == 0:  # nothing to correct or no witness anywhere
        return advantages.clone(), delta, confidence, witness

    fseq, cseq = call_seq[fail], call_seq[cand]
    match = (
        (call_tool[fail][:, None] == call_tool[cand][None, :])
        & (call_key[fail][:, None] == call_key[cand][None, :])
        & (scope[fseq][:, None] == scope[cseq][None, :])
    )  # [F, C]
    kind = tool_sim_kind[call_tool[fail]]
    sim = pairwise_similarity(params[fail], params[cand], kind)
    sim = torch.where(match, sim, torch.full_like(sim, -1.0))  # -1 marks "not a candidate"

    has_cand = match.any(1)
    s = torch.where(has_cand, sim.max(1).values if sim.shape[1] else sim.new_zeros(len(fail)), 0.0)
    is_best = match & (sim == s[:, None])
    big = torch.iinfo(torch.int64).max
    w = torch.where(is_best, cand[None, :].expand_as(sim), big).min(1).values
    w = torch.where(has_cand, w, -1)

    # best match inside each pool trajectory j: m[f, j]; -1 where j has no candidate
    m = torch.full((len(fail), B), -1.0, dtype=dtype, device=device)
    m.scatter_reduce_(1, cseq[None, :].expand_as(sim), sim, reduce="amax", include_self=True)
    threshold = torch.tensor(theta, dtype=dtype, device=device) - SIM_TOL
    support = m >= threshold  # threshold > -1, so "has a candidate" is implied
    n_support = support.sum(1)
    pool = pool_size[fseq]
    cov = torch.where(pool > 0, n_support.to(dtype) / pool.clamp(min=1).to(dtype), 0.0)
    a_sum = (support.to(dtype) * seq_advantages[None, :]).sum(1)
    a_bar = torch.where(n_support > 0, a_sum / n_support.clamp(min=1).to(dtype), 0.0)
    conf = s * cov if coverage else s
    gate = (s >= threshold) & (conf >= alpha_min)
    d = torch.where(gate, beta * conf * a_bar, 0.0)

    delta[fail] = d
    confidence[fail] = conf
    witness[fail] = w
    call_map = build_call_map(call_seq, call_start, call_end, B, T)
    corrected = apply_lift(advantages, call_map, delta)
    return corrected, delta, confidence, witness


def apply_lift(advantages: Tensor, call_map: Tensor, call_delta: Tensor) -> Tensor:
    """``a' = min(0, a + call_delta[call_map])`` where ``a < 0`` and a call covers the token."""
    if call_delta.numel() == 0:
        return advantages.clone()
    covered = call_map >= 0
    lift = torch.where(covered, call_delta.to(advantages.dtype)[call_map.long().clamp(min=0)], 0.0)
    lifted = torch.minimum(advantages + lift, torch.zeros_like(advantages))
    return torch.where(covered & (advantages < 0), lifted, advantages)


# --------------------------------------------------------------------------------------
# Section 3: policy losses
# --------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL estimate with ``d = ref_logp - logp`` (k1 = -d, k2 = d^2/2, k3 clamped)."""
    d = ref_logp - logp
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    d = d.clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def aggregate(
    L: Tensor, m: Tensor, agg: str, norm_const: float | None, global_count: float | None
) -> Tensor:
    """Reduce the masked per-token loss ``L`` (already multiplied by ``m``) to a scalar."""
    if agg == "token-mean":
        denom = m.sum().clamp(min=1) if global_count is None else L.new_tensor(global_count)
        return L.sum() / denom
    if agg == "token-sum":
        return L.sum() if global_count is None else L.sum() / L.new_tensor(global_count)
    row_tokens = m.sum(1)
    nonempty = (row_tokens > 0).to(L.dtype)
    if agg == "seq-mean-token-mean":
        rows = L.sum(1) / row_tokens.clamp(min=1)
    elif agg == "seq-mean-token-sum":
        rows = L.sum(1)
    elif agg == "seq-mean-token-sum-norm":
        rows = L.sum(1) / (max(L.shape[1], 1) if norm_const is None else norm_const)
    else:
        raise ValueError(f"unknown agg {agg!r}")
    denom = nonempty.sum().clamp(min=1) if global_count is None else L.new_tensor(global_count)
    return (rows * nonempty).sum() / denom


def policy_loss(
    logp: Tensor,  # [B, T], differentiable
    old_logp: Tensor,  # [B, T]
    advantages: Tensor,  # [B] or [B, T]
    mask: Tensor,  # [B, T] bool or float
    ref_logp: Tensor | None = None,  # [B, T]
    call_map: Tensor | None = None,  # [B, T] int32, -1 = no call
    call_delta: Tensor | None = None,  # [N]
    importance_weight: Tensor | None = None,  # [B, T], >= 0
    *,
    algo: str = "grpo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    agg: str = "token-mean",
    norm_const: float | None = None,
    global_count: float | None = None,
) -> tuple[Tensor, Tensor]:
    """docs/math.md, sections 3-4, in plain torch (gradients by autograd). Returns (loss, metrics).

    ``metrics`` is a detached ``(6,)`` tensor ordered as ``METRIC_NAMES``: fraction of
    mask tokens whose loss the PPO clip holds (strictly active; always 0 for SAPO, which has
    no hard clip), masked mean of the ratio (``s_it`` for GSPO), masked mean of the KL
    estimate (0 without ``ref_logp``), fraction of mask tokens whose advantage the TAPO lift
    changed, fraction of mask tokens whose loss the dual clip holds (a token is held by at
    most one of the two clips), and ``ppo_kl``, the masked mean of ``old_logp - logp``
    (the token log-ratio, clamped to +-20, negated; token-level for GSPO too).

    Dual clip applies to ``grpo`` only (as verl: GSPO and SAPO have none).

    ``importance_weight`` (``w >= 0``, a constant: no gradient flows into it) multiplies the
    policy-gradient term of each token, not the KL term: the per-token loss is
    ``w * l_pg + kl_coef * k``, as verl's and TRL's truncated importance sampling apply their
    rollout correction. Because ``w >= 0`` commutes with the max / min of the clipped
    objectives and keeps the sign of ``a``, this is computed as the advantage ``w * a'``
    after the TAPO lift (the lift acts on the unweighted advantage). The clip fraction counts
    a token with ``w = 0`` as unclipped.
    """
    m = mask.to(logp.dtype)
    # masked tokens contribute exactly 0 whatever their inputs: read them as 0 (the gradient
    # of logp there is 0 too)
    live = mask != 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(live, logp, zero)
    old_logp = torch.where(live, old_logp, zero)
    if ref_logp is not None:
        ref_logp = torch.where(live, ref_logp, zero)
    a = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    a = torch.where(live, a.to(logp.dtype), zero)
    lifted = torch.zeros_like(m, dtype=torch.bool)
    if call_map is not None and call_delta is not None:
        a_new = apply_lift(a, call_map, call_delta)
        lifted = a_new != a
        a = a_new
    if importance_weight is not None:
        a = a * torch.where(live, importance_weight.to(logp.dtype), zero)

    lr = (logp - old_logp).clamp(-20.0, 20.0)
    clipped = torch.zeros_like(m, dtype=torch.bool)
    dual = torch.zeros_like(m, dtype=torch.bool)
    if algo in ("gspo", "gspo-seq"):
        n = m.sum(1, keepdim=True).clamp(min=1)
        log_s_seq = (lr * m).sum(1, keepdim=True) / n
        if algo == "gspo":  # GSPO-token: s_it = sg(s_i) pi_t / sg(pi_t)
            log_s = (logp - logp.detach() + log_s_seq.detach()).clamp(max=10.0)
        else:  # GSPO-seq: s_i itself, differentiated through every token of the row
            log_s = log_s_seq.clamp(max=10.0).expand_as(logp)
        ratio = torch.exp(log_s)
    else:
        ratio = torch.exp(lr)

    if algo in ("grpo", "gspo", "gspo-seq"):
        l1 = -a * ratio
        l2 = -a * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        loss_tok = torch.maximum(l1, l2)
        clipped = l2 > l1
        if algo == "grpo" and dual_clip_c > 1.0:
            l3 = -a * dual_clip_c
            dual = (a < 0) & (l3 < loss_tok)
            loss_tok = torch.where(a < 0, torch.minimum(loss_tok, l3), loss_tok)
    elif algo == "sapo":
        tau = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))
        loss_tok = -a * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    else:
        raise ValueError(f"unknown algo {algo!r}")

    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_type)
        loss_tok = loss_tok + kl_coef * kl

    loss = aggregate(loss_tok * m, m, agg, norm_const, global_count)
    with torch.no_grad():
        metrics = torch.stack(
            [
                _masked_mean(clipped.to(m.dtype), m),
                _masked_mean(ratio.detach(), m),
                _masked_mean(kl.detach(), m),
                _masked_mean(lifted.to(m.dtype), m),
                _masked_mean(dual.to(m.dtype), m),
                _masked_mean(-lr.detach(), m),
            ]
        ).to(torch.float32)
    return loss, metrics


# --------------------------------------------------------------------------------------
# Section 3, fused front ends: log-probabilities from logits or hidden states
# --------------------------------------------------------------------------------------


def selective_log_softmax(
    logits: Tensor,  # [B, T, V] any float dtype
    labels: Tensor,  # [B, T] int64; < 0 = ignored (logp 0)
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """``log softmax(logits / temperature)[label]`` and the entropy, both in fp32.

    The log-sum-exp and the result never pass through a low-precision dtype. Negative labels
    (e.g. -100 padding) give 0. The entropy is ``lse - sum softmax * x`` (empty without
    ``with_entropy``). Both are differentiable with respect to ``logits``.
    """
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1)
    safe = labels.clamp(min=0)
    logp = x.gather(-1, safe[..., None]).squeeze(-1) - lse
    logp = torch.where(labels >= 0, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp, logp.new_empty((0,))
    p = torch.softmax(x, dim=-1)
    entropy = lse - torch.where(p > 0, p * x, 0.0).sum(-1)  # 0 * -inf columns count 0
    return logp, torch.where(labels >= 0, entropy, torch.zeros_like(entropy))


def policy_loss_from_logits(
    logits: Tensor,  # [B, T, V]
    labels: Tensor,  # [B, T] int64, < 0 = ignored token
    *loss_tensors: Tensor | None,  # old_logp, advantages, mask[, ref_logp, call_map, call_delta]
    temperature: float = 1.0,
    with_entropy: bool = False,
    **knobs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``policy_loss(logp, *loss_tensors, **knobs)`` on
    ``logp = selective_log_softmax(logits, labels, temperature)``, with the floating loss
    tensors cast to float32 (the dtype of ``logp``).

    Returns (loss, metrics, logp (detached, fp32), entropy (fp32, differentiable; empty when
    not asked)). Differentiable with respect to ``logits``.
    """
    logp, entropy = selective_log_softmax(logits, labels, temperature, with_entropy)
    fp32 = (t.float() if t is not None and t.is_floating_point() else t for t in loss_tensors)
    loss, metrics = policy_loss(logp, *fp32, **knobs)
    return loss, metrics, logp.detach(), entropy


def policy_loss_from_hidden(
    hidden: Tensor,  # [B, T, H]
    weight: Tensor,  # [V, H] LM head
    bias: Tensor | None,  # [V]
    labels: Tensor,  # [B, T]
    *loss_args,
    **knobs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plain composition: full logits ``hidden @ weight.T + bias``, then the logits loss
    (``loss_args`` and ``knobs``: as ``policy_loss_from_logits`` after ``labels``).

    Materialises the whole ``(B, T, V)`` logits: this is the memory baseline the fused op beats.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return policy_loss_from_logits(logits, labels, *loss_args, **knobs)
