"""One timing function, one CSV format, one plot function, and the measured ceilings.

A benchmark family (perf/bench_*.py) exposes `cases(quick: bool) -> list[Case]`; each Case names
its op, its shape fields, the bytes that must move and the FLOPs that must be done, and one
zero-argument callable per provider. `run_cases` times them all and returns long-format rows.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

CSV_FIELDS = ["op", "provider", "shape", "dtype", "ms", "graph_ms", "gb_s", "tflop_s", "floor_ms",
              "floor_ratio", "bytes", "flops", "gpu", "torch", "triton", "date"]


@dataclass
class Case:
    op: str                                   # benchmark family member, e.g. "softmax_laplace"
    shape: dict                               # e.g. {"M": 8192, "N": 32000}
    dtype: torch.dtype
    bytes: float                              # bytes that must move: each input read once, output written once
    flops: float                              # useful FLOPs (0 for memory-bound ops)
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)
    graph: bool = False                       # also time a captured CUDA graph of each provider


@dataclass
class Ceilings:
    read_gb_s: float           # large-tensor read bandwidth (GB/s)
    bf16_tflop_s: float        # dense bf16 GEMM rate (TFLOP/s)

    def floor_ms(self, nbytes: float, flops: float) -> float:
        return max(nbytes / (self.read_gb_s * 1e9), flops / (self.bf16_tflop_s * 1e12)) * 1e3


def environment() -> dict:
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.date.today().isoformat()}


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() through triton.testing.do_bench (CUDA events, L2 flushed)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graphed(fn: Callable[[], object], warmups: int = 3) -> Callable[[], None]:
    """fn's launches captured in a CUDA graph, after `warmups` calls on the capture stream
    (compilation, autotuning); returns a replay that keeps fn, and with it the tensors the graph
    writes, alive (a freed output's memory may go back to the driver at the next capture, and the
    replay would then write to unmapped memory)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)

    def replay():
        graph.replay()
    replay.captured = fn                # alive as long as the replay
    return replay


def graph_time_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """Median milliseconds of one replay of a CUDA graph holding `replays` calls of fn()."""
    return time_ms(graphed(lambda: [fn() for _ in range(replays)], warmups=1)) / replays


def rotated_rounds(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each contender in `rounds` rounds (do_bench's mean over 100 ms), each round
    starting one contender later, so none always runs after the same one."""
    from triton.testing import do_bench
    times = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(do_bench(contenders[name], rep=100))
    return times


def print_rounds(times: dict[str, list[float]], baseline: str, label: str) -> None:
    """Each contender's median over the rounds, as a multiple of the baseline's median (`label`)."""
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    base = median(times[baseline])
    for name, values in times.items():
        ms = median(values)
        print(f"{name:<28} median {ms:.4f} ms ({ms / base:.3f}x {label})  best {min(values):.4f}  "
              f"(rounds: {' '.join(f'{t:.3f}' for t in values)})")


def measure_ceilings() -> Ceilings:
    """Read bandwidth from a large sum (reads 4 GB, writes nothing), bf16 rate from a large GEMM."""
    x = torch.randn(1 << 30, device="cuda", dtype=torch.float32)
    read_ms = time_ms(lambda: x.sum(), rep=50)
    read_gb_s = x.numel() * 4 / (read_ms * 1e-3) / 1e9
    del x
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ b, rep=50)
    return Ceilings(read_gb_s=read_gb_s, bf16_tflop_s=2 * n ** 3 / (gemm_ms * 1e-3) / 1e12)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def run_case(case: Case, ceilings: Ceilings, env: dict) -> list[dict]:
    rows = []
    floor = ceilings.floor_ms(case.bytes, case.flops)
    for provider, fn in case.providers.items():
        try:
            ms = time_ms(fn)
        except Exception as exc:               # a provider that fails is reported, never faked
            print(f"  skipped {case.op}/{provider} {shape_str(case.shape)}: {type(exc).__name__}: {exc}")
            continue
        graph_ms = float("nan")
        if case.graph:
            try:
                graph_ms = graph_time_ms(fn)
            except Exception as exc:           # e.g. a host sync inside: no graph time, the eager one stands
                print(f"  no graph time for {case.op}/{provider} {shape_str(case.shape)}: {type(exc).__name__}: {exc}")
                torch.cuda.synchronize()
        rows.append({
            "op": case.op, "provider": provider, "shape": shape_str(case.shape),
            "dtype": str(case.dtype).replace("torch.", ""), "ms": ms, "graph_ms": graph_ms,
            "bytes": case.bytes, "flops": case.flops, "floor_ms": floor, **env,
        })
        best = _best(rows[-1])
        rows[-1].update(gb_s=case.bytes / (best * 1e-3) / 1e9, tflop_s=case.flops / (best * 1e-3) / 1e12,
                        floor_ratio=floor / best)
    return rows


def run_cases(cases: list[Case], ceilings: Ceilings, env: dict, progress: bool = True) -> list[dict]:
    from tqdm import tqdm
    rows = []
    for case in tqdm(cases, desc="benchmarks", disable=not progress):
        rows += run_case(case, ceilings, env)
        try:
            torch.cuda.empty_cache()
        except Exception as exc:                # a faulted context: keep what was measured so far
            print(f"  CUDA context lost after {case.op} {shape_str(case.shape)}: {exc}")
            break
    return rows


def write_csv(rows: list[dict], path: str, ceilings: Optional[Ceilings] = None, env: Optional[dict] = None) -> None:
    """Long format, one row per (op, provider, shape); the ceilings ride along as op 'ceiling' rows."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out = list(rows)
    if ceilings is not None and env is not None:
        for name, value in (("read_gb_s", ceilings.read_gb_s), ("bf16_tflop_s", ceilings.bf16_tflop_s)):
            out.append({"op": "ceiling", "provider": name, "shape": "", "dtype": "", "ms": float("nan"),
                        "graph_ms": float("nan"), "gb_s": value if name == "read_gb_s" else float("nan"),
                        "tflop_s": value if name == "bf16_tflop_s" else float("nan"), "floor_ms": float("nan"),
                        "floor_ratio": float("nan"), "bytes": 0, "flops": 0, **env})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in out:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("ms", "graph_ms", "gb_s", "tflop_s", "floor_ms", "floor_ratio", "bytes", "flops"):
            row[key] = float(row[key]) if row[key] not in ("", None) else float("nan")
    return rows


def plot(rows: list[dict], op: str, x_field: str, path: str, title_extra: str = "") -> None:
    """Time against problem size, one line per provider, with the floor drawn in (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["op"] == op]
    if not sel:
        return

    def x_of(r):
        return float(dict(kv.split("=") for kv in r["shape"].split())[x_field])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in dict.fromkeys(r["provider"] for r in sel):
        pts = sorted((x_of(r), _best(r)) for r in sel if r["provider"] == provider)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
    floor = sorted({(x_of(r), r["floor_ms"]) for r in sel})
    ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="floor (bytes/BW, FLOPs/rate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_field)
    ax.set_ylabel("time per call (ms, median)")
    env = sel[0]
    ax.set_title(f"{op} {title_extra}\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    """One line per measurement: time, graph time, floor ratio and speedup over each case's best peer."""
    best_peer = {}
    for r in rows:
        if is_peer(r["provider"]):
            key = (r["op"], r["shape"], r["dtype"])
            best_peer[key] = min(best_peer.get(key, float("inf")), _best(r))
    print(f"{'op':<18} {'shape':<34} {'provider':<26} {'ms':>9} {'graph ms':>9} {'floor':>6} {'vs best peer':>12}")
    for r in rows:
        peer = best_peer.get((r["op"], r["shape"], r["dtype"]))
        vs = f"{peer / _best(r):.2f}x" if peer and r["provider"] == "fused_ops" else ""
        print(f"{r['op']:<18} {r['shape']:<34} {r['provider']:<26} {r['ms']:>9.4f} {r['graph_ms']:>9.4f} "
              f"{r['floor_ratio']:>6.0%} {vs:>12}")


def _best(row: dict) -> float:
    g = row["graph_ms"]
    return min(row["ms"], g) if g == g else row["ms"]


def is_peer(provider: str) -> bool:
    """Providers named fused_ops* are this project's own variants, never its peers."""
    return not provider.startswith("fused_ops")
