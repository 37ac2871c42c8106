"""GPU probe: the complement states' masked sum (``linear_states._sum_over_blocks``: H_i = sum over unselected key
blocks j of the per-block sums h_j, one batched f16 matmul with float32 accumulation) at the library's shapes, with
the block counts as they are and padded (zero mask columns and rows): the query blocks (M) or the key blocks (C, the
contraction) or both, to multiples of 8 / 64 / 128, to see whether ragged Nq, Nk cost tensor throughput and which;
and the sums in bfloat16 (KernelConfig.block_sum_dtype: a bf16 x bf16 -> bf16 product) at the key-block counts as
they are and padded to 8 / 64.

    python -m experiments.dev.probe_masked_gemm --out DIR

Random h_j (float16, per-block power-of-two scales), 95% of the mask unselected. Prints and writes DIR/
probe_masked_gemm.json: per (workload, padded axes, multiple) the CUPTI milliseconds of the whole masked sum (weights, the H_i
product, the Z_i product) and the H_i product's TFLOP/s (2 B H Nq Nk D^2).
"""

from __future__ import annotations

import argparse
import json
import os
import types

import jax
import jax.numpy as jnp

from experiments.dev.common import kernel_ms, record_error, write_rows
from pallas_kernels import KernelConfig, linear_states

SHAPES = {"wan-1.3b": (12, 256, 512), "wan-14b-720p": (40, 591, 1182)}  # heads, query blocks, key blocks (D 128)


def padded(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def masked_sum_ms(heads, nq, nk, sum_dtype="float16", d=128, seed=0):
    """(CUPTI ms, kernel list) of _sum_over_blocks for a (1, heads, nq, nk) mask, 95% unselected, from per-block
    sums stored in sum_dtype (KernelConfig.block_sum_dtype), bf16 states out."""
    kh, kz, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(kh, (1, heads, nk, d, d), jnp.dtype(sum_dtype))
    z = jax.random.normal(kz, (1, heads, nk, d), jnp.float32)
    scale = jnp.ones((1, heads, nk), jnp.float32)
    mask = jax.random.uniform(km, (1, heads, nq, nk)) < 0.95
    cfg = types.SimpleNamespace(config=KernelConfig(block_sum_dtype=sum_dtype))
    sums = linear_states._BlockSums(h, z, scale, nk)
    return kernel_ms(lambda m, s: linear_states._sum_over_blocks(m, s, cfg), (mask, sums))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (heads, nq, nk) in SHAPES.items():
        variants = [("float16", "none", 1)] + [("float16", axes, m) for axes in ("m", "c", "mc") for m in (8, 64, 128)]
        variants += [("bfloat16", "none", 1), ("bfloat16", "c", 8), ("bfloat16", "c", 64)]
        for sum_dtype, axes, multiple in variants:
            if nq % 8 == 0 and nk % 8 == 0 and axes != "none":
                continue  # aligned already: nothing to pad
            mq = padded(nq, multiple) if "m" in axes else nq
            mk = padded(nk, multiple) if "c" in axes else nk
            row = dict(workload=name, sum_dtype=sum_dtype, pad_axes=axes, pad=multiple, nq=mq, nk=mk)
            try:
                total, per_iter = masked_sum_ms(heads, mq, mk, sum_dtype)
                row["ms"] = total
                row["kernels_ms"] = [(k, round(v, 4)) for k, v in per_iter[len(per_iter) // 2]]
                gemm = max(v for _, v in per_iter[len(per_iter) // 2])
                row["gemm_tflops"] = 2 * heads * mq * mk * 128**2 / (gemm * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001 - record and go on
                record_error(row, "error", e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_rows(args.out, "probe_masked_gemm.json", rows)


if __name__ == "__main__":
    main()
