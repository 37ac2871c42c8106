"""GPU check and timing of the front end's backward (pallas_kernels.front_end: sla_prep_bwd) against XLA's vjp.

    python -m experiments.dev.probe_prep_bwd --out DIR          # wan-1.3b shape (1, 32760, 12, 128), bf16

The backward of `block_means_and_phi` gives dX = vjp of phi (softmax over D) applied to d phi plus the block
means' cotangent spread over their rows. In the module's backward the result is added to the attention kernels'
dQ (or dK), so both are timed with that add: XLA's vjp (one fusion with the add, as the library had before) vs the
kernel followed by XLA's add, and the kernel with the add inside (pass_through). Correctness first: the kernel's
dX vs the XLA vjp (fresh seed recorded), and the module's gradients w.r.t. q, k, v on the pallas backend (front
end with pass-through) vs the xla backend at a small ragged shape.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import sla2_jax as sla
from experiments.dev.common import rel
from experiments.timing import time_fn
from pallas_kernels.front_end import block_means_and_phi
from sla2_jax.feature_maps import feature_map, softmax_phi


def module_gradient_check(seed, shape=(1, 2000, 2, 128), sparsity=0.9):
    """Relative errors of d q, d k, d v of sum(sla2_attention(q, k, v) * do): pallas vs xla backend (bf16 inputs)."""
    q, k, v, do = (
        jax.random.normal(key, shape).astype(jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(seed + 7), 4)
    )
    errs = {}
    grads = {}
    for backend in ("pallas", "xla"):
        cfg = sla.SLA2Config(topk_ratio=1 - sparsity, backend=backend, alpha="mass")
        loss = lambda q, k, v: jnp.sum(sla.sla2_attention(q, k, v, config=cfg).astype(jnp.float32) * do)
        grads[backend] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads["pallas"], grads["xla"]):
        errs[f"d{name}"] = rel(a, b)
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", type=int, nargs=4, default=[1, 32760, 12, 128], metavar=("B", "N", "H", "D"))
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out")
    args = p.parse_args(argv)
    seed = int(time.time()) % 2**31
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = tuple(args.shape)
    x = jax.random.normal(keys[0], shape).astype(jnp.bfloat16)
    d_phi = jax.random.normal(keys[1], shape).astype(jnp.bfloat16)
    d_other = jax.random.normal(keys[2], shape).astype(jnp.bfloat16)
    nb = -(-shape[1] // args.block)
    d_means = jax.random.normal(keys[3], (shape[0], shape[2], nb, shape[3]))

    def vjp_of(fn, add="xla"):
        """jit of (x, d phi, d means, d other) -> dX: the vjp of fn at x applied to (d phi, d means), plus d other
        added by XLA (add "xla"), handed to fn's pass-through output ("pass_through") or left out (None)."""

        def grad(x, d_phi, d_means, d_other):
            _, vjp = jax.vjp(fn, x)
            if add == "pass_through":
                return vjp((d_phi, d_means, d_other))[0]
            dx = vjp((d_phi, d_means))[0]
            return (dx + d_other).astype(x.dtype) if add == "xla" else dx

        return jax.jit(grad)

    front = lambda x: block_means_and_phi(x, args.block, softmax_phi)  # noqa: E731
    xla = vjp_of(lambda x: (feature_map(x, "softmax"), sla.pool_blocks(x, args.block)))
    kernel = vjp_of(front)
    fused = vjp_of(lambda x: block_means_and_phi(x, args.block, softmax_phi, pass_through=True), "pass_through")
    kernel_alone = vjp_of(front, None)
    inputs = (x, d_phi, d_means, d_other)
    result = {"seed": seed, "shape": shape, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    result["rel_err_vs_xla"] = rel(kernel(*inputs), xla(*inputs))
    result["rel_err_pass_through_vs_xla"] = rel(fused(*inputs), xla(*inputs))
    result["module_grads_pallas_vs_xla"] = module_gradient_check(seed)
    inputs32 = tuple(a.astype(jnp.float32) for a in inputs)
    result["rel_err_f32_vs_xla_f32"] = rel(kernel(*inputs32), xla(*inputs32))
    moved = 4 * x.size * x.dtype.itemsize  # x, d phi, d other read, dX written (the minimum; kernel + add: 6)
    for name, fn, fn_args in (
        ("xla vjp + add (one fusion)", xla, inputs),
        ("kernel + add", kernel, inputs),
        ("kernel with the add (pass_through)", fused, inputs),
        ("kernel alone", kernel_alone, inputs),
    ):
        ms = 1e3 * time_fn(fn, *fn_args, iters=args.iters)
        result[name] = {"ms": ms, "TB/s at 4 tensors": moved / ms / 1e9}
        print(f"{name}: {ms:.3f} ms", flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_prep_bwd.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
