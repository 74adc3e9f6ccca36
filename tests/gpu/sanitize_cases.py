"""Every kernel once on shapes that hit every masked edge; run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python tests/gpu/sanitize_cases.py
    compute-sanitizer --tool racecheck python tests/gpu/sanitize_cases.py

Small shapes keep the sanitizer's slowdown affordable; odd sizes leave partial tiles everywhere.
"""
import torch

import fused_ops

dev = "cuda"
torch.manual_seed(0)


def r(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev).to(dtype)


def main():
    count = 0
    for dtype in (torch.float32, torch.bfloat16):
        for m, n in ((1, 1), (3, 7), (37, 1023), (2, 40000)):
            fused_ops.softmax_laplace(r(m, n, dtype=dtype), temperature=0.5, alpha=0.1)
            fused_ops.topk_gating(r(m, min(n, 8192), dtype=dtype), min(3, n), renormalize=True)
            count += 2
        for m, k, n in ((1, 7, 1), (3, 1023, 8), (33, 8320, 60), (17, 300, 513), (70, 8320, 1500)):
            x, w = r(m, k, dtype=dtype), r(n, k, dtype=dtype)
            lw, lb, b = r(k, dtype=dtype), r(k, dtype=dtype), r(n, dtype=dtype)
            fused_ops.layernorm_linear(x, lw, lb, w, b)
            if n <= 512:
                for gating in ("softmax", "laplace"):
                    fused_ops.fused_router(x, lw, lb, w, b, k=min(4, n), gating=gating, alpha=0.01)
                    count += 1
            count += 1
        # narrow gates: the broadcast tiles with K slices (5 rows), the raw dot with K slices (200 rows)
        for m, k in ((5, 4097), (200, 1500)):
            x, w, lw, lb, b = r(m, k, dtype=dtype), r(8, k, dtype=dtype), r(k, dtype=dtype), r(k, dtype=dtype), r(8, dtype=dtype)
            for gating in ("softmax", "laplace"):
                for _ in range(2):                          # the second call launches the kept plan
                    fused_ops.fused_router(x, lw, lb, w, b, k=4, gating=gating, alpha=0.01)
                    count += 1
        for m, e, k, (K, H, N) in ((0, 4, 2, (7, 5, 3)), (1, 8, 4, (8320, 40, 17)), (3, 1, 1, (7, 9, 5)),
                                   (33, 8, 8, (100, 70, 30)), (300, 16, 2, (130, 257, 70)),
                                   (64, 8, 2, (136, 72, 24))):         # 16-bit: weight tiles through TMA
            x = r(m, K, dtype=dtype)
            idx = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(m)]) if m else \
                torch.zeros(0, k, dtype=torch.int64, device=dev)
            idx[: m // 2, 0] = 0                            # one expert gets many tokens, some get none
            w = torch.rand(m, k, device=dev)
            w1, b1, w2, b2 = r(e, H, K, dtype=dtype), r(e, H, dtype=dtype), r(e, N, H, dtype=dtype), r(e, N, dtype=dtype)
            for act in ("gelu_tanh", "gelu", "relu", "silu"):
                fused_ops.moe_experts(x, w, idx, w1, b1, w2, b2, activation=act)
                count += 1
        for nq, lq, nd, ld, d in ((1, 1, 1, 1, 1), (3, 7, 20, 33, 7), (2, 40, 50, 300, 128), (1, 1030, 3, 1030, 96)):
            Q, D = r(nq, lq, d, dtype=dtype), r(nd, ld, d, dtype=dtype)
            ql = torch.randint(1, lq + 1, (nq,), device=dev)
            dl = torch.randint(0, ld + 1, (nd,), device=dev)
            dl[0] = 0
            dl[-1] = min(1, ld)
            fused_ops.maxsim(Q, D, q_lengths=ql, d_lengths=dl, reduction="mean")
            offsets = torch.zeros(nd + 1, dtype=torch.int64, device=dev)
            offsets[1:] = dl.cumsum(0)
            packed = D[torch.arange(ld, device=dev)[None, :] < dl[:, None]]
            fused_ops.maxsim_varlen(Q, packed, offsets, q_lengths=ql)
            fused_ops.maxsim_topk(Q, D, min(nd, 5), q_lengths=ql, d_lengths=dl)
            count += 3
    torch.cuda.synchronize()
    print(f"sanitize_cases: {count} op calls completed")


if __name__ == "__main__":
    main()
