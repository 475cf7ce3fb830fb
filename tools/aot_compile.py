r"""Compile every fastcurv Triton kernel ahead of time for a GPU target, on a machine without a GPU.

For each kernel variant the launchers can pick (every constexpr combination reachable through the public
ops, float32/float64, TF32 on and off), the launch is *captured* instead of run: the public ops are called
on CPU tensors with the Triton path forced, and the kernel's ``run`` records its arguments. Each captured
launch is then bound and specialised exactly as Triton's own launcher binds it (its binder: alignment and
divisibility attributes of pointers and integers, constexprs, ``num_warps``/``num_stages``) and compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90a; the Triton wheels ship ``ptxas``).

Per variant it records the registers, the spill stores/loads and stack frame (``ptxas -v`` on the PTX), the
static shared memory, and how ``tl.dot`` lowered: ``wgmma`` (Hopper warpgroup MMA) or ``mma.sync`` in the
PTX, ``HGMMA`` in the SASS (``cuobjdump -sass``), or neither (FMAs).

Usage (from the repository root, any Triton 3.6+)::

    python tools/aot_compile.py --out bench/results/aot_sm90_triton39.json

Prints a line per variant and writes JSON. Exit status 1 if any variant failed to compile or spills
(``--allow-spills`` keeps 0 for spills). ``--table A.json B.json`` prints the markdown summary of
``bench/results/README.md`` (one column group per JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "0"  # must precede the first import of triton: compile, never interpret
os.environ.setdefault("FASTCURV_BACKEND", "auto")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastcurv-aot-")  # always compile: ptxas logs every variant
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own `ptxas -v` log after each compilation

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from fastcurv import _backend, ops  # noqa: E402
from fastcurv.kernels import bfgs, complex_linear, kron_factor  # noqa: E402

KERNELS = {
    "kron_factor": kron_factor._kron_factor_kernel,
    "complex_matmul": complex_linear._complex_matmul_kernel,
    "bfgs_gemv": bfgs._bfgs_gemv_kernel,
    "bfgs_rank2": bfgs._bfgs_rank2_kernel,
}
# constexprs shown in the table (the rest are in the JSON)
_SHOWN = {
    "kron_factor": ("BLOCK", "BLOCK_K", "UPCAST", "INPUT_PRECISION"),
    "complex_matmul": ("C_RR", "C_II", "C_IR", "C_RI", "HAS_BIAS", "HAS_BIAS_IM", "PRECISION", "INT64", "BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "bfgs_gemv": ("STAGE", "MU1", "MU2", "BM", "BN"),
    "bfgs_rank2": ("HAS_GN", "BT"),
}
H100_SMS = 132


# ------------------------------------------------------------------------------------------------------
# capture: run the public ops with the Triton path forced; every kernel launch is recorded, not run
# ------------------------------------------------------------------------------------------------------
def _capture() -> list[tuple[str, tuple, dict, str]]:
    launches: list[tuple[str, tuple, dict, str]] = []
    scenario = ["?"]

    def recorder(name):
        def run(*args, grid, warmup=False, **kwargs):
            launches.append((name, args, kwargs, scenario[0]))
            return None

        return run

    for name, fn in KERNELS.items():
        fn.run = recorder(name)  # the instance attribute shadows JITFunction.run: kernel[grid](...) lands here
    _backend.use_triton = lambda t: True  # CPU tensors take the Triton path (launches are only recorded)
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=H100_SMS)

    def tf32_modes(dtype):
        return (False, True) if dtype == torch.float32 else (False,)

    # --- Kronecker factors: every (A, X) dtype pair, TF32, every BLOCK of the table, normalised or not
    kron_pairs = [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float64),
    ]
    for a_dt, x_dt in kron_pairs:
        for tf32 in tf32_modes(x_dt):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for d, m in ((4096, 1024), (16, 8)):  # many tiles (largest BLOCK), one tile (smallest BLOCK)
                for normalize in (True, False):
                    scenario[0] = f"kron {a_dt}/{x_dt} tf32={tf32} d={d} normalize={normalize}"
                    A = torch.zeros(d, d, dtype=a_dt)
                    X = torch.zeros(m, d, dtype=x_dt)
                    _kron(A, X, normalize)
    torch.backends.cuda.matmul.allow_tf32 = False

    # --- complex GEMM: through complex_linear forward and backward (the layouts the ops really pass),
    # every combination of present planes, dual or not, every subset of requested gradients
    M, K, N = 256, 512, 384
    for dt in (torch.float32, torch.float64):
        for tf32 in tf32_modes(dt):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for has_x_im in (True, False):
                for has_w_im in (True, False):
                    for bias in (None, "re", "both"):
                        for dual in (False, True):
                            for need in ((True, True, True, True), (True, True, False, False), (False, False, True, True),
                                         (True, False, True, False), (False, True, False, True)):
                                scenario[0] = (
                                    f"complex_linear {dt} tf32={tf32} x_im={has_x_im} w_im={has_w_im} bias={bias} "
                                    f"dual={dual} need={need}"
                                )
                                _complex_linear(dt, M, K, N, has_x_im, has_w_im, bias, dual, need)
            # direct calls with the documented coefficient tuples, and one problem past int32 offsets
            for coef in ((1, -1, 1, 1), (1, 1, 1, -1), (1, 0, 1, 1), (1, 1, 1, 0)):
                scenario[0] = f"complex_matmul {dt} tf32={tf32} coef={coef}"
                a, ai, b, bi = (torch.zeros(s, dtype=dt) for s in ((M, K), (M, K), (K, N), (K, N)))
                ops.complex_matmul(a, ai, b, bi, coef)
            scenario[0] = f"complex_matmul {dt} tf32={tf32} int64 offsets"
            n_before = len(launches)
            ops.complex_matmul(*(torch.zeros(s, dtype=dt) for s in ((M, K), (M, K), (K, N), (K, N))))
            name, args, kwargs, sc = launches.pop(n_before)
            launches.append((name, args, {**kwargs, "INT64": True}, sc))  # what a >2^31-element operand selects
    torch.backends.cuda.matmul.allow_tf32 = False

    # --- damped BFGS: every stage, damping and curvature-test combination
    for dt in (torch.float32, torch.float64):
        for mu1 in (None, 0.2):
            for mu2 in (None, 0.5):
                for gn in (None, [1.0, 2.0]):
                    scenario[0] = f"bfgs {dt} mu1={mu1} mu2={mu2} grad_norms={gn is not None}"
                    Hs = [torch.eye(n, dtype=dt) for n in (512, 2048)]
                    ss = [torch.ones(n, dtype=dt) for n in (512, 2048)]
                    ys = [torch.ones(n, dtype=dt) for n in (512, 2048)]
                    ops.damped_bfgs_update_foreach_(Hs, ss, ys, mu1=mu1, mu2=mu2, grad_norms=gn)
    return launches


def _kron(A, X, normalize: bool) -> None:
    ops.kron_factor_update_(A, X, 0.9, normalize=normalize)


def _complex_linear(dt, M, K, N, has_x_im, has_w_im, bias, dual, need) -> None:
    x = torch.zeros(M, K, dtype=dt, requires_grad=need[0])
    xi = torch.zeros(M, K, dtype=dt, requires_grad=need[1]) if has_x_im else None
    w = torch.zeros(N, K, dtype=dt, requires_grad=need[2])
    wi = torch.zeros(N, K, dtype=dt, requires_grad=need[3]) if has_w_im else None
    b = torch.zeros(N, dtype=dt) if bias else None
    bi = torch.zeros(N, dtype=dt) if bias == "both" else None
    y, yi = ops.complex_linear(x, xi, w, wi, b, bi, dual=dual)
    leaves = [t for t in (x, xi, w, wi) if t is not None and t.requires_grad]
    if leaves:
        torch.autograd.grad((y.sum() + yi.sum()), leaves, allow_unused=True)


# ------------------------------------------------------------------------------------------------------
# compile and inspect
# ------------------------------------------------------------------------------------------------------
def _bind(fn, target, args, kwargs):
    """Bind and specialise ``args`` exactly as ``fn[grid](*args, **kwargs)`` would for ``target``."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, signature, constexprs


def _bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_stats(out: str) -> dict:
    """Registers, stack and spills from the ``ptxas -v`` log Triton printed while compiling (exactly its own
    ptxas binary and flags)."""
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(spill.group(1)) if spill else None,
        "spill_store_bytes": int(spill.group(2)) if spill else None,
        "spill_load_bytes": int(spill.group(3)) if spill else None,
        "ptxas_log": out.strip().splitlines()[-3:],
    }


def _sass_has(cubin: bytes, pattern: str) -> bool | None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        try:
            sass = subprocess.run([_bin("cuobjdump"), "-sass", str(f)], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    return pattern in sass


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def compile_all(arch: int = 90, only: str | None = None) -> list[dict]:
    """Compile every captured variant (only those whose ``"<kernel> <scenario>"`` matches ``only``)."""
    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], {}
    for name, args, kwargs, scenario in _capture():
        if only and not re.search(only, f"{name} {scenario}"):
            continue
        fn = KERNELS[name]
        src, options, signature, constexprs = _bind(fn, target, args, kwargs)
        consts = {fn.arg_names[p[0]]: _jsonable(v) for p, v in constexprs.items()}
        sig = {k: v for k, v in signature.items() if v != "constexpr"}
        # one compilation per constexpr combination and launch options: the first real binding stands for
        # the others (they differ only in pointer/stride alignment attributes), which are counted
        key = (name, json.dumps(consts, sort_keys=True), json.dumps(sig, sort_keys=True), options.num_warps,
               options.num_stages)
        if key in seen:
            seen[key]["other_bindings"] += 1
            continue
        dtype = next((v for v in sig.values() if v.startswith("*fp")), "?").lstrip("*")
        row = {
            "kernel": name,
            "scenario": scenario,
            "dtype": dtype,
            "constexprs": consts,
            "signature": sig,
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
            "attrs": {str(k): str(v) for k, v in src.attrs.items()},
            "other_bindings": 0,
        }
        seen[key] = row
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                k = triton.compile(src, target=target, options=options.__dict__)
            ptx = k.asm["ptx"]
            row.update(_ptxas_stats(log.getvalue()))
            row["shared_bytes"] = getattr(k.metadata, "shared", None)
            row["wgmma"] = "wgmma.mma_async" in ptx
            row["mma_sync"] = "mma.sync" in ptx
            row["sass_hgmma"] = _sass_has(k.asm["cubin"], "HGMMA")
            row["error"] = None
        except Exception as e:  # noqa: BLE001 - recorded per variant, the sweep continues
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    shown = " ".join(f"{k}={r['constexprs'][k]}" for k in _SHOWN[r["kernel"]] if k in r["constexprs"])
    if r.get("error"):
        return f"{r['kernel']:15s} {r['dtype']:5s} w{r['num_warps']} s{r['num_stages']} {shown}  ERROR {r['error']}"
    dot = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "fma")
    return (
        f"{r['kernel']:15s} {r['dtype']:5s} w{r['num_warps']} s{r['num_stages']} regs={r['registers']:3d} "
        f"spill={r['spill_store_bytes']}/{r['spill_load_bytes']} stack={r['stack_bytes']} smem={r['shared_bytes']} "
        f"dot={dot} {shown}"
    )


def markdown_table(paths: list[Path]) -> str:
    """One row per kernel, dtype, dot precision and launch shape; registers (min-max over the variants),
    the largest spill and the lowering of tl.dot, one column group per JSON (Triton version)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]

    def group(r: dict) -> tuple:
        c = r["constexprs"]
        prec = c.get("INPUT_PRECISION", c.get("PRECISION", "-"))
        if r["kernel"] == "kron_factor" and c.get("BLOCK_K") == 64:
            prec = "bf16/fp16 X"
        blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_K", "BM", "BN", "BT") if k in c)
        return (r["kernel"], r["dtype"], prec, f"{blocks} w{r['num_warps']} s{r['num_stages']}")

    rows: dict[tuple, list] = {}
    for i, rep in enumerate(reports):
        for r in rep["variants"]:
            rows.setdefault(group(r), [[] for _ in reports])[i].append(r)
    head = "| kernel | dtype | dot | blocks, warps, stages |" + "".join(
        f" triton {rep['triton']}: variants, registers, max spill (B), dot |" for rep in reports
    )
    lines = [head, "|" + "---|" * (4 + len(reports))]
    for key in sorted(rows):
        cells = []
        for rs in rows[key]:
            ok = [r for r in rs if not r["error"]]
            if not rs:
                cells.append(" - |")
                continue
            if not ok:
                cells.append(f" {len(rs)}, compile error |")
                continue
            regs = sorted(r["registers"] for r in ok)
            spill = max(max(r["spill_store_bytes"], r["spill_load_bytes"]) for r in ok)
            dot = {"wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "fma" for r in ok}
            err = f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
            cells.append(f" {len(rs)}{err}, {regs[0]}-{regs[-1]}, {spill}, {'/'.join(sorted(dot))} |")
        lines.append("| " + " | ".join(key) + " |" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--table", type=Path, nargs="+", help="print a markdown table of these JSONs and exit")
    p.add_argument("--only", help='compile only the variants whose "<kernel> <scenario>" matches this regex')
    p.add_argument("--merge", action="store_true", help="with --only and --out: replace the matching rows of --out")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--allow-spills", action="store_true", help="exit 0 even when a variant spills")
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(a.table))
        return 0
    rows = compile_all(a.arch, a.only)
    if a.merge and a.only and a.out and a.out.exists():  # keep the other rows of an earlier full run
        old = json.loads(a.out.read_text())["variants"]
        rows = [r for r in old if not re.search(a.only, f"{r['kernel']} {r['scenario']}")] + rows
    report = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": f"cuda sm_{a.arch} (GPUTarget('cuda', {a.arch}, 32))",
        "variants": rows,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and (r["spill_store_bytes"] or r["spill_load_bytes"])]
    print(f"triton {triton.__version__}: {len(rows)} variants, {len(failed)} failed, {len(spilled)} spill")
    return 1 if failed or (spilled and not a.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
