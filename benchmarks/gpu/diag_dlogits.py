"""Where does the bf16 ``dlogits`` of the Triton backward go wrong? (a device diagnostic)

Compares ``dlogits`` of the Triton backward (new tensor and in place, several vocabulary
blocks and token counts) with the fp32 formula ``g (onehot - softmax(x))`` row by row, and
prints the relative error, the share of bad rows and where they are.
Run: ``python -m benchmarks.gpu.diag_dlogits`` (CUDA).
"""

from __future__ import annotations

import itertools

import torch

from tapo_kernels.ops import logprob_loss as lp


def expected(logits, labels, grad):
    x = logits.float()
    p = torch.softmax(x, dim=-1)
    onehot = torch.zeros_like(p).scatter_(-1, labels.clamp(min=0)[..., None], 1.0)
    d = grad[..., None] * (onehot - p)
    return torch.where((labels >= 0)[..., None], d, torch.zeros_like(d))


def main() -> None:
    V = 151936
    for (B, T), dtype, inplace, block in itertools.product(
        ((1, 64), (8, 1024)), (torch.bfloat16, torch.float32), (False, True), (None, 1024)
    ):
        if dtype == torch.float32 and (B, T) == (8, 1024) and block == 1024:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        logits = (3 * torch.randn(B, T, V, device="cuda", generator=gen)).to(dtype)
        labels = torch.randint(0, V, (B, T), device="cuda", generator=gen)
        grad = torch.randn(B, T, device="cuda", generator=gen)
        logp, _ = lp.selective_log_softmax_triton(logits, labels, block_v=block)
        ref = expected(logits, labels, grad)
        if inplace:
            out = logits.clone()
            lp.selective_log_softmax_backward_inplace_triton(grad, out, labels, logp, block_v=block)
        else:
            out = lp.selective_log_softmax_backward_triton(
                grad, logits, labels, logp, block_v=block
            )
        err = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)
        bad = (err > 2e-2).nonzero().tolist()
        total = float((out.float() - ref).norm() / ref.norm())
        print(
            f"B={B} T={T} {str(dtype)[6:]} inplace={inplace} block={block}: rel {total:.2e}, "
            f"bad rows {len(bad)}/{B * T}, first {bad[:6]}",
            flush=True,
        )
        del logits, out, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
