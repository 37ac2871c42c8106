"""GPU check: the fused forward without phi arrays (phi(K) in the states kernel, phi(Q) in the Mosaic epilogue,
routing from block means alone) against the form with phi arrays (the front end writes phi(Q), phi(K)).

    python -m experiments.dev.check_phi_in_kernels --out DIR [--sparsity 0.95 0.97] [--parts small wan states]
        [--cases 0.97:complement ...] [--no-fwd-bwd] [--forms no_phi_arrays phi_arrays]
        [--small-kernel block_sum_dtype=float16]

1. small: fresh seed; N 1000 / 2048 / 776 / 1048, D 128 / 64, bf16 / f16, both linear scopes, the three feature
   maps; the Mosaic forward and backward (heuristic_config): output and the gradients of q, k, v, alpha vs jax.grad
   of the dense float32 reference with phi applied by JAX, and vs the same kernels given phi arrays.
   small_low_bit (--parts small_low_bit): the same for the low-bit forwards (int8, int8_fp8; 16-bit cases).
2. wan: wan-1.3b (B1 H12 N32760 D128 bf16; --workload wan-14b-720p: B1 H40 N75600) per sparsity and scope: the
   module forward (sla2_attention, SLA router, alpha = captured mass) in both forms: their outputs vs each other,
   CUPTI kernel times per kernel name, in-model time (--layers calls on distinct inputs in one jit) and one
   synchronised call, with cuDNN in the same process; the module forward+backward in-model the same way, with its
   CUPTI kernel times (not for the low-bit forms "int8", "int8_fp8", whose backward is the bf16 one).
3. states (--parts states): CUPTI times of the complement states at wan-1.3b, 95%, from phi(K) and from K (phi in
   the kernel), per Triton launch of the "sum" kernel (--launches).
JSON to DIR/check_phi_in_kernels.json (written after each wan row and at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark import with_kernel_changes
from experiments.dev.common import bench, kernel_ms, phi_array_low_bit_route, record_error, rel, uniform_lut
from experiments.timing import in_model_seconds
from pallas_kernels import heuristic_config, sla2_fused_attention
from pallas_kernels.reference import reference_fused
from sla2_jax.feature_maps import PHI_FUNCTIONS

RESULTS: dict = {}
# the wan part's module forms (module_forms)
FORMS = ("no_phi_arrays", "phi_arrays", "int8", "int8_fp8", "int8_phi_arrays", "int8_fp8_phi_arrays",
         "f16_block_sums")
SMALL = [  # (N, D, topk, dtype, scope, feature map, B, H)
    (1000, 128, 3, jnp.bfloat16, "complement", "softmax", 1, 2),
    (2048, 64, 5, jnp.bfloat16, "all", "softmax", 1, 2),
    (776, 64, 2, jnp.float16, "complement", "softmax", 1, 2),
    (1048, 128, 4, jnp.bfloat16, "complement", "elu", 1, 2),
    (1000, 128, 3, jnp.float16, "all", "relu", 1, 2),
    (1000, 128, 3, jnp.bfloat16, "complement", "softmax", 2, 6),  # B > 1, H > 2: the kernels' program ids
]


def _form_errors(ref, no_arrays, arrays, args, w):
    """{"vs_dense", "arrays_vs_dense", "vs_arrays"}: relative errors of the output and the gradients of sum(o * w)
    w.r.t. args = (q, k, v, alpha) of the form without phi arrays and the form with them, against the dense
    reference and against each other."""
    def with_grads(fn):
        loss = lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * w)  # noqa: E731
        return jax.jit(lambda *x: (fn(*x), jax.grad(loss, argnums=(0, 1, 2, 3))(*x)))

    def errors(got, want):  # (o, grads) each
        grads = {f"d{x}": rel(a, b) for x, a, b in zip(("q", "k", "v", "alpha"), got[1], want[1])}
        return {"o": rel(got[0], want[0]), **grads}

    r, n, a = (with_grads(f)(*args) for f in (ref, no_arrays, arrays))
    return {"vs_dense": errors(n, r), "arrays_vs_dense": errors(a, r), "vs_arrays": errors(n, a)}


def _small_inputs(seed, n, d, topk, dtype, k_offset, b=1, h=2):
    """A SMALL case's inputs: q, k, v (B, N, H, D) dtype, w (B, N, H, D) f32 (the loss weights), an ascending
    uniform LUT (b_q 128, b_k 64), alpha (B, H, Nq) in [0.2, 0.8]. k has its mean over N removed, or with k_offset a
    common offset added (so that the low-bit forward's smoothing matters)."""
    rng = np.random.default_rng([seed, n, d, b, h])
    nq, nk = -(-n // 128), -(-n // 64)
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(4))
    if k_offset:
        k = k + 0.5 * jnp.asarray(rng.standard_normal(d), jnp.float32)
    else:
        k = k - k.mean(axis=1, keepdims=True)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    lut = uniform_lut(rng, b, h, nq, nk, topk)
    alpha = jnp.asarray(rng.uniform(0.2, 0.8, (b, h, nq)), jnp.float32)
    return (q, k, v, alpha), w, lut


def _dense_reference(phi, lut, scope):
    """fn(q, k, v, alpha): the dense float32 fused reference with phi applied by JAX."""
    def ref(q, k, v, a):
        q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
        return reference_fused(q32, k32, v32, phi(q32), phi(k32), lut, a, block_q=128, block_k=64, linear_scope=scope)

    return ref


def _with_phi_arrays(fused, phi):
    """fn(q, k, v, alpha) = fused(q, k, v, phi(q), phi(k), alpha), phi in float32 rounded to the inputs' dtype."""
    def arrays(q, k, v, a):
        qp, kp = (phi(x.astype(jnp.float32)).astype(x.dtype) for x in (q, k))
        return fused(q, k, v, qp, kp, a)

    return arrays


def small_checks(kernel_changes=None):
    """The SMALL cases under heuristic_config(...) with kernel_changes (kernel_fields; both forms)."""
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    rows = []
    for n, d, topk, dtype, scope, kind, b, h in SMALL:
        row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name, scope=scope, feature_map=kind, b=b, h=h)
        try:
            args, w, lut = _small_inputs(seed, n, d, topk, dtype, k_offset=False, b=b, h=h)
            phi = PHI_FUNCTIONS[kind]
            config = with_kernel_changes(heuristic_config(n, d, dtype, 128, 64), kernel_changes or {})
            row["forward"], row["backward"] = config.forward, config.backward
            row["kernel_changes"] = kernel_changes
            kw = dict(block_q=128, block_k=64, linear_scope=scope, config=config)

            def no_arrays(q, k, v, a):
                return sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=phi, **kw)

            arrays = _with_phi_arrays(lambda q, k, v, qp, kp, a: sla2_fused_attention(q, k, v, qp, kp, lut, a, **kw),
                                      phi)
            row.update(_form_errors(_dense_reference(phi, lut, scope), no_arrays, arrays, args, w))
        except Exception as e:  # noqa: BLE001 - record and go on
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small"] = rows
    worst = max((v for r in rows for v in r.get("vs_dense", {}).values()), default=None)
    print(f"small: worst relative error vs dense f32 {worst}; errors {sum('error' in r for r in rows)}", flush=True)


def small_low_bit_checks(kernel_changes=None, quants=("int8", "int8_fp8")):
    """The low-bit fused forward without phi arrays (the library's operands: K~ smoothed by the mean of
    key_block_sums' block means, int8 Q from the Q pass) against the form with phi arrays (K pre-pass, XLA mean)
    and the dense float32 reference, on the SMALL cases in 16 bits; output and gradients (straight-through); under
    heuristic_config(...) with kernel_changes (kernel_fields)."""
    from pallas_kernels import key_block_sums, sla2_fused_attention_lowbit
    from sla2_jax import SLA2Config, backends

    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_low_bit_seed"] = seed
    rows = []
    # the first five cases (B 1, H 2); the last one is the first's shape at B 2, H 6, for the program ids
    for (n, d, topk, dtype, scope, kind, *_), quant in ((c, x) for c in SMALL[:5] for x in quants):
        row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name, scope=scope, feature_map=kind, quant=quant)
        try:
            args, w, lut = _small_inputs(seed, n, d, topk, dtype, k_offset=True)
            q, k, v, _ = args
            phi = PHI_FUNCTIONS[kind]
            config = with_kernel_changes(heuristic_config(n, d, dtype, 128, 64), kernel_changes or {})
            row["forward"], row["kernel_changes"] = config.forward, kernel_changes
            kw = dict(block_q=128, block_k=64, linear_scope=scope, quant=quant, config=config)
            library = SLA2Config(linear_scope=scope, quant=quant, feature_map=kind)
            sums, k_means = key_block_sums(k, v, linear_scope=scope, feature_map=phi, config=config)
            _, keys, queries = backends.low_bit_operands(q, k, k_means, library)

            def no_arrays(q, k, v, a):
                return sla2_fused_attention_lowbit(q, k, v, None, None, lut, a, feature_map=phi, key_sums=sums,
                                                   keys=keys, queries=queries, **kw)

            arrays = _with_phi_arrays(
                lambda q, k, v, qp, kp, a: sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, **kw), phi)
            row.update(_form_errors(_dense_reference(phi, lut, scope), no_arrays, arrays, args, w))
        except Exception as e:  # noqa: BLE001 - record and go on
            record_error(row, "error", e)
        print("small_low_bit", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small_low_bit"] = rows


def module_forms(sparsity, scope, forms):
    """(form name -> module forward fn(q, k, v)) of the names in forms (FORMS): "no_phi_arrays" (the library's
    form), "phi_arrays" (the front end writes phi arrays), "int8" / "int8_fp8" (the library's low-bit forward, phi
    in the kernels), "int8_phi_arrays" / "int8_fp8_phi_arrays" (the low-bit forward with the front end that writes
    phi arrays and the int8 operands, smoothing by an XLA mean of K), "f16_block_sums" (the library's form with
    the per-block sums in float16, KernelConfig.block_sum_dtype, whose default is bfloat16), "kernel:FIELD=VALUE[,...]"
    (the library's form under heuristic_config(...) with those KernelConfig changes, e.g. kernel:loop=pipelined, or
    Triton launch entries, e.g. kernel:launch.dkv=8/2/64)."""
    import sla2_jax as sla
    from sla2_jax import backends

    config = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", linear_scope=scope)

    def no_arrays(q, k, v):
        return sla.sla2_attention(q, k, v, config=config)

    def arrays(q, k, v, config=config):
        if config.quant != "none":
            lut, mass, qp, kp, keys, queries, q, k = phi_array_low_bit_route(q, k, config, config.feature_map)
        else:
            (lut, mass, qp, kp, q, k), keys, queries = backends.front_end(
                q, k, config, w_q=None, w_k=None, feature_map=config.feature_map), None, None
        return backends.fused(q, k, v, qp, kp, lut, jax.lax.stop_gradient(mass), config, keys=keys, queries=queries)

    def kernel_variant(fields):  # the library's form under heuristic_config(...) with those changes
        def fn(q, k, v):
            kernel = with_kernel_changes(heuristic_config(q.shape[1], q.shape[3], q.dtype), fields)
            return sla.sla2_attention(q, k, v, config=config.replace(kernel=kernel))

        return fn

    def low_bit(quant):
        low = config.replace(quant=quant)
        return lambda q, k, v: sla.sla2_attention(q, k, v, config=low)

    every = {"no_phi_arrays": no_arrays, "phi_arrays": arrays, "int8": low_bit("int8"), "int8_fp8": low_bit("int8_fp8"),
             "int8_phi_arrays": functools.partial(arrays, config=config.replace(quant="int8")),
             "int8_fp8_phi_arrays": functools.partial(arrays, config=config.replace(quant="int8_fp8")),
             "f16_block_sums": kernel_variant({"block_sum_dtype": "float16"})}
    return {name: every[name] if name in every else kernel_variant(kernel_fields(name)) for name in forms}


def kernel_fields(form):
    """{field: value} of a form "kernel:FIELD=VALUE[,...]", parsed and validated as the benchmark's --kernel
    (experiments.benchmark.kernel_changes: any KernelConfig field, and launch.KERNEL=WARPS/STAGES/ROWS entries)."""
    from experiments.benchmark import kernel_changes

    if not form.startswith("kernel:"):
        raise ValueError(f"unknown form {form!r}: one of {FORMS} or kernel:FIELD=VALUE[,...]")
    return kernel_changes(form[len("kernel:"):], reserved=())


def grads_of(fn):
    return lambda q, k, v, do: jax.grad(lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * do), argnums=(0, 1, 2))(q, k, v)


def save(out):
    with open(os.path.join(out, "check_phi_in_kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def states_kernel(launches, out):
    """CUPTI times of the linear states at wan-1.3b, 95%: the complement states (per-block outer sums + masked sum)
    and the totals of scope "all", each from phi(K) (an array) and from K (phi in the kernel), under each Triton
    launch (warps, stages, rows) given to both the "sum" and the "sum_phi" kernel."""
    from experiments.dev.common import kernel_call, phi, router_lut
    from pallas_kernels import linear_states
    from pallas_kernels.config import Launch

    b, n, h, d = 1, 32760, 12, 128
    q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, b, n, h, d), jnp.bfloat16)
    topk = int(-(-n // 64) * 0.05)
    lut = jax.jit(router_lut, static_argnums=(2, 3, 4))(q, k, topk, 128, 64)
    kp = jax.jit(phi)(k)
    softmax = PHI_FUNCTIONS["softmax"]
    jobs = {
        "complement": lambda x, v, cfg, fm: linear_states.complement_states(x, v, lut, cfg, fm),
        "all": lambda x, v, cfg, fm: linear_states.outer_sum(x, v, cfg, phi=fm),
    }
    rows = []
    for launch in launches:
        config = heuristic_config(n, d, jnp.bfloat16, 128, 64)
        swept = {"sum": Launch(*launch), "sum_phi": Launch(*launch)}
        config = config.replace(launch=tuple(x for x in config.launch if x[0] not in swept) + tuple(swept.items()))
        row = {"launch": launch}
        for scope, job in jobs.items():
            cfg = kernel_call(q, lut, config=config, linear_scope=scope)
            for name, x, fm in (("phi_array", kp, None), ("phi_in_kernel", k, softmax)):
                try:
                    row[f"{scope}_{name}_ms"] = kernel_ms(lambda x, v, fm=fm, cfg=cfg, job=job: job(x, v, cfg, fm),
                                                          (x, v))[0]
                except Exception as e:  # noqa: BLE001
                    record_error(row, f"error_{scope}_{name}", e)
        print("states", json.dumps(row), flush=True)
        rows.append(row)
        RESULTS["states"] = rows
        save(out)


def wan(cases, layers, fwd_bwd, out, forms, workload="wan-1.3b"):
    from experiments.benchmark import WORKLOADS

    b, h, n, d = WORKLOADS[workload][0]
    RESULTS["workload"] = workload
    keys = jax.random.split(jax.random.PRNGKey(17), layers)
    sets = [tuple(jax.random.normal(kk, (4, b, n, h, d), jnp.bfloat16)) for kk in keys]  # q, k, v, do
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")  # noqa: E731
    base = {"cudnn_fwd_in_model_ms": 1e3 * in_model_seconds(cudnn, [s[:3] for s in sets], layers=layers)}
    if fwd_bwd:
        base["cudnn_fwd_bwd_in_model_ms"] = 1e3 * in_model_seconds(grads_of(cudnn), sets, layers=layers)
    print("wan cudnn", json.dumps(base), flush=True)
    RESULTS["wan_cudnn"] = base
    rows = []
    for sparsity, scope in cases:
        row = dict(sparsity=sparsity, scope=scope)
        outs = {}
        for name, fn in module_forms(sparsity, scope, forms).items():
            t = {}
            try:
                outs[name] = jax.jit(fn)(*sets[0][:3])
                t["fwd_in_model_ms"] = 1e3 * in_model_seconds(fn, [s[:3] for s in sets], layers=layers)
                t["fwd_sync_ms"] = bench(fn, *sets[0][:3])
                t["fwd_x_cudnn"] = base["cudnn_fwd_in_model_ms"] / t["fwd_in_model_ms"]
                total, per_iter = kernel_ms(fn, sets[0][:3])
                t["fwd_cupti_ms"] = total
                t["fwd_kernels_ms"] = [(nm, round(ms, 4)) for nm, ms in per_iter[len(per_iter) // 2]]
                if fwd_bwd and not name.startswith("int8"):  # the low-bit backward is the bf16 one
                    total, per_iter = kernel_ms(grads_of(fn), sets[0])
                    t["fwd_bwd_cupti_ms"] = total
                    t["fwd_bwd_kernels_ms"] = [(nm, round(ms, 4)) for nm, ms in per_iter[len(per_iter) // 2]]
                    t["fwd_bwd_in_model_ms"] = 1e3 * in_model_seconds(grads_of(fn), sets, layers=layers)
                    t["fwd_bwd_x_cudnn"] = base["cudnn_fwd_bwd_in_model_ms"] / t["fwd_bwd_in_model_ms"]
            except Exception as e:  # noqa: BLE001
                record_error(row, f"error_{name}", e)
            row[name] = t
        for name in outs:
            if name != "no_phi_arrays" and "no_phi_arrays" in outs:
                row[f"rel_o_{name}_vs_no_phi_arrays"] = rel(outs[name], outs["no_phi_arrays"])
        print("wan", json.dumps(row), flush=True)
        rows.append(row)
        RESULTS["wan"] = rows
        save(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.97])
    p.add_argument("--scopes", nargs="+", default=["complement", "all"])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--parts", nargs="+", default=["small", "wan"], help="small, small_low_bit, wan, states")
    p.add_argument("--no-fwd-bwd", action="store_true", help="wan: the forward only")
    p.add_argument("--forms", nargs="+", default=list(FORMS),
                   help=f"wan: the module forms to time: {', '.join(FORMS)}, or kernel:FIELD=VALUE[,...] (the "
                        "library's form with those KernelConfig changes; launch.KERNEL=WARPS/STAGES/ROWS sets a "
                        "Triton launch entry)")
    p.add_argument("--workload", default="wan-1.3b", choices=["wan-1.3b", "wan-14b-720p"],
                   help="wan: the shape (wan-14b-720p: give --layers 5 or fewer, its inputs take 3 GiB per layer)")
    p.add_argument("--small-kernel", default=None,
                   help="small, small_low_bit: FIELD=VALUE[,...] changes to heuristic_config of both forms")
    p.add_argument("--launches", nargs="*", default=None,
                   help="states: Triton launches WARPS/STAGES/ROWS to sweep (default: seven of them)")
    p.add_argument("--cases", nargs="*", default=None,
                   help="wan: SPARSITY:SCOPE pairs (default: every --sparsity with every --scopes)")
    args = p.parse_args()
    for form in args.forms:
        if form not in FORMS:
            kernel_fields(form)
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    try:
        small_changes = kernel_fields("kernel:" + args.small_kernel) if args.small_kernel else None
        if "small" in args.parts:
            small_checks(small_changes)
        if "small_low_bit" in args.parts:
            small_low_bit_checks(small_changes)
        if "states" in args.parts:
            launches = [tuple(int(x) for x in launch.split("/")) for launch in args.launches] if args.launches else [
                (8, 2, 64), (8, 3, 64), (8, 4, 64), (4, 3, 64), (8, 3, 32), (4, 2, 128), (8, 3, 128)]
            states_kernel(launches, args.out)
        if "wan" in args.parts:
            cases = [(float(c.split(":")[0]), c.split(":")[1]) for c in args.cases] if args.cases else [
                (x, scope) for x in args.sparsity for scope in args.scopes]
            wan(cases, args.layers, not args.no_fwd_bwd, args.out, args.forms, args.workload)
    finally:
        save(args.out)


if __name__ == "__main__":
    main()
