"""Why is the study's dense model's attention not block-sparse? Gains, row peakedness, frames, token orders (CPU).

Loads the finished dense model of a study folder (experiments/study.py; e.g. the committed state extracted with
`cat experiments/results/study_gpu/state/study_state.tar.* | tar -x -C /tmp/st`), captures Q/K on the study's
held-out probe videos and reports per layer:
  gains      the learned q- and k-RMSNorm gains (mean, min, max) and the logit bound they imply,
             sqrt(D) * max_i |g_q,i g_k,i| (the rms of g_q g_k in place of the max: "bound_rms")
  rows       mean over query rows of the top logit, top logit - logsumexp (log of the largest probability), the
             logit std over keys, the top cosine of q with any key, the entropy (nats; log N is uniform)
  frames     softmax mass on the query's own frame and by |frame offset|
  kept       oracle kept mass (sla2_jax.diagnostics) at 90/95/97% with the logits scaled by 1, 1.5, 2 (what a
             larger gain would do with nothing else changed) and with the tokens in other orders: "raster"
             (t, h, w: the DiT's order), "hwt" (frames innermost), "tiles" (4 x 4 x 4 cubes of tokens in raster
             order of cubes: a key block of 64 is one cube, a query block of 128 two; the order study-gpu now
             trains and probes in). The dense model is permutation-equivariant, so the order changes only which
             tokens share a block. The model is loaded in raster order whatever the preset's token_order.

  python -m experiments.dev.attention_geometry --state /tmp/st --out /tmp/geom.json [--videos 2 --times 0.25 0.5 0.75]

Each kept-mass report takes about 10 s per layer and captured sample on a 2-core CPU at 16,384 tokens (the study's
probe, 2 videos x 3 times, about 4 minutes per scale or order); --rows about 40 s per layer and sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as data_lib, dit, study as study_lib, train
from experiments.configs import get_study
from experiments.token_order import tile_permutation


def chunked_dense_core(q, k, v, chunk: int = 1024):
    """(B, N, H, D) softmax attention in float32, `chunk` query rows at a time (CPU memory B*H*chunk*N)."""
    B, N, H, D = q.shape
    chunk = min(chunk, N)
    qc = q.reshape(B, N // chunk, chunk, H, D).transpose(1, 0, 2, 3, 4)

    def one(qi):
        s = jnp.einsum("bqhd,bnhd->bhqn", qi.astype(jnp.float32), k.astype(jnp.float32)) * D**-0.5
        return jnp.einsum("bhqn,bnhd->bqhd", jax.nn.softmax(s, -1), v.astype(jnp.float32)).astype(q.dtype)

    return jax.lax.map(one, qc).transpose(1, 0, 2, 3, 4).reshape(B, N, H, D)


def token_orders(grid) -> dict:
    """Permutations of raster-ordered tokens: "raster", "hwt" and (when 4 divides the grid) "tiles" (the DiT's
    ModelConfig.token_order="tiles", experiments/token_order.py)."""
    T, H, W = grid
    idx = np.arange(T * H * W).reshape(T, H, W)
    orders = {"raster": idx.reshape(-1), "hwt": idx.transpose(1, 2, 0).reshape(-1)}
    if T % 4 == 0 and H % 4 == 0 and W % 4 == 0:
        orders["tiles"] = tile_permutation(grid, (4, 4, 4))
    return orders


def gain_stats(model, head_dim: int) -> list:
    out = []
    for blk in model.blocks:
        gq, gk = np.asarray(blk.attn.q_norm.scale[...]), np.asarray(blk.attn.k_norm.scale[...])
        w = np.abs(gq * gk)
        out.append({"q_mean": float(gq.mean()), "q_min": float(gq.min()), "q_max": float(gq.max()),
                    "k_mean": float(gk.mean()), "k_min": float(gk.min()), "k_max": float(gk.max()),
                    "bound_max": float(np.sqrt(head_dim) * w.max()),
                    "bound_rms": float(np.sqrt(head_dim * np.mean(w**2)))})
    return out


def row_stats(q, k, frame, num_frames: int, chunk: int = 1024) -> dict:
    """q, k (N, H, D) of one sample; frame (N,) the frame of each token. Means over heads and query rows."""
    N, H, D = q.shape

    @jax.jit
    def part(qi, fi):
        s = jnp.einsum("qhd,nhd->hqn", qi, k) * D**-0.5
        mx, lse = s.max(-1), jax.nn.logsumexp(s, -1)
        cos = s * jnp.sqrt(D) / (jnp.linalg.norm(qi, axis=-1).T[:, :, None] * jnp.linalg.norm(k, axis=-1).T[None])
        p = jax.nn.softmax(s, -1)
        ent = -jnp.sum(p * jnp.log(p + 1e-30), -1)
        off = jnp.abs(frame[None, :] - fi[:, None])  # (q, n)
        by_off = jnp.stack([jnp.sum(jnp.where(off == d, p, 0.0), -1) for d in range(num_frames)], -1)  # (H, q, T)
        return [x.sum() for x in (mx, mx - lse, s.std(-1), cos.max(-1), ent)] + [by_off.sum((0, 1))]

    sums = None
    for i in range(0, N, chunk):
        res = part(q[i:i + chunk], frame[i:i + chunk])
        sums = res if sums is None else [a + b for a, b in zip(sums, res)]
    n = N * H
    names = ("max_logit", "max_minus_lse", "logit_std", "max_cos", "entropy")
    out = {name: float(x) / n for name, x in zip(names, sums[:5])}
    out["mass_by_frame_offset"] = [float(x) / n for x in sums[5]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state", required=True, help="study folder with stage0/dense (finished)")
    parser.add_argument("--preset", default="study-gpu")
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--times", type=float, nargs="+", default=[0.5])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--orders", nargs="+", default=["hwt", "tiles"], help="token orders besides raster")
    parser.add_argument("--rows", action="store_true", help="also the row statistics (slow at 16k tokens)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from sla2_jax import diagnostics

    dit._dense_core = chunked_dense_core  # float32, bounded memory on CPU
    study = get_study(args.preset)
    preset = study.preset
    # Raster order in the model: the orders below permute its captured Q/K (the preset may run in tile order).
    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, dtype="float32",
                                                                   token_order="raster"))
    study = dataclasses.replace(study, preset=preset)
    model = study_lib.load_dense(study, args.state)
    head_dim = preset.model.dim // preset.model.num_heads
    result = {"videos": args.videos, "times": args.times, "gains": gain_stats(model, head_dim)}
    cap = train.capture_qkv(model, preset, dataclasses.replace(preset.stage1, timesteps=tuple(args.times)),
                            stream=data_lib.HELDOUT_STREAM, num_videos=args.videos, with_output=False)
    sp = (0.9, 0.95, 0.97)
    kw = dict(sparsities=sp, block_q=preset.block_q, block_k=preset.block_k)
    kept = {}
    for s in args.scales:
        r = diagnostics.kept_mass_report([q * s for q in cap["q"]], cap["k"], **kw)
        kept[f"raster x{s:g}"] = r
    for name, perm in token_orders(model.grid).items():
        if name in args.orders:
            kept[name] = diagnostics.kept_mass_report([q[:, perm] for q in cap["q"]], [k[:, perm] for k in cap["k"]],
                                                      **kw)
    result["kept"] = {name: {"oracle_per_layer": r["oracle"], "mean_oracle": r["mean_oracle"], "sparsities": sp}
                      for name, r in kept.items()}
    for name, r in kept.items():
        print(f"{name:12s} oracle 95%: mean {r['mean_oracle'][1]:.3f}, per layer "
              + ", ".join(f"{o[1]:.3f}" for o in r["oracle"]), flush=True)
    if args.rows:
        frame = jnp.asarray(np.arange(model.seq_len) // (model.grid[1] * model.grid[2]))
        result["rows"] = [row_stats(q[0].astype(jnp.float32), k[0].astype(jnp.float32), frame, model.grid[0])
                          for q, k in zip(cap["q"], cap["k"])]
        for layer, r in enumerate(result["rows"]):
            print(layer, json.dumps({k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
                                     for k, v in r.items()}), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
