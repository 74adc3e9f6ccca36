"""Tuned against fallback configs: for every registered Tunable and each of its default tuning
shapes, the built-in fallback config and the config the launcher resolves on this GPU (the shipped
JSON entry of the shape's bucket, device file before family file) are timed side by side. Nothing
is tuned here: this reads what is shipped.

op = tuned_<kernel>; providers "fused_ops fallback" and "fused_ops tuned (<JSON file>)", so the
CSV holds both times and their ratio is the tuned speedup (the providers are this project's own,
never peers, so the README's peer table leaves these rows out). Where no JSON entry applies, or
the entry is the fallback itself, only the fallback is timed and a note says so.
Floors: moe_experts and layernorm_linear as in their own families (weights and activations read
once, 2 x the GEMM FLOPs); maxsim and maxsim_topk read the real document tokens once (2 Nq Lq sum(real
Ld) d FLOPs, with the mean real length).
"""
from __future__ import annotations

import torch

from fused_ops import tunables, tuning  # noqa: F401  (tunables registers the kernels)

from .harness import Case

DTYPE = torch.bfloat16


def _floor(kernel: str, s: dict) -> tuple[float, float]:
    """(bytes, FLOPs) that must move and be done at a default tuning shape; (0, 0) if unknown."""
    if kernel == "moe_experts":               # at most M k experts receive a token
        weights = min(s["E"], s["M"] * s["k"]) * (s["H"] * s["K"] + s["N"] * s["H"] + s["H"] + s["N"]) * 2
        moved = weights + s["M"] * (s["K"] + s["N"]) * 2 + s["M"] * s["k"] * 8     # + routing
        return moved, 2 * s["M"] * s["k"] * (s["K"] * s["H"] + s["H"] * s["N"])
    if kernel == "layernorm_linear":
        return (s["M"] * s["K"] + s["N"] * s["K"] + s["M"] * s["N"]) * 2, 2 * s["M"] * s["N"] * s["K"]
    if kernel == "fused_router":                # read x and the gate, write k weights and indices
        return (s["M"] * s["K"] + s["E"] * s["K"]) * 2 + s["M"] * s["k"] * 8, 2 * s["M"] * s["K"] * s["E"]
    if kernel == "softmax_laplace":             # bf16 logits in, fp32 probabilities out
        return s["M"] * s["N"] * (2 + 4), 0.0
    if kernel == "topk_gating":                 # fp32 probabilities in, k weights and indices out
        return s["M"] * s["E"] * 4 + s["M"] * s["k"] * 8, 0.0
    if kernel in ("maxsim", "maxsim_topk"):   # the top-k path's k keys per group are a rounding error
        tokens = s["Nd"] * (s["lo"] + s["hi"]) / 2
        return (tokens + s["Nq"] * s["Lq"]) * s["d"] * 2, 2 * s["Nq"] * s["Lq"] * tokens * s["d"]
    return 0.0, 0.0


def cases(quick: bool = False) -> list[Case]:
    name, family = tuning.current_device()
    out = []
    for kernel, tunable in tuning.TUNABLES.items():
        shapes = tunable.shapes[-1:] if quick else tunable.shapes
        for shape in shapes:
            bucket = tunable.bucket(shape)
            entry, source = tuning.lookup(kernel, bucket, name, family)
            fallback = tunable.fallback(shape, family)
            providers = {"fused_ops fallback": tunable.make_run(shape, fallback)[0]}
            if entry is None or tunable.parse(entry) == fallback:
                why = source if entry is None else f"the entry in {source.split()[0]} is the fallback"
                print(f"  note: {kernel} {bucket}: {why}; only the fallback is timed")
            else:
                providers[f"fused_ops tuned ({source.split()[0]})"] = tunable.make_run(shape, tunable.parse(entry))[0]
            nbytes, flops = _floor(kernel, shape)
            dtype = torch.float32 if kernel == "topk_gating" else DTYPE      # top-k reads fp32 probabilities
            # graph time too: the tuner picks by it, and eager times of the small kernels measure launch work
            out.append(Case(f"tuned_{kernel}", {**shape, "bucket": bucket}, dtype, nbytes, flops, providers,
                            graph=True))
    return out


PLOTS: list = []
