"""Where the router's and the feature maps' time goes, old XLA front end vs the Pallas front end, at one shape.

    python -m experiments.dev.profile_router                      # wan-1.3b shape, stages at 95%, module at 90/95/97%
    python -m experiments.dev.profile_router --seq-len 2048 --heads 2 --iters 3 --sparsities 0.9   # CPU smoke

1. Checks on the device that the Pallas front end (`sla2_jax.functional.route_with_features`: one-read phi + block
   means kernels, one-kernel top-k selection) gives the XLA front end's LUT, mass and phi(Q), phi(K).
2. Times each stage alone (jit, median of --iters synchronised runs, experiments.timing): old XLA stages (pooling,
   top_k, the ascending sort, probabilities + mass, phi), two XLA-only alternatives (LUT by rank instead of sort,
   mass from the top-k values), and the new kernels; then the whole front end old vs new.
3. Times the module forward `sla2_attention(config=SLA2Config(backend="pallas", topk_ratio=r))` (new front end),
   the same fused kernel behind the old XLA front end, the kernel alone, and cuDNN, per sparsity.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import sla2_jax as sla
from experiments.inputs import random_qkv
from experiments.timing import pipelined_seconds, time_fn
from pallas_kernels import sla2_fused_attention
from pallas_kernels.front_end import block_means_and_phi, select_blocks
from sla2_jax.blocks import block_counts
from sla2_jax.feature_maps import PHI_FUNCTIONS
from sla2_jax.functional import route_with_features
from sla2_jax.routing import block_probabilities


def lut_by_rank(idx):
    """Ascending LUT from top_k ids (..., k) without a sort: rank by k x k comparison, place by rank."""
    rank = jnp.sum(idx[..., None, :] < idx[..., :, None], axis=-1)  # (..., k): ids smaller than this one
    slots = jnp.arange(idx.shape[-1])
    return jnp.sum(jnp.where(rank[..., :, None] == slots, idx[..., :, None], 0), axis=-2).astype(jnp.int32)


def mass_from_topk(scores, values, idx, seq_len, block_k):
    """Captured mass from the top-k values: sum_sel exp(s + log n - lse(s + log n)), no gather over the probs."""
    log_n = jnp.log(block_counts(seq_len, block_k))
    lse = jax.nn.logsumexp(scores + log_n, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(values + log_n[idx] - lse), axis=-1)


def old_front_end(q, k, cfg):
    """The XLA front end the pallas path used before: route (xla) and phi(Q), phi(K) -> lut, mass, phi's."""
    lut, _, mass = sla.route(q, k, cfg.replace(backend="xla"))
    return lut, mass, sla.feature_map(q, cfg.feature_map), sla.feature_map(k, cfg.feature_map)


def fused_kernel(q, k, v, front, cfg):
    lut, mass, q_phi, k_phi = front
    alpha = jax.lax.stop_gradient(mass)
    return sla2_fused_attention(
        q,
        k,
        v,
        q_phi,
        k_phi,
        lut,
        alpha,
        block_q=cfg.block_q,
        block_k=cfg.block_k,
        linear_scope=cfg.linear_scope,
        eps=cfg.eps,
    )


def check_equal(q, k, cfg):
    """Old vs new front end on the device: LUT agreement, mass and phi differences."""
    old = jax.jit(lambda q, k: old_front_end(q, k, cfg))(q, k)
    new = jax.jit(lambda q, k: route_with_features(q, k, cfg, feature_map=cfg.feature_map))(q, k)
    lut_o, lut_n = np.asarray(old[0]), np.asarray(new[0])
    phi_diff = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(old[2:], new[2:])
    ]
    phi_ulp = [float(jnp.mean((a != b).astype(jnp.float32))) for a, b in zip(old[2:], new[2:])]
    res = {
        "lut_rows_equal": float(np.mean(np.all(lut_o == lut_n, axis=-1))),
        "lut_entries_equal": float(np.mean(lut_o == lut_n)),
        "lut_ascending": bool(np.all(np.diff(lut_n, axis=-1) > 0)),
        "mass_max_abs_diff": float(jnp.max(jnp.abs(old[1] - new[1]))),
        "phi_q_max_abs_diff": phi_diff[0],
        "phi_k_max_abs_diff": phi_diff[1],
        "phi_q_frac_differing": phi_ulp[0],
        "phi_k_frac_differing": phi_ulp[1],
    }
    scores = sla.block_scores(q, k, block_q=cfg.block_q, block_k=cfg.block_k)  # same logits for both selections
    topk = cfg.num_selected(scores.shape[-1])
    values, idx = jax.lax.top_k(scores, topk)
    lut_x = jnp.sort(idx, axis=-1)
    mass_x = jnp.sum(jnp.take_along_axis(block_probabilities(scores, q.shape[1], cfg.block_k), lut_x, -1), -1)
    lut_s, mass_s = jax.jit(lambda s: select_blocks(s, topk, q.shape[1], cfg.block_k))(scores)
    res["select_same_scores_lut_equal"] = bool(jnp.all(lut_s == lut_x))
    res["select_same_scores_mass_max_abs_diff"] = float(jnp.max(jnp.abs(mass_s - mass_x)))
    res["alt_rank_lut_equal"] = bool(jnp.all(lut_by_rank(idx) == lut_x))
    res["alt_mass_max_abs_diff"] = float(
        jnp.max(jnp.abs(mass_from_topk(scores, values, idx, q.shape[1], cfg.block_k) - mass_x))
    )
    means_x = sla.pool_blocks(q, cfg.block_q)
    means_p = block_means_and_phi(q, cfg.block_q)[1]
    res["means_q_rel_err"] = float(jnp.linalg.norm(means_p - means_x) / jnp.linalg.norm(means_x))
    return res


def stage_table(q, k, cfg, iters):
    n, bq, bk = q.shape[1], cfg.block_q, cfg.block_k
    scores = sla.block_scores(q, k, block_q=bq, block_k=bk)
    topk = cfg.num_selected(scores.shape[-1])
    values, idx = jax.lax.top_k(scores, topk)
    lut = jnp.sort(idx, axis=-1)
    kind = cfg.feature_map
    return {
        "old: pool Q (XLA)": (lambda q: sla.pool_blocks(q, bq), (q,)),
        "old: pool K (XLA)": (lambda k: sla.pool_blocks(k, bk), (k,)),
        "old: block_scores (pool both + einsum)": (lambda q, k: sla.block_scores(q, k, block_q=bq, block_k=bk), (q, k)),
        "old: top_k": (lambda s: jax.lax.top_k(s, topk)[1], (scores,)),
        "old: sort LUT ascending": (lambda i: jnp.sort(i, axis=-1), (idx,)),
        "old: probabilities + mass (gather)": (
            lambda s, lut: jnp.sum(jnp.take_along_axis(block_probabilities(s, n, bk), lut, axis=-1), -1),
            (scores, lut),
        ),
        "old: route (xla, one jit)": (lambda q, k: sla.route(q, k, cfg.replace(backend="xla")), (q, k)),
        "old: phi(Q) + phi(K) (XLA)": (lambda q, k: (sla.feature_map(q, kind), sla.feature_map(k, kind)), (q, k)),
        "old: front end (route + phi, one jit)": (lambda q, k: old_front_end(q, k, cfg), (q, k)),
        "alt: LUT by rank, no sort (XLA)": (lut_by_rank, (idx,)),
        "alt: top_k + rank LUT (XLA)": (lambda s: lut_by_rank(jax.lax.top_k(s, topk)[1]), (scores,)),
        "alt: mass from top-k values (XLA)": (lambda s, v, i: mass_from_topk(s, v, i, n, bk), (scores, values, idx)),
        "new: means Q only (pallas)": (lambda q: block_means_and_phi(q, bq)[1], (q,)),
        "ref: q + 1 (XLA, same bytes as phi(Q))": (lambda q: q + 1, (q,)),
        **{
            f"new: phi + means {name} (pallas, {rows} rows, {warps} warps)": (
                lambda x, blk=blk, rows=rows, warps=warps: block_means_and_phi(
                    x, blk, PHI_FUNCTIONS[kind], num_warps=warps, rows=rows
                ),
                (x,),
            )
            for name, x, blk in (("Q", q, bq), ("K", k, bk))
            for rows, warps in ((128, 4), (64, 4), (32, 4), (16, 4), (32, 2), (16, 2), (64, 8))
            if rows <= blk
        },
        "new: select LUT + mass (pallas)": (lambda s: select_blocks(s, topk, n, bk), (scores,)),
        "new: route (pallas, one jit)": (lambda q, k: sla.route(q, k, cfg), (q, k)),
        "new: front end (route + phi, one jit)": (
            lambda q, k: route_with_features(q, k, cfg, feature_map=kind),
            (q, k),
        ),
    }


def time_stages(stages, iters, results):
    print(f"{'stage':<52}{'synced':>10}{'b2b':>10}  (ms)", flush=True)
    for name, (fn, fn_args) in stages.items():
        try:
            jitted = jax.jit(fn)
            ms = 1e3 * time_fn(jitted, *fn_args, iters=iters)
            b2b = 1e3 * pipelined_seconds(jitted, *fn_args)
        except Exception as e:  # noqa: BLE001  keep going: one failing variant must not lose the others' numbers
            print(f"{name:<52} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        results[name] = {"synced_ms": ms, "back_to_back_ms": b2b}
        print(f"{name:<52}{ms:10.3f}{b2b:10.3f}", flush=True)


def module_table(q, k, v, sparsities, iters, results):
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))
    t_dense = 1e3 * time_fn(dense, q, k, v, iters=iters)
    print(
        f"\n{'sparsity':<9}{'new fwd':>10}{'old fwd':>10}{'kernel':>10}{'dense':>10}{'new x':>8}{'old x':>8}"
        f"{'rel err new/old':>17}",
        flush=True,
    )
    for sp in sparsities:
        cfg = sla.SLA2Config(backend="pallas", topk_ratio=round(1 - sp, 6))
        new = jax.jit(lambda q, k, v, cfg=cfg: sla.sla2_attention(q, k, v, config=cfg))
        old = jax.jit(lambda q, k, v, cfg=cfg: fused_kernel(q, k, v, old_front_end(q, k, cfg), cfg).astype(q.dtype))
        front = jax.jit(lambda q, k, cfg=cfg: route_with_features(q, k, cfg, feature_map=cfg.feature_map))(q, k)
        kernel = jax.jit(lambda q, k, v, front, cfg=cfg: fused_kernel(q, k, v, front, cfg))
        o_new, o_old = new(q, k, v).astype(jnp.float32), old(q, k, v).astype(jnp.float32)
        err = float(jnp.linalg.norm(o_new - o_old) / jnp.linalg.norm(o_old))
        row = {
            "new_b2b_ms": 1e3 * pipelined_seconds(new, q, k, v),
            "old_b2b_ms": 1e3 * pipelined_seconds(old, q, k, v),
            "kernel_b2b_ms": 1e3 * pipelined_seconds(kernel, q, k, v, front),
            "dense_b2b_ms": 1e3 * pipelined_seconds(dense, q, k, v),
            "new_ms": 1e3 * time_fn(new, q, k, v, iters=iters),
            "old_ms": 1e3 * time_fn(old, q, k, v, iters=iters),
            "kernel_ms": 1e3 * time_fn(kernel, q, k, v, front, iters=iters),
            "dense_ms": t_dense,
            "rel_err_new_vs_old": err,
        }
        results[str(sp)] = row
        print(
            f"{sp:<9}{row['new_ms']:10.3f}{row['old_ms']:10.3f}{row['kernel_ms']:10.3f}{t_dense:10.3f}"
            f"{t_dense / row['new_ms']:8.2f}{t_dense / row['old_ms']:8.2f}{err:17.2e}",
            flush=True,
        )
        print(
            f"{'  b2b':<9}{row['new_b2b_ms']:10.3f}{row['old_b2b_ms']:10.3f}{row['kernel_b2b_ms']:10.3f}"
            f"{row['dense_b2b_ms']:10.3f}{row['dense_b2b_ms'] / row['new_b2b_ms']:8.2f}"
            f"{row['dense_b2b_ms'] / row['old_b2b_ms']:8.2f}",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.95, help="sparsity of the stage table")
    p.add_argument("--sparsities", default="0.9,0.95,0.97", help="module-forward sparsities ('' to skip)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    cfg = sla.SLA2Config(topk_ratio=round(1 - args.sparsity, 6), backend="pallas")
    q, k, v = random_qkv(0, 1, args.seq_len, args.heads, args.head_dim)
    results = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": list(q.shape),
        "sparsity": args.sparsity,
    }
    print(
        f"{results['device']} | jax {results['jax']} | (B, N, H, D) = {q.shape} bf16 | stage sparsity {args.sparsity}",
        flush=True,
    )
    results["check"] = check_equal(q, k, cfg)
    print("check old vs new front end:", json.dumps(results["check"]), flush=True)
    results["stages_ms"] = {}
    time_stages(stage_table(q, k, cfg, args.iters), args.iters, results["stages_ms"])
    results["module"] = {}
    if args.sparsities:
        module_table(q, k, v, [float(s) for s in args.sparsities.split(",")], args.iters, results["module"])
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
