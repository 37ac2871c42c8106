"""Stage-1 forms of SLA2's soft routing compared on synthetic Q/K/V whose block means mislead SLA's router.

  python -m experiments.stage1_forms            (CPU, about a minute)

Inputs (B=1, N=1024, H=2, D=32, blocks 32/16, 90% sparsity): `inputs.structured_qkv` (attention local in the
sequence) plus, in each key block, one key with a large component along a random direction of 4 channels and
query blocks with a matching random direction: that key draws much of its row's softmax mass, while a block mean
dilutes it 16 times, so SLA's router (block means, identity W) misses those blocks. A learned W_q, W_k can
re-weight the channels. For each form ("soft", "soft_dense", "soft_dense_st") one SLA2Attention layer (alpha per
head) is trained on 8 inputs for 200 Adam steps (lr 1e-2) to the relative MSE to dense attention; reported on 2
held-out inputs with hard routing: relative L2 error to dense attention and the exact softmax mass its router keeps
(sla2_jax.diagnostics), beside SLA's router and the oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sla2_jax as sla
from experiments.inputs import structured_qkv
from sla2_jax import diagnostics

N, H, D, BQ, BK = 1024, 2, 32, 32, 16
SPARSITY = 0.9


def spiky_qkv(seed: int, spike: float = 10.0, query: float = 3.0):
    """(q, k, v) each (1, N, H, D) float32: structured_qkv plus one aligned large key per key block (see above)."""
    q, k, v = structured_qkv(seed, 1, N, H, D, jnp.float32, sharpness=0.5)
    ks = jax.random.split(jax.random.PRNGKey(1000 + seed), 3)
    nk, nq = N // BK, N // BQ
    s = jax.random.normal(ks[0], (H, nk, 4))
    r = jax.random.normal(ks[1], (H, nq, 4))
    s, r = s / jnp.linalg.norm(s, axis=-1, keepdims=True), r / jnp.linalg.norm(r, axis=-1, keepdims=True)
    token = jax.random.randint(ks[2], (nk,), 0, BK) + jnp.arange(nk) * BK
    k = k.at[0, :, :, :4].add(jnp.zeros((N, H, 4)).at[token].set(spike * jnp.moveaxis(s, 0, 1)))
    q = q.at[0, :, :, :4].add(query * jnp.repeat(jnp.moveaxis(r, 0, 1), BQ, axis=0))
    return q, k, v


def train_form(routing: str, train, steps: int = 200, lr: float = 1e-2):
    """An SLA2Attention layer trained in the given stage-1 form; returned with routing set to "hard"."""
    cfg = sla.SLA2Config(block_q=BQ, block_k=BK, topk_ratio=round(1 - SPARSITY, 6), alpha="head", backend="xla")
    layer = sla.SLA2Attention(H, D, config=cfg, routing=routing, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(layer, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(layer, opt, q, k, v, o):
        def loss(layer):
            return jnp.mean((layer(q, k, v) - o) ** 2) / jnp.mean(o**2)

        value, grads = nnx.value_and_grad(loss)(layer)
        opt.update(layer, grads)
        return value

    refs = [sla.dense_attention(*x) for x in train]
    for i in range(steps):
        step(layer, opt, *train[i % len(train)], refs[i % len(train)])
    layer.routing = "hard"
    return layer


def main():
    train = [spiky_qkv(s) for s in range(8)]
    held = [spiky_qkv(100 + s) for s in range(2)]
    qs, ks = [x[0] for x in held], [x[1] for x in held]

    def kept(w_q=None, w_k=None):
        rep = diagnostics.kept_mass_report(qs, ks, sparsities=(SPARSITY,), block_q=BQ, block_k=BK, w_q=w_q, w_k=w_k)
        return rep["router"][0][0], rep["oracle"][0][0]

    def error(layer):
        refs = [sla.dense_attention(*x) for x in held]
        return float(np.mean([jnp.linalg.norm(layer(*x) - r) / jnp.linalg.norm(r) for x, r in zip(held, refs)]))

    sla_kept, oracle = kept()
    print(f"| router | hard-routed rel. L2 error | kept mass ({100 * SPARSITY:g}%) |\n|---|---|---|")
    print(f"| oracle | - | {oracle:.3f} |")
    identity = train_form("soft_dense_st", train, steps=0)
    print(f"| SLA (identity W, alpha 0.5, untrained) | {error(identity):.3f} | {sla_kept:.3f} |")
    for routing in ("soft", "soft_dense", "soft_dense_st"):
        layer = train_form(routing, train)
        print(f"| SLA2 stage 1 '{routing}' | {error(layer):.3f} | {kept(layer.w_q[...], layer.w_k[...])[0]:.3f} |")


if __name__ == "__main__":
    main()
