"""Offline PTX / SASS report of Pallas-Triton kernels (no GPU needed).

  PYTHONPATH=<triton 3.6.0> python -m experiments.dev.sass_report [--out DIR] [--variants base w8s2 ...]

jax 0.11 hands Pallas-Triton kernels to XLA as Triton IR (custom call "__gpu$xla.gpu.triton", MLIR bytecode in its
backend config), so the PTX is never seen in Python. Here a jitted call is lowered for CUDA, the TTIR of its
kernels is taken out of the custom calls and compiled for sm_90a by the standalone ``triton`` package (a proxy for
XLA's Triton: same front end, its own version), then ``ptxas -v`` and ``cuobjdump -sass`` (Triton's bundled
tools) report registers, spills, the MMA instructions in PTX and SASS opcode counts.

The CLI reports the bf16 SLA2 Triton forward kernel (pallas_kernels.triton_forward, through attention.forward) of
the wan-1.3b call (B=1, H=12, N=32760, D=128, b_q 128, b_k 64, topk 25) under the H100 launch table
(``hopper_config``: heuristic_config(gpu="hopper") with the Triton kernels), for each variant of VARIANTS (changes of
its Triton launch parameters). experiments.dev.check_int8_gpu uses the same functions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import tarfile

import jax
import jax.numpy as jnp

SASS_OPS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "I2F", "I2FP", "MUFU.EX2", "F2FP", "LDL", "STL", "LDSM", "BAR")


def hopper_config(n=32760, d=128, dtype=jnp.bfloat16, launch=None, **changes):
    """The KernelConfig of a call on an H100 with the Triton kernels (their SASS is what this reports), also on a
    machine without a GPU: heuristic_config(gpu="hopper") with forward / backward "triton", the given fields changed
    and launch entries ({kernel: (warps, stages, rows)}) merged into the H100 launch table."""
    from pallas_kernels import heuristic_config

    config = heuristic_config(n, d, dtype, gpu="hopper").replace(forward="triton", backward="triton", **changes)
    if launch:
        table = dict(config.launch)
        table.update({kernel: tuple(params) for kernel, params in launch.items()})
        config = config.replace(launch=tuple(table.items()))
    return config


def kernel_ttir(fn, args, label, match=("fwd",)):
    """{label_kernelname: (ttir text, num_warps, num_stages)} of the Pallas-Triton kernels in jit(fn)(*args) whose
    name contains one of ``match``; args may be ShapeDtypeStructs (lowered for CUDA, nothing runs)."""
    import jaxlib.triton.dialect as ttd
    from jax._src.lib.mlir import ir

    found = {}

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in o.attributes:
                        cfg = ir.DictAttr(o.attributes["mhlo.backend_config"])
                        kname = ir.StringAttr(cfg["name"]).value
                        if any(m in kname for m in match):
                            ctx = ir.Context()
                            ttd.register_dialect(ctx)
                            mod = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes, context=ctx)
                            warps, stages = (ir.IntegerAttr(cfg[k]).value for k in ("num_warps", "num_stages"))
                            found[f"{label}_{kname}"] = (mod.operation.get_asm(), warps, stages)
                    walk(o.operation)

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def _compile_one(name, ttir, warps, stages, work):
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    base = os.path.join(work, name)
    with open(base + ".ttir", "w") as f:
        f.write(ttir)
    kern = triton.compile(
        base + ".ttir", target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ptx = kern.asm["ptx"]
    with open(base + ".ptx", "w") as f:
        f.write(ptx)
    with open(base + ".cubin", "wb") as f:
        f.write(kern.asm["cubin"])
    cmd = [os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", base + ".ptx", "-o", base + ".ptxas.cubin"]
    rep = subprocess.run(cmd, check=False, capture_output=True, text=True).stderr
    cmd = [os.path.join(tools, "cuobjdump"), "-sass", base + ".cubin"]
    sass = subprocess.run(cmd, check=False, capture_output=True, text=True).stdout
    with open(base + ".sass", "w") as f:
        f.write(sass)
    ops = collections.Counter()
    for op in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.MULTILINE):
        ops.update(w for w in SASS_OPS if op == w or op.startswith(w + "."))
    regs = re.search(r"Used (\d+) registers", rep)
    spill = re.search(r"(\d+) bytes spill stores", rep)
    return {
        "kernel": name,
        "warps_stages": [warps, stages],
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "ptx_mma": sorted(set(re.findall(r"((?:wgmma\.mma_async|mma\.sync)[\w.]*)", ptx))),
        "sass_mma": sorted(set(re.findall(r"\b((?:HGMMA|IGMMA|QGMMA|HMMA|IMMA)\.[\w.]+)", sass))),
        "sass_counts": dict(ops),
        "sass_lines": sass.count("\n"),
        "ptxas": " ".join(x.split(":", 1)[-1].strip() for x in rep.splitlines() if "Used" in x or "spill" in x),
    }


def compile_report(kernels, out_dir, work="/tmp/sla_sass", archive="ptx_sass.tar.gz"):
    """Compile {name: (ttir, warps, stages)} for sm_90a; returns one dict per kernel (registers, spills, MMA
    instructions, SASS opcode counts) and writes DIR/sass_summary.txt and DIR/<archive> (TTIR, PTX, SASS)."""
    import triton

    os.makedirs(work, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    rows = [_compile_one(name, *spec, work) for name, spec in kernels.items()]
    with open(os.path.join(out_dir, "sass_summary.txt"), "w") as f:
        f.write(f"# standalone triton {triton.__version__}, sm_90a\n")
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with tarfile.open(os.path.join(out_dir, archive), "w:gz") as tf:
        for name in kernels:
            for p in sorted(glob.glob(os.path.join(work, name + ".*"))):
                if not p.endswith("cubin"):
                    tf.add(p, arcname=os.path.basename(p))
    return rows


# ----------------------------------------------------------------------------------------------------------
# CLI: the bf16 forward kernel of the wan-1.3b call, per variant
# ----------------------------------------------------------------------------------------------------------
# name -> Triton launch changes {kernel: (warps, stages, rows)} of hopper_config; empty = the H100 table.
VARIANTS = {
    "base": {},
    "w8s2": {"fwd": (8, 2, 64)},
    "w4s3": {"fwd": (4, 3, 64)},
    "keys128": {"fwd": (8, 2, 128)},
}


def forward_kernels(variant, n=32760, heads=12, topk=25, fused=True, residuals=True):
    """TTIR of the bf16 Triton forward kernel under one variant (its KernelConfig is part of the call)."""
    from pallas_kernels import attention
    from pallas_kernels.common import validate_call

    config = hopper_config(n, 128, launch=VARIANTS[variant])
    sds = jax.ShapeDtypeStruct
    x = sds((1, n, heads, 128), jnp.bfloat16)
    nq = -(-n // 128)
    lut, alpha = sds((1, heads, nq, topk), jnp.int32), sds((1, heads, nq), jnp.float32)

    def call(q, lut, a):
        cfg = validate_call(q, q, q, q, q, lut, 128, 64, "complement", None, 1e-6, False, config)
        return attention.forward(q, q, q, q, q, lut, a, cfg, fused=fused, residuals=residuals)["o"]

    return kernel_ttir(call, (x, lut, alpha), variant, match=("fwd",))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sass_out")
    ap.add_argument("--variants", nargs="*", default=["base"], choices=list(VARIANTS))
    ap.add_argument("--no-residuals", action="store_true", help="the forward-only call (custom_vjp primal)")
    args = ap.parse_args()
    kernels = {}
    for v in args.variants:
        kernels.update(forward_kernels(v, residuals=not args.no_residuals))
    rows = compile_report(kernels, args.out)
    for r in rows:
        print(r["kernel"], r["warps_stages"], "regs", r["registers"], "spill B", r["spill_store_bytes"])
        print("   ", r["sass_counts"], r["ptx_mma"])


if __name__ == "__main__":
    main()
