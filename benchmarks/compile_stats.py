"""Register use and spills of attnswap's Triton kernels compiled for sm_90 (H100/H200), without a GPU.

Two steps, both on a CPU, in a process where the kernels are real ``JITFunction``s (no ``TRITON_INTERPRET``):
1. capture: each kind's public entry points (forward, backward, decode) run once on small CPU tensors while the
   launches of ``JITFunction.run`` and ``Autotuner.run`` are recorded instead of executed. The host code thus picks
   exactly what it picks on a GPU (tile shapes, padded head dims, dot precision, the autotune configs left after
   its pruner), with no per-module knowledge here; the kernels' outputs stay uninitialized, which the host code
   around the launches does not mind.
2. compile: every distinct launch, once per config the autotuner would try, is specialized by Triton's own binder
   (ints equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility hints, as at a
   real launch) and compiled for ``GPUTarget("cuda", 90, 32)`` in a fresh cache folder (a cache hit would skip
   ptxas); ptxas's ``-v`` log gives registers, spill stores/loads and the stack frame (``cuobjdump -res-usage`` on
   the cubin when no log came), Triton's metadata the shared memory.

One JSON line per (kind, kernel, variant, head dim, dtype, config) goes to ``benchmarks/results/sm90-compile.jsonl``
(``--out`` for another folder); a table and the line ``spilling configs: N of M`` (with the list) go to stdout.
The exit code is 0 whether or not a config spills. From Python: ``compile_stats(kinds=..., dims=...)``.

    python benchmarks/compile_stats.py [--kernels entmax,topk,flash,linear,taylor,window_linear] [--dims 64,128] [--dtype bf16]
                                       [--only _fwd_kernel] [--max-configs N] [--ptxas triton|legacy|PATH]
                                       [--smoke] [--out DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, choices, record  # noqa: E402

BENCH = "compile_stats"
TARGET = "sm_90"
RESULTS_FILE = "sm90-compile"  # benchmarks/results/sm90-compile.jsonl
KINDS = ("entmax", "topk", "flash", "linear", "taylor", "window_linear")
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100/H200 (227 KiB)
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")

TABLE = [("kind", "kind"), ("kernel", "kernel"), ("variant", "variant"), ("d", "d"), ("config", "config"),
         ("n_regs", "regs"), ("spill_stores_bytes", "spill st B"), ("spill_loads_bytes", "spill ld B"),
         ("stack_bytes", "stack B"), ("shared_bytes", "smem B"), ("compile_s", "s", ".1f"), ("error", "error")]


@dataclass
class Launch:
    """One recorded kernel launch: the JITFunction, its arguments, and the configs a GPU run would compile
    (the autotuner's list after pruning, or ``[{}]`` for a direct launch whose kwargs carry warps/stages)."""

    kind: str
    fn: object
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=lambda: [{}])
    variant: str = ""

    @property
    def name(self) -> str:
        return self.fn.__name__


# ---------------------------------------------------------------- step 1: capture the launches


def _interpreting() -> bool:
    """True when attnswap's kernels are (or would be) Triton-interpreter functions in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    module = sys.modules.get("attnswap.kernels.flash_fwd")
    return module is not None and type(module._fwd_kernel).__name__ == "InterpretedFunction"


def _jit_fn(fn):
    """The JITFunction under any autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


@contextlib.contextmanager
def recording(kind: str, launches: list):
    """Within the block, kernel launches are appended to ``launches`` instead of run (autotuned ones with the
    configs their pruner keeps for these arguments)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(kind, self, args, kwargs))

    def tuned_run(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = [c.all_kwargs() for c in self.prune_configs(kwargs)]
        finally:
            self.nargs = None
        launches.append(Launch(kind, _jit_fn(self.fn), args, kwargs, configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def _drive(kind: str, d: int, dtype) -> None:
    """Call ``kind``'s entry points as a causal GQA model layer would (inference forward, training forward and
    backward; entmax and flash also the split-KV decode), on CPU tensors. Lengths are long enough that no autotune config
    is pruned for size; nothing is computed."""
    import torch

    b, hq, hkv, n = 1, 4, 2, 1024
    q, k, v = (torch.zeros(b, h, n, d, dtype=dtype) for h in (hq, hkv, hkv))
    scaling = d ** -0.5

    def both(fwd):  # inference, then training (forward + backward)
        with torch.no_grad():
            fwd(q, k, v)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        fwd(qg, kg, vg).backward(torch.zeros(b, hq, n, d, dtype=dtype))

    if kind == "entmax":
        from attnswap.kernels.entmax import entmax_attention

        from attnswap.kernels.entmax_decode import decode_forward

        both(lambda q, k, v: entmax_attention(q, k, v, alpha=1.5, scaling=scaling, causal=True))
        # one split-KV decode step against 4096 keys per power mode; splits given (the default asks the GPU)
        kd, vd = (torch.zeros(b, hkv, 4096, d, dtype=dtype) for _ in range(2))
        with torch.no_grad():
            for alpha in (1.5, 2.0, 1.3):
                decode_forward(q[:, :, :1], kd, vd, alpha=alpha, scaling=scaling, causal=True, offset=4095,
                               splits=64)
    elif kind == "topk":
        from attnswap.kernels.topk import topk_attention

        both(lambda q, k, v: topk_attention(q, k, v, k_top=64, scaling=scaling, causal=True))
    elif kind == "flash":
        from attnswap.kernels.flash_bwd import flash_backward
        from attnswap.kernels.flash_decode import flash_decode
        from attnswap.kernels.flash_fwd import flash_forward

        o, lse = flash_forward(q, k, v, scaling=scaling, causal=True, split_kv=False)
        flash_backward(torch.zeros_like(o), q, k, v, o, lse, scaling=scaling, causal=True)
        # one decode step against 4096 keys; splits given (the default asks the GPU for its SM count)
        kd, vd = (torch.zeros(b, hkv, 4096, d, dtype=dtype) for _ in range(2))
        flash_decode(q[:, :, :1], kd, vd, scaling=scaling, causal=True, offset=4095, splits=66)
    elif kind == "linear":  # the chunk-parallel engine over features (linear_parallel): ELU+1, F = d
        from attnswap.kernels.linear_parallel import parallel_linear_attention
        from attnswap.kinds.linear import elu_plus_one

        mask = torch.ones(b, n, dtype=torch.bool)
        for kw in ({"causal": True}, {"causal": False}, {"causal": True, "window": 256, "key_mask": mask}):
            both(lambda q, k, v, kw=kw: parallel_linear_attention(elu_plus_one(q), elu_plus_one(k), v, **kw))
        from attnswap.kernels.state_step import state_step  # the StateCache's fused decode step, F = d and 2d

        for f in (d, 2 * d):
            state_step(torch.zeros(b, hkv, hq // hkv, f), torch.zeros(b, hkv, f), torch.zeros(b, hkv, d),
                       torch.zeros(b, hkv, f, d), torch.zeros(b, hkv, f), torch.zeros(hq))
    elif kind == "taylor":  # the score form (flash kernels, Taylor weights) and the feature form (the engine)
        from attnswap.kernels.flash_bwd import flash_backward
        from attnswap.kernels.flash_fwd import flash_forward
        from attnswap.kernels.linear_parallel import parallel_linear_attention
        from attnswap.kinds.taylor import make_feature_map

        o, lse = flash_forward(q, k, v, scaling=scaling, causal=True, taylor=True)
        flash_backward(torch.zeros_like(o), q, k, v, o, lse, scaling=scaling, causal=True, taylor=True)
        phi = make_feature_map(scaling)
        both(lambda q, k, v: parallel_linear_attention(phi(q), phi(k), v, causal=True))
    elif kind == "window_linear":  # the exact sink/window part beside the engine's linear part (Hedgehog, F = 2d)
        from attnswap.kernels.window_linear import window_linear_attention
        from attnswap.kinds.linear import hedgehog

        for extra in ({}, {"sinks": torch.zeros(hq), "starts": torch.full((b,), 3, dtype=torch.int32)}):
            both(lambda q, k, v, extra=extra: window_linear_attention(
                q, k, v, hedgehog(q), hedgehog(k), local_window=64, sink_tokens=4, scaling=scaling, **extra))
    else:
        raise ValueError(f"unknown kind {kind!r}; valid: {','.join(KINDS)}")


def _arg_key(x):
    """What of an argument decides its compiled specialization: a tensor's dtype, an int's 1 / multiple-of-16 /
    other class, else the value itself."""
    if hasattr(x, "data_ptr"):
        return str(x.dtype)
    if isinstance(x, bool) or not isinstance(x, int):
        return x if isinstance(x, (str, float, type(None), bool)) else type(x).__name__
    return "1" if x == 1 else "D" if x % 16 == 0 else "i"


def _short(value):
    return int(value) if isinstance(value, bool) else value


def capture(kind: str, d: int, dtype) -> list[Launch]:
    """The distinct launches of ``kind`` at head dim ``d``, each labelled with the constexprs that tell it from the
    other launches of the same kernel (``NEED_GRAD=1``), in first-launch order."""
    launches: list[Launch] = []
    with recording(kind, launches):
        _drive(kind, d, dtype)
    distinct, seen = [], set()
    for la in launches:
        key = (la.name, tuple(_arg_key(a) for a in la.args),
               tuple(sorted((k, _arg_key(v)) for k, v in la.kwargs.items())),
               tuple(tuple(sorted(c.items())) for c in la.configs))
        if key not in seen:
            seen.add(key)
            distinct.append(la)
    for la in distinct:
        same = [o.kwargs for o in distinct if o.name == la.name]
        varying = sorted(k for k in la.kwargs if k not in OPTION_KEYS
                         and any(o.get(k) != la.kwargs[k] for o in same))
        la.variant = ",".join(f"{k}={_short(la.kwargs[k])}" for k in varying)
    return distinct


# ---------------------------------------------------------------- step 2: compile for sm_90


_LOG_PATTERNS = {
    "n_regs": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(text: str) -> dict:
    """{n_regs, stack_bytes, spill_stores_bytes, spill_loads_bytes} from a ``ptxas -v`` log (None when absent)."""
    out = {}
    for key, pattern in _LOG_PATTERNS.items():
        match = pattern.search(text)
        out[key] = int(match.group(1)) if match else None
    return out


def cubin_resources(cubin: bytes) -> dict:
    """{n_regs, stack_bytes} of a cubin by ``cuobjdump -res-usage`` (no spill split there): the fallback when
    ptxas printed no log."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return {"n_regs": int(reg.group(1)) if reg else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "spill_stores_bytes": None, "spill_loads_bytes": None}


def ptxas_tool():
    """Triton's ptxas for sm_90 (``knobs.NvidiaTool``: path, version), or None when it cannot be found/run."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(90)
        return tool if tool is not None and os.access(tool.path, os.X_OK) else None
    except Exception:  # noqa: BLE001  (no NVIDIA backend in this Triton)
        return None


def use_ptxas(choice: str | None) -> None:
    """Make Triton compile sm_90 with another ptxas: ``legacy`` is Triton's bundled pre-Blackwell ``ptxas`` (what
    Triton <= 3.8 runs for sm_90; 3.9 runs ``ptxas-blackwell``), else a path. Set before the first compile."""
    if not choice or choice == "triton":
        return
    if choice == "legacy":
        from triton import knobs

        choice = knobs.nvidia.ptxas.path
    if not os.access(choice, os.X_OK):
        raise SystemExit(f"--ptxas: {choice!r} is not an executable")
    os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = choice


def specialize(launch: Launch, config: dict, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them for this launch + config."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **config}
    _, spec, options = binder(*launch.args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {name: s[0] for name, s in zip(names, spec)}
    constexprs = {(i,): s[1] for i, s in enumerate(spec) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, backend.parse_options({**options, "debug": False})


def compile_one(launch: Launch, config: dict, target, backend) -> dict:
    """Compile one launch + config for ``target``: ptxas numbers, shared memory, seconds; ``error`` on failure."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kwargs = {**launch.kwargs, **config}
    blocks = {p.name: kwargs[p.name] for p in launch.fn.params if p.name.startswith("BLOCK") and p.name in kwargs}
    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    row = dict(kernel=launch.name, variant=launch.variant, blocks=blocks, num_warps=warps, num_stages=stages,
               config=f"{'x'.join(str(v) for v in blocks.values())} w{warps} s{stages}")
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs, options = specialize(launch, config, backend)
        with tempfile.TemporaryDirectory(prefix="attnswap-sm90-") as cache, knobs.cache.scope(), \
                knobs.nvidia.scope(), contextlib.redirect_stdout(log):  # triton print()s ptxas's log
            knobs.cache.dir = cache  # fresh for every compile: a cache hit would skip ptxas and its log
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # noqa: BLE001  (a config that does not compile is a result too)
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return dict(row, n_regs=None, spill_stores_bytes=None, spill_loads_bytes=None, stack_bytes=None,
                    shared_bytes=None, smem_fits=None, compile_s=time.perf_counter() - t0, source=None,
                    error=f"{type(err).__name__}: {first_line}")
    seconds = time.perf_counter() - t0
    stats, source = parse_ptxas_log(log.getvalue()), "ptxas -v"
    if stats["n_regs"] is None:
        stats, source = cubin_resources(compiled.asm["cubin"]), "cuobjdump -res-usage"
    shared = int(compiled.metadata.shared)
    return dict(row, **stats, shared_bytes=shared, smem_fits=shared <= SMEM_LIMIT, compile_s=seconds,
                source=source, error=None)


def _spills(row: dict) -> bool:
    return bool(row.get("spill_stores_bytes") or row.get("spill_loads_bytes"))


def compile_stats(kinds=KINDS, dims=(64, 128), dtype: str = "bfloat16", *, only=None, max_configs=None,
                  ptxas=None, on_row=None) -> list[dict]:
    """Rows {kind, kernel, variant, d, dtype, config, blocks, num_warps, num_stages, n_regs, spill_stores_bytes,
    spill_loads_bytes, spill, stack_bytes, shared_bytes, smem_fits, compile_s, source, error, target, triton, ptxas,
    kernels_modified} for each kernel of ``kinds`` at each head dim, one per config the GPU's autotuner would try
    (``max_configs``: the first N only). ``only``: kernel names to keep (e.g. ``["_fwd_kernel"]``). ``ptxas``:
    ``"legacy"`` or a path (see ``use_ptxas``). ``on_row(row)`` sees each row as it is made. In a process that runs
    the kernels in the Triton interpreter (tests) the work runs in a fresh subprocess without it."""
    kinds, dims = list(kinds), [int(d) for d in dims]
    if _interpreting():
        return _in_subprocess(kinds, dims, dtype, only, max_configs, ptxas, on_row)
    use_ptxas(ptxas)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.6's default, without 3.9's warning
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    tool = ptxas_tool()
    if tool is None:
        raise RuntimeError("no ptxas for sm_90 in this Triton (triton/backends/nvidia/bin): cannot compile")
    torch_dtype = getattr(torch, DTYPES[dtype])
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    common = dict(dtype=DTYPES[dtype], target=TARGET, triton=triton.__version__, ptxas=tool.version, bench=BENCH,
                  kernels_modified=_kernels_modified())
    rows = []
    for kind in kinds:
        for d in dims:
            for launch in capture(kind, d, torch_dtype):
                if only and launch.name not in only:
                    continue
                for config in launch.configs[:max_configs]:
                    row = compile_one(launch, config, target, backend)
                    row = dict(kind=kind, d=d, **common, **row, spill=_spills(row))
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def _kernels_modified() -> list[str]:
    """The files under attnswap/kernels that differ from the commit (the rows describe the working tree)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "attnswap/kernels"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    except OSError:
        return []
    return sorted(line[3:] for line in out.splitlines() if line.strip())


def _in_subprocess(kinds, dims, dtype, only, max_configs, ptxas, on_row) -> list[dict]:
    """Run this script in a child without ``TRITON_INTERPRET`` and read its rows back."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--kernels", ",".join(kinds),
               "--dims", ",".join(map(str, dims)), "--dtype", dtype, "--out", out, "--quiet"]
        if only:
            cmd += ["--only", ",".join(only)]
        if max_configs:
            cmd += ["--max-configs", str(max_configs)]
        if ptxas:
            cmd += ["--ptxas", ptxas]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compile_stats subprocess failed ({done.returncode}):\n{done.stderr[-2000:]}")
        path = Path(out) / f"{RESULTS_FILE}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for row in rows:
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(KINDS), help=f"kinds whose kernels to compile: {','.join(KINDS)}")
    ap.add_argument("--dims", default="64,128", help="head dims")
    ap.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (the inputs' dtype)")
    ap.add_argument("--only", default=None, help="kernel names to keep, e.g. _fwd_kernel,_out_kernel")
    ap.add_argument("--max-configs", type=int, default=None, help="the first N configs of each kernel only")
    ap.add_argument("--ptxas", default="triton", help="triton (the ptxas this Triton runs for sm_90) | legacy "
                    "(its pre-Blackwell ptxas, the one Triton <= 3.8 runs for sm_90) | a path")
    ap.add_argument("--smoke", action="store_true", help="head dim 64 and one config per kernel")
    ap.add_argument("--out", default=None, help="folder of the JSON lines (default benchmarks/results)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no table (the rows still go to the JSON lines)")
    args = ap.parse_args(argv)
    args.kernels = choices("--kernels", args.kernels, KINDS)
    try:
        args.dims = [int(x) for x in args.dims.split(",") if x]
    except ValueError:
        raise SystemExit(f"--dims takes comma-separated integers, got {args.dims!r}") from None
    if args.dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    args.only = [x for x in args.only.split(",") if x] if args.only else None
    if args.smoke:
        args.dims, args.max_configs = [64], 1
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)

    def emit(row):
        if not args.no_record:
            record(RESULTS_FILE, out_dir=args.out, **row)
        if not args.quiet:
            regs = "-" if row["n_regs"] is None else row["n_regs"]
            spill = (f"spills {row['spill_stores_bytes']}/{row['spill_loads_bytes']} B st/ld" if row["spill"]
                     else "no spill" if row["error"] is None else row["error"])
            print(f"{row['kind']:7s} {row['kernel']:18s} {row['variant']:16s} d={row['d']:<4d} {row['config']:16s} "
                  f"regs {regs:>4}  {spill}  ({row['compile_s']:.1f} s)", flush=True)

    rows = compile_stats(args.kernels, args.dims, args.dtype, only=args.only, max_configs=args.max_configs,
                         ptxas=args.ptxas, on_row=emit)
    if not args.quiet:
        from attnswap.evals.report import format_table

        print()
        print(format_table(rows, TABLE))
        spilling = [r for r in rows if r["spill"]]
        print(f"\nspilling configs: {len(spilling)} of {len(rows)}")
        for r in spilling:
            print(f"  {r['kind']} {r['kernel']} {r['variant']} d={r['d']} {r['config']}: "
                  f"{r['spill_stores_bytes']} B stores, {r['spill_loads_bytes']} B loads, {r['n_regs']} regs")
        for r in rows:
            if r["error"] is not None:
                print(f"  did not compile: {r['kind']} {r['kernel']} d={r['d']} {r['config']}: {r['error']}")
            elif not r["smem_fits"]:
                print(f"  over the {SMEM_LIMIT} B shared-memory limit (the autotuner skips it): {r['kind']} "
                      f"{r['kernel']} d={r['d']} {r['config']} ({r['shared_bytes']} B)")
        where = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
        print(f"{len(rows)} rows" + ("" if args.no_record else f" appended to {where / (RESULTS_FILE + '.jsonl')}"))
    return rows


if __name__ == "__main__":
    main()
