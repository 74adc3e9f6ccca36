"""python -m fused_ops info | demo | tune | configs"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _device_summary() -> dict:
    import triton

    from ._runtime import INTERPRET
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        info["backend"] = "triton kernels (CUDA)"
    else:
        info.update(device="cpu", compute_capability="-")
        info["backend"] = ("triton kernels through the interpreter (TRITON_INTERPRET=1)" if INTERPRET
                           else "plain-torch reference (fused_ops.reference)")
    return info


def cmd_info(_args) -> None:
    import importlib

    from . import __all__ as ops
    summary = _device_summary()
    for key, value in summary.items():
        print(f"{key:>20}: {value}")
    print(f"{'ops':>20}: {', '.join(o for o in ops if o[0].islower())}")
    if summary["backend"].startswith("triton"):
        topk, router = importlib.import_module(".topk", __package__), importlib.import_module(".router", __package__)
        print(f"{'except':>20}: float64 inputs of layernorm_linear, fused_router, moe_experts and the maxsim ops "
              f"take the reference (the kernels compute in float32), and so do topk_gating rows wider than "
              f"{topk.MAX_SINGLE_BLOCK}; fused_router over {router.MAX_FUSED_E} experts takes three launches "
              f"(logits, softmax_laplace, topk_gating)")


def _timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds over `repeats` calls (CUDA: events through do_bench)."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def cmd_demo(args) -> None:
    from . import FuseMoE, FuseMoEConfig
    from ._runtime import INTERPRET
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not INTERPRET:
        # no GPU: run the real kernels through Triton's interpreter, which must be on before import
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fused_ops", *sys.argv[1:]])
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        config, dtype, batches = FuseMoEConfig(), torch.bfloat16, (32, 256, 2048)
    else:
        config = FuseMoEConfig(d_in=520, d_hidden=256, d_out=96, num_experts=8, top_k=4)
        dtype, batches = torch.float32, (32, 256)
    print(f"FuseMoE demo on {device} ({dtype}): {config}")
    torch.manual_seed(0)
    ref = FuseMoE(config, backend="torch", device=device, dtype=dtype)
    fast = FuseMoE(config, backend="triton", device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    rows = []
    with torch.inference_mode():
        for m in batches:
            x = torch.randn(m, config.d_in, device=device, dtype=dtype)
            y_ref, (_, i_ref) = ref(x, return_routing=True)
            y, (_, i) = fast(x, return_routing=True)
            same = (i == i_ref).all(-1)
            err = ((y[same].float() - y_ref[same].float()).norm() / y_ref[same].float().norm()).item()
            t_ref = _timed(lambda: ref(x), device, args.repeats)
            t_fast = _timed(lambda: fast(x), device, args.repeats)
            rows.append((m, float(same.float().mean()), err, t_ref, t_fast))
    print(f"\n{'tokens':>7} {'routing equal':>14} {'rel. error':>11} {'torch ms':>10} {'triton ms':>10} {'speedup':>8}")
    for m, agree, err, t_ref, t_fast in rows:
        print(f"{m:>7} {agree:>14.1%} {err:>11.2e} {t_ref:>10.3f} {t_fast:>10.3f} {t_ref / t_fast:>7.2f}x")
    if not on_gpu:
        print("\n(no GPU: the triton backend ran its kernels in Triton's CPU interpreter, which checks them"
              "\n but is no measure of speed; run the demo on a CUDA GPU for real timings)")
    worst = max(r[2] for r in rows)
    tolerance = 1e-2 if dtype != torch.float32 else 1e-4
    if worst > tolerance:
        raise SystemExit(f"demo: triton and torch backends differ (relative error {worst:.2e} > {tolerance})")


def _parse_shapes(tokens) -> list[dict]:
    """'M=32,N=7' tokens -> {'M': 32, 'N': 7} dicts."""
    shapes = []
    for token in tokens:
        shape = {}
        for item in token.split(","):
            key, _, value = item.partition("=")
            if not key or not value.isdigit():
                raise SystemExit(f"--shapes: expected KEY=INTEGER items such as M=32,K=8320, got {item!r}")
            shape[key] = int(value)
        shapes.append(shape)
    return shapes


def cmd_tune(args) -> None:
    from . import tunables, tuner, tuning  # noqa: F401  (tunables registers the kernels)
    names = args.op or list(tuning.TUNABLES)
    unknown = [n for n in names if n not in tuning.TUNABLES]
    if unknown:
        raise SystemExit(f"unknown --op {unknown}; tunable kernels: {list(tuning.TUNABLES)}")
    given = _parse_shapes(args.shapes or [])
    for name in names:
        base = tuning.TUNABLES[name].shapes[0]
        foreign = sorted({key for shape in given for key in shape} - set(base))
        if foreign:         # another kernel's keys: an error where the kernel was named, else not its shapes
            message = f"--shapes key(s) {foreign} are not {name}'s (its shape keys: {sorted(base)})"
            if args.op:
                raise SystemExit(message)
            print(f"{name}: skipped, {message}")
            continue
        tuner.tune([name], [{**base, **shape} for shape in given] or None, args.out)


def family_of_name(name: str) -> str:
    """GPU family from a marketing name, for `configs --device` on a machine without that GPU."""
    upper = name.upper()
    if any(t in upper for t in ("H100", "H200", "H800", "GH200")):
        return "sm_90"
    if any(t in upper for t in ("B200", "GB200", "B100", "B300")):
        return "sm_100"
    if any(t in upper for t in ("RTX 50", "RTX PRO", "5090", "5080")):
        return "sm_120"
    return "generic"


def cmd_configs(args) -> None:
    from . import tunables, tuning  # noqa: F401
    if args.device:
        name, family = args.device, args.family or family_of_name(args.device)
    else:
        name, family = tuning.current_device()
    print(f"device {name!r}, family {family}; JSON searched: "
          f"{[p for p, _ in tuning.config_files(name, family)] or 'none found'}")
    for kname, tunable in tuning.TUNABLES.items():
        for shape in tunable.shapes:
            bucket = tunable.bucket(shape)
            entry, source = tuning.lookup(kname, bucket, name, family)
            fallback = tunable.fallback(shape, family)
            config = fallback if entry is None else tunable.parse(entry)
            shape_txt = ",".join(f"{k}={v}" for k, v in shape.items())
            print(f"{kname:<18} {bucket:<14} {shape_txt:<50} <- {source}\n{'':<20}{tunable.to_json(config)}")
            if config != fallback:
                print(f"{'':<20}(fallback: {tunable.to_json(fallback)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions and which backend the ops use")
    demo = sub.add_parser("demo", help="build a FuseMoE, check triton against torch, time both")
    demo.add_argument("--repeats", type=int, default=5, help="timed calls per case on CPU")
    tune = sub.add_parser("tune", help="tune kernel configs on this GPU and write <device>.json")
    tune.add_argument("--op", nargs="+", help="tunable kernels (default: all)")
    tune.add_argument("--shapes", nargs="+", help="shapes as M=32,K=8320,... over each kernel's default")
    tune.add_argument("--out", help="output folder (default $FUSED_OPS_CONFIG_DIR or the package's configs/)")
    configs = sub.add_parser("configs", help="which config each kernel would use on a device, and why")
    configs.add_argument("--device", help="a device name, e.g. 'NVIDIA B200' (default: the GPU at hand)")
    configs.add_argument("--family", choices=["sm_90", "sm_100", "sm_120", "generic"],
                         help="override the family guessed from --device")
    args = parser.parse_args(argv)
    {"info": cmd_info, "demo": cmd_demo, "tune": cmd_tune, "configs": cmd_configs}[args.command](args)


if __name__ == "__main__":
    main()
