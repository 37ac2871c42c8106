"""How sparse is a model's attention? Kept softmax mass of the best and of the router's key blocks.

Capture Q and K of each attention layer on a few representative inputs (e.g. a DiT's q, k after their norms, at
several diffusion times), then

    report = kept_mass_report(qs, ks, sparsities=(0.9, 0.95, 0.97), block_q=128, block_k=64)
    print(format_kept_mass(report))

"oracle" is the exact softmax mass inside the best k key blocks of each query block (k = max(1,
floor((1 - sparsity) * Nk)), as SLA2Config.num_selected): an upper bound on what any router at that sparsity
keeps. "router" is the mass inside the blocks SLA's router (or an SLA2 router with its W_q, W_k) selects. SLA2's
exact output is alpha * O_s + P2 V with alpha the kept mass, so a layer whose oracle mass at a sparsity is low
leaves most of its output to the linear branch: choose the sparsity where the oracle mass is still high.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sla2_jax.blocks import num_blocks, to_blocks
from sla2_jax.config import SLA2Config
from sla2_jax.routing import block_scores, topk_blocks


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def block_attention_mass(q, k, *, block_q: int, block_k: int, scale=None):
    """Exact softmax(q k^T * scale) summed over each key block, averaged over each query block's valid rows.

    Args:
      q, k: (B, N, H, D), any float dtype (computed in float32); N arbitrary.
      block_q, block_k: block sizes.
      scale: logit scale, default 1/sqrt(D).
    Returns:
      (B, H, Nq, Nk) float32; each row sums to 1. One query block at a time (memory B x H x b_q x N).
    """
    batch, seq_len, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    nq, nk = num_blocks(seq_len, block_q), num_blocks(seq_len, block_k)
    qb = to_blocks(q.astype(jnp.float32), block_q).transpose(2, 0, 1, 3, 4)  # (Nq, B, H, b_q, D)
    kf = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # (B, H, N, D)
    seg = jnp.arange(seq_len) // block_k
    rows = (jnp.arange(nq * block_q) < seq_len).reshape(nq, block_q).astype(jnp.float32)  # (Nq, b_q)

    def one_block(args):
        qi, valid = args
        p = jax.nn.softmax(jnp.einsum("bhqd,bhnd->bhqn", qi, kf) * scale, axis=-1)
        p = jnp.einsum("bhqn,q->bhn", p, valid) / jnp.sum(valid)  # mean over the valid rows
        return jax.ops.segment_sum(jnp.moveaxis(p, -1, 0), seg, num_segments=nk)  # (Nk, B, H)

    out = jax.lax.map(one_block, (qb, rows))  # (Nq, Nk, B, H)
    return out.transpose(2, 3, 0, 1)


def _num_selected(sparsity: float, nk: int) -> int:
    return SLA2Config(topk_ratio=round(1.0 - sparsity, 6)).num_selected(nk)


@functools.partial(jax.jit, static_argnames=("ks", "block_q", "block_k"))
def _kept(q, k, w_q, w_k, *, ks, block_q, block_k):
    """Per k of ks: (oracle, router) kept mass, each (B, H, Nq) float32."""
    mass = block_attention_mass(q, k, block_q=block_q, block_k=block_k)
    scores = block_scores(q, k, block_q=block_q, block_k=block_k, w_q=w_q, w_k=w_k)
    out = []
    for kk in ks:
        oracle = jnp.sum(jax.lax.top_k(mass, kk)[0], axis=-1)
        router = jnp.sum(jnp.take_along_axis(mass, topk_blocks(scores, kk), axis=-1), axis=-1)
        out.append((oracle, router))
    return out


def kept_mass_report(qs, ks, *, sparsities=(0.9, 0.95, 0.97), block_q: int = 128, block_k: int = 64,
                     w_q=None, w_k=None) -> dict:
    """Oracle and router kept mass per layer at each sparsity.

    Args:
      qs, ks: one (B, N, H, D) array per layer (a list), or a single array for one layer. Q and K as the attention
        sees them (after any qk-norm / rotary embedding). Processed one batch element at a time.
      sparsities: fractions of key blocks skipped, each in [0, 1).
      block_q, block_k: the block sizes SLA2 will use.
      w_q, w_k: None (SLA's router), or the SLA2 router's projections: one (D, D) or (H, D, D) array for all
        layers or a list with one per layer.
    Returns:
      dict with "sparsities" (list of S floats), "k" (key blocks kept at each sparsity), "oracle" and "router"
      (L lists of S floats: mean over batch, heads and query rows of the exact softmax mass in the kept key
      blocks), "mean_oracle" and "mean_router" (S floats, mean over layers), "num_key_blocks".
    """
    if not isinstance(qs, (list, tuple)):
        qs, ks = [qs], [ks]
    if len(qs) != len(ks) or not qs:
        raise ValueError(f"qs and ks must be lists of equal, non-zero length; got {len(qs)} and {len(ks)}")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity {s!r} must be in [0, 1)")
    per_layer = lambda w: list(w) if isinstance(w, (list, tuple)) else [w] * len(qs)  # noqa: E731
    w_qs, w_ks = per_layer(w_q), per_layer(w_k)
    oracle, router, nk = [], [], None
    for q, k, wq, wk in zip(qs, ks, w_qs, w_ks):
        if q.ndim != 4 or k.shape != q.shape:
            raise ValueError(f"each q and k must be (B, N, H, D) of equal shape; got {q.shape} and {k.shape}")
        seq_len = q.shape[1]
        nk = num_blocks(seq_len, block_k)
        counts = np.minimum(block_q, seq_len - block_q * np.arange(num_blocks(seq_len, block_q)))  # rows per block
        sums = np.zeros((len(sparsities), 2))
        for b in range(q.shape[0]):
            res = _kept(q[b : b + 1], k[b : b + 1], wq, wk, ks=tuple(_num_selected(s, nk) for s in sparsities),
                        block_q=block_q, block_k=block_k)
            for i, (o, r) in enumerate(res):  # row-weighted mean over (H, Nq)
                sums[i, 0] += float(jnp.sum(jnp.mean(o[0], 0) * counts)) / seq_len
                sums[i, 1] += float(jnp.sum(jnp.mean(r[0], 0) * counts)) / seq_len
        oracle.append((sums[:, 0] / q.shape[0]).tolist())
        router.append((sums[:, 1] / q.shape[0]).tolist())
    return {
        "sparsities": [float(s) for s in sparsities],
        "k": [_num_selected(s, nk) for s in sparsities],
        "num_key_blocks": nk,
        "oracle": oracle,
        "router": router,
        "mean_oracle": np.mean(oracle, axis=0).tolist(),
        "mean_router": np.mean(router, axis=0).tolist(),
    }


def format_kept_mass(report: dict) -> str:
    """A Markdown table of a `kept_mass_report`: one row per sparsity, oracle / router per layer and the mean."""
    layers = len(report["oracle"])
    head = "| sparsity | k of Nk | " + " | ".join(f"layer {i} oracle / router" for i in range(layers))
    head += " | mean oracle / router |\n|---|---|" + "---|" * (layers + 1) + "\n"
    rows = []
    for i, s in enumerate(report["sparsities"]):
        cells = [f"{report['oracle'][l][i]:.3f} / {report['router'][l][i]:.3f}" for l in range(layers)]
        rows.append(f"| {100 * s:g}% | {report['k'][i]} of {report['num_key_blocks']} | " + " | ".join(cells)
                    + f" | {report['mean_oracle'][i]:.3f} / {report['mean_router'][i]:.3f} |")
    return head + "\n".join(rows) + "\n"
