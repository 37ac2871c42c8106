"""The library's backend="pallas" (kernels in interpret mode on CPU) computes the same function as "xla":
functional API (fused SLA2 kernel), branches, the low-bit path, and gradients."""

import jax
import jax.numpy as jnp
import pytest

import sla2_jax as sla
from helpers import random_qkv, rel_err

CFG = sla.SLA2Config(block_q=64, block_k=32, topk_ratio=0.3, alpha="mass")


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_sla2_attention_pallas_equals_xla_forward_and_grad(seed, quant):
    q, k, v = random_qkv(seed, (1, 200, 2, 64))
    alpha = jax.random.uniform(jax.random.PRNGKey(seed + 1), (1, 2, 4))
    g = jax.random.normal(jax.random.PRNGKey(seed + 2), q.shape)

    def run(backend):
        cfg = CFG.replace(backend=backend, quant=quant)
        f = lambda q, k, v, a: jnp.sum(sla.sla2_attention(q, k, v, config=cfg, alpha=a) * g)  # noqa: E731
        out = sla.sla2_attention(q, k, v, config=cfg, alpha=alpha)
        return out, jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, alpha)  # one program, not op by op

    out_p, grads_p = run("pallas")
    out_x, grads_x = run("xla")
    assert rel_err(out_p, out_x) < 1e-3
    # int8: the kernel's straight-through backward uses the low-bit forward's saved LSE and O_s (SPEC 5), the
    # xla fake-quant path the unquantised ones, so their gradients differ by about the quantisation error (~1%).
    tol = 1e-3 if quant == "none" else 3e-2
    for name, a, b in zip(("q", "k", "v", "alpha"), grads_p, grads_x):
        assert rel_err(a, b) < tol, name


def test_branches_pallas_equal_xla_bf16_ragged_d128(seed):
    q, k, v = random_qkv(seed, (1, 150, 1, 128), jnp.bfloat16)
    lut = sla.route(q, k, CFG)[0]
    for quant in ("none", "int8"):
        out_p = sla.sparse_linear_branches(q, k, v, lut, block_q=64, block_k=32, quant=quant, backend="pallas")
        out_x = sla.sparse_linear_branches(q, k, v, lut, block_q=64, block_k=32, quant=quant, backend="xla")
        for a, b in zip(out_p, out_x):
            assert a.dtype == jnp.bfloat16
            assert rel_err(a, b) < 2e-2, quant
