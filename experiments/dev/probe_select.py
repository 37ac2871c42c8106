"""GPU probe: the selection kernel (``pallas_kernels.front_end.select_blocks``) at the library's shapes, its launch
variants checked and timed.

    python -m experiments.dev.probe_select --out DIR

Shapes: wan-1.3b (H 12, Nq 256, Nk 512) and wan-14b-720p (H 40, Nq 591, Nk 1182) at 95% and 97% (top-k
floor(r Nk)). Router logits: random normal, one head rounded to quarters (many exact ties, also at the k-th place).
Each variant (``SelectLaunch``: rows per program, warps) is first checked on the GPU: the LUT equal to
sort(lax.top_k) and the mass to XLA's softmax sum (<= 1e-5 relative), then timed (CUPTI, median of 20). Prints and
writes DIR/probe_select.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp

from experiments.dev.common import kernel_ms, record_error, rel, write_rows
from pallas_kernels.front_end import SelectLaunch, select_blocks
from sla2_jax.blocks import block_counts

SHAPES = {"wan-1.3b": (12, 32760), "wan-14b-720p": (40, 75600)}  # heads, tokens (b_q 128, b_k 64)
VARIANTS = [SelectLaunch(row_elements=e, warps=w) for e in (1024, 2048, 4096, 8192) for w in (4, 8)]


def logits(heads, nq, nk, seed=0):
    s = jax.random.normal(jax.random.PRNGKey(seed), (1, heads, nq, nk), jnp.float32)
    return s.at[:, 0].set(jnp.round(s[:, 0] * 4) / 4)  # head 0: exact ties


def reference(s, topk, n, block_k):
    lut = jnp.sort(jax.lax.top_k(s, topk)[1], axis=-1).astype(jnp.int32)
    p = jax.nn.softmax(s + jnp.log(block_counts(n, block_k)), axis=-1)
    return lut, jnp.sum(jnp.take_along_axis(p, lut, axis=-1), axis=-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (heads, n) in SHAPES.items():
        nq, nk = -(-n // 128), -(-n // 64)
        s = logits(heads, nq, nk)
        for sparsity in (0.95, 0.97):
            topk = max(1, math.floor((1 - sparsity) * nk + 1e-9))
            want_lut, want_mass = reference(s, topk, n, 64)
            for launch in VARIANTS:
                row = dict(workload=name, sparsity=sparsity, topk=topk, **launch._asdict())
                fn = lambda x, launch=launch: select_blocks(x, topk, n, 64, launch=launch)  # noqa: E731
                try:
                    lut, mass = jax.jit(fn)(s)
                    row["lut_equal"] = bool(jnp.array_equal(lut, want_lut))
                    row["mass_rel_err"] = rel(mass, want_mass)
                    row["ms"], _ = kernel_ms(fn, (s,))
                except Exception as e:  # noqa: BLE001 - record and go on
                    record_error(row, "error", e)
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_rows(args.out, "probe_select.json", rows)


if __name__ == "__main__":
    main()
