"""Pallas SLA kernels (interpret mode on CPU) vs a dense, token-level float32 reference.

Fresh random inputs each run (the seed is printed in failure messages); ragged N, D 64/128, bf16/f32,
both linear scopes, the fused SLA2 variant (with d alpha), topk == Nk, and bad inputs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import KernelConfig, attention, linear_states, mosaic_dkv, mosaic_dq, mosaic_forward
from pallas_kernels import mosaic_supports, sla2_fused_attention, sparse_linear_attention
from pallas_kernels import reference
from pallas_kernels.common import validate_call
from pallas_kernels.config import Launch
from sla2_jax.feature_maps import softmax_phi

# The dense references and every gradient run jitted: one program each instead of an op-by-op (eager) run, the same
# values to rounding, a fraction of the compile time (the suite is compile-bound). Forward kernel calls stay eager.
_STATIC = ("block_q", "block_k", "linear_scope", "sm_scale", "eps")
reference_branches = jax.jit(reference.reference_branches, static_argnames=_STATIC)
reference_fused = jax.jit(reference.reference_fused, static_argnames=_STATIC)


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _grad(f, argnums, *args):
    """jax.grad(f, argnums)(*args), jitted."""
    return jax.jit(jax.grad(f, argnums=argnums))(*args)


def _make(seed, b, n, h, d, dtype, topk, block_q, block_k, alpha=False):
    rng = np.random.default_rng(seed)
    nq, nk = -(-n // block_q), -(-n // block_k)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(3))
    k = k - jnp.mean(k, axis=1, keepdims=True)  # smoothed K, as the library passes it
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    q_phi = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(dtype)
    k_phi = jax.nn.softmax(k.astype(jnp.float32), axis=-1).astype(dtype)
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(b * h * nq)]), axis=-1)
    lut = jnp.asarray(lut.reshape(b, h, nq, topk), jnp.int32)
    w1 = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
    a = jnp.asarray(rng.uniform(0.1, 0.9, (b, h, nq)), jnp.float32) if alpha else None
    return (q, k, v, q_phi, k_phi), lut, w1, w2, a


# (N, D, dtype, scope, topk, block_q, block_k): ragged N everywhere; tolerances by dtype.
CASES = [
    (200, 64, jnp.float32, "complement", 2, 128, 64),
    (333, 128, jnp.bfloat16, "complement", 3, 128, 64),
    (333, 64, jnp.float32, "all", 2, 128, 64),
    (100, 32, jnp.float32, "complement", 3, 32, 16),  # several query sub-blocks and key blocks
]
TOL = {jnp.float32: (2e-4, 2e-3), jnp.bfloat16: (2e-2, 3e-2)}  # (forward, gradients), norm-wise relative


@pytest.mark.parametrize("n,d,dtype,scope,topk,block_q,block_k", CASES)
def test_branches_forward_and_gradients(n, d, dtype, scope, topk, block_q, block_k):
    seed = _seed()
    args, lut, w1, w2, _ = _make(seed, 1, n, 2, d, dtype, topk, block_q, block_k)
    kw = dict(block_q=block_q, block_k=block_k, linear_scope=scope)

    def loss(fn):
        def f(*xs):
            o_s, o_l = fn(*xs, lut, **kw)
            return jnp.sum(o_s.astype(jnp.float32) * w1) + jnp.sum(o_l.astype(jnp.float32) * w2)

        return f

    o_s, o_l = sparse_linear_attention(*args, lut, **kw)
    assert o_s.dtype == dtype and o_l.dtype == dtype and o_s.shape == args[0].shape
    r_s, r_l = reference_branches(*args, lut, **kw)
    ftol, gtol = TOL[dtype]
    assert _rel(o_s, r_s) < ftol, (seed, _rel(o_s, r_s))
    assert _rel(o_l, r_l) < ftol, (seed, _rel(o_l, r_l))
    grads = _grad(loss(sparse_linear_attention), (0, 1, 2, 3, 4), *args)
    ref_grads = _grad(loss(reference_branches), (0, 1, 2, 3, 4), *[x.astype(jnp.float32) for x in args])
    for name, g, rg in zip(("q", "k", "v", "q_phi", "k_phi"), grads, ref_grads):
        assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g))), (seed, name)
        assert _rel(g, rg) < gtol, (seed, name, _rel(g, rg))


@pytest.mark.parametrize("scope", ["complement", "all"])
def test_fused_forward_and_gradients_including_alpha(scope):
    seed = _seed()
    n, d, topk = 333, 64, 2
    args, lut, w1, _, alpha = _make(seed, 2, n, 1, d, jnp.float32, topk, 128, 64, alpha=True)
    kw = dict(block_q=128, block_k=64, linear_scope=scope)

    def loss(fn):
        return lambda *xs: jnp.sum(fn(*xs[:5], lut, xs[5], **kw).astype(jnp.float32) * w1)

    o = sla2_fused_attention(*args, lut, alpha, **kw)
    assert _rel(o, reference_fused(*args, lut, alpha, **kw)) < 2e-4, seed
    g = _grad(loss(sla2_fused_attention), tuple(range(6)), *args, alpha)
    rg = _grad(loss(reference_fused), tuple(range(6)), *args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, name, _rel(a, b))
    assert g[5].shape == alpha.shape


def test_fused_equals_combined_branches_bf16():
    seed = _seed()
    args, lut, _, _, alpha = _make(seed, 1, 200, 2, 128, jnp.bfloat16, 2, 128, 64, alpha=True)
    o = sla2_fused_attention(*args, lut, alpha)
    o_s, o_l = sparse_linear_attention(*args, lut)
    a = jnp.swapaxes(jnp.repeat(alpha, 128, axis=-1)[:, :, :200], 1, 2)[..., None]
    comb = a * o_s.astype(jnp.float32) + (1 - a) * o_l.astype(jnp.float32)
    assert _rel(o, comb) < 1e-2, seed
    assert _rel(o, reference_fused(*args, lut, alpha)) < 2e-2, seed


def test_all_blocks_selected_linear_branch_is_exactly_zero():
    seed = _seed()
    n = 150
    args, _, w1, w2, _ = _make(seed, 1, n, 2, 64, jnp.float32, 1, 128, 64)
    nq, nk = 2, 3
    lut = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (1, 2, nq, nk))
    o_s, o_l = sparse_linear_attention(*args, lut)
    assert float(jnp.max(jnp.abs(o_l))) == 0.0
    # With every block selected the sparse branch is dense attention.
    q, k, v = (x.astype(jnp.float32) for x in args[:3])
    dense = jax.nn.dot_product_attention(q, k, v)
    assert _rel(o_s, dense) < 2e-4, seed
    g = _grad(lambda *xs: jnp.sum(sparse_linear_attention(*xs, lut)[0] * w1), (0, 3, 4), *args)
    assert float(jnp.max(jnp.abs(g[1]))) == 0.0 and float(jnp.max(jnp.abs(g[2]))) == 0.0
    assert bool(jnp.all(jnp.isfinite(g[0])))


def test_matches_sla2_jax_reference_backend():
    sla = pytest.importorskip("sla2_jax")
    if not hasattr(sla, "sparse_linear_branches"):
        pytest.skip("sla2_jax.sparse_linear_branches not available")
    from sla2_jax.feature_maps import feature_map

    seed = _seed()
    args, lut, _, _, _ = _make(seed, 1, 200, 2, 64, jnp.float32, 2, 128, 64)
    q, k, v = args[:3]
    o_s, o_l = sparse_linear_attention(q, k, v, feature_map(q, "softmax"), feature_map(k, "softmax"), lut)
    r_s, r_l = sla.sparse_linear_branches(
        q, k, v, lut, block_q=128, block_k=64, feature_map="softmax", linear_scope="complement", backend="reference"
    )
    assert _rel(o_s, r_s) < 2e-4, seed
    assert _rel(o_l, r_l) < 2e-4, seed


def test_jit_and_default_interpret():
    seed = _seed()
    args, lut, _, _, _ = _make(seed, 1, 130, 1, 64, jnp.float32, 1, 128, 64)
    f = jax.jit(lambda *xs: sparse_linear_attention(*xs, lut))
    o_s, o_l = f(*args)
    r_s, r_l = reference_branches(*args, lut)
    assert _rel(o_s, r_s) < 2e-4 and _rel(o_l, r_l) < 2e-4, seed


def _bad_call(**over):
    b, n, h, d = 1, 100, 2, 64
    x = jnp.ones((b, n, h, d), jnp.float32)
    kw = dict(q=x, k=x, v=x, q_phi=x, k_phi=x, lut=jnp.zeros((b, h, 1, 1), jnp.int32))
    opts = {}
    for key, val in over.items():
        (kw if key in kw else opts)[key] = val
    return sparse_linear_attention(kw["q"], kw["k"], kw["v"], kw["q_phi"], kw["k_phi"], kw["lut"], **opts)


@pytest.mark.parametrize(
    "over,word",
    [
        (dict(k=jnp.ones((1, 99, 2, 64))), "k"),
        (
            dict(
                q=jnp.ones((1, 100, 2, 48)),
                k=jnp.ones((1, 100, 2, 48)),
                v=jnp.ones((1, 100, 2, 48)),
                q_phi=jnp.ones((1, 100, 2, 48)),
                k_phi=jnp.ones((1, 100, 2, 48)),
            ),
            "head_dim",
        ),
        (dict(v=jnp.ones((1, 100, 2, 64), jnp.bfloat16)), "v"),
        (dict(q=jnp.ones((1, 100, 2, 64), jnp.int32)), "q"),
        (dict(q=jnp.ones((100, 2, 64))), "q"),
        (dict(block_q=96), "block_q"),
        (dict(block_k=8), "block_k"),
        (dict(linear_scope="none"), "linear_scope"),
        (dict(lut=jnp.zeros((1, 2, 3, 1), jnp.int32)), "lut"),
        (dict(lut=jnp.zeros((1, 2, 1, 1), jnp.float32)), "lut"),
        (dict(lut=jnp.zeros((1, 2, 1, 3), jnp.int32)), "topk"),
        (dict(sm_scale=-1.0), "sm_scale"),
    ],
)
def test_bad_inputs_raise_value_error(over, word):
    with pytest.raises(ValueError, match=word):
        _bad_call(**over)


def test_bad_alpha_raises_value_error():
    x = jnp.ones((1, 100, 2, 64), jnp.float32)
    lut = jnp.zeros((1, 2, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match="alpha"):
        sla2_fused_attention(x, x, x, x, x, lut, jnp.ones((1, 3, 5)))


def test_launch_config_variants_give_the_same_result():
    """Backward sub-block sizes and forward keys-per-step (KernelConfig.launch) only change the schedule, not the
    result."""
    seed = _seed()
    args, lut, w1, w2, alpha = _make(seed, 1, 300, 1, 64, jnp.float32, 3, 128, 64, alpha=True)

    def grads(**launch):
        config = KernelConfig(launch=tuple(launch.items()))
        f = lambda *xs: jnp.sum(sla2_fused_attention(*xs[:5], lut, xs[5], config=config) * w1)
        return _grad(f, tuple(range(6)), *args, alpha)

    g1 = grads(fwd=(4, 2, 128), dq=(4, 2, 128), dkv=(4, 2, 32))
    g2 = grads(fwd=(4, 2, 64), dq=(4, 2, 32), dkv=(4, 2, 128))
    rg = _grad(lambda *xs: jnp.sum(reference_fused(*xs[:5], lut, xs[5]) * w1), tuple(range(6)), *args, alpha)
    for name, a, b, r in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g1, g2, rg):
        assert _rel(a, r) < 2e-3 and _rel(b, r) < 2e-3, (seed, name, _rel(a, r), _rel(b, r))


@pytest.mark.parametrize("launch, word", [(("dq", (4, 2, 96)), "powers of two"), (("dq", (3, 2, 64)), "powers of two"),
                                          (("dq", (4, 0, 64)), "positive"), (("nope", (4, 2, 64)), "unknown kernel")])
def test_bad_launch_entries_refused(launch, word):
    with pytest.raises(ValueError, match=word):
        KernelConfig(launch=(launch,))


def test_forward_masks_the_ragged_last_key_block():
    """Every query block selects the ragged last key block (and a random ascending rest): keys >= N never count;
    the forward-only and VJP forwards match the reference."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    n, d, bq, bk, topk = 75, 64, 32, 16, 2  # last key block holds 11 valid keys of 16
    args, _, w1, _, alpha = _make(seed, 1, n, 2, d, jnp.float32, topk, bq, bk, alpha=True)
    nq, nk = -(-n // bq), -(-n // bk)
    first = np.stack([rng.permutation(nk - 1)[: topk - 1] for _ in range(2 * nq)])
    lut = np.concatenate([np.sort(first, axis=-1), np.full((2 * nq, 1), nk - 1)], axis=-1)
    lut = jnp.asarray(lut.reshape(1, 2, nq, topk), jnp.int32)
    kw = dict(block_q=bq, block_k=bk)
    ref = reference_fused(*args, lut, alpha, **kw)

    def out_and_vjp(fn):  # the VJP's forward and its cotangents for w1, jitted
        return jax.jit(lambda *xs: (lambda out, vjp: (out, vjp(w1)))(*jax.vjp(fn, *xs)))(*args)

    out, g = out_and_vjp(lambda *xs: sla2_fused_attention(*xs, lut, alpha, **kw))
    assert _rel(sla2_fused_attention(*args, lut, alpha, **kw), ref) < 2e-4, seed
    assert _rel(out, ref) < 2e-4, seed
    rg = out_and_vjp(lambda *xs: reference_fused(*xs, lut, alpha, **kw))[1]
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, name, _rel(a, b))


@pytest.mark.parametrize("state_dtype, block_sum_dtype",
                         [("float32", "float16"), ("bfloat16", "float16"), ("bfloat16", "bfloat16")])
def test_complement_states_keep_16_bit_precision_over_a_wide_range(state_dtype, block_sum_dtype):
    """H_i, Z_i (sums over the unselected key blocks) vs float64: 16-bit inputs go through per-block 16-bit sums
    (float16 ~2^-11 relative with a power-of-two scale, bfloat16 ~2^-8 without one; no overflow for |V| ~ 1e4, no
    underflow for 1e-5), stored in float32 or, with KernelConfig.state_dtype "bfloat16", rounded once to bf16 (~2^-9); float32
    inputs stay float32. Both are checked per head against numpy on the same (rounded) inputs."""
    config = KernelConfig(state_dtype=state_dtype, block_sum_dtype=block_sum_dtype)
    seed = _seed()
    b, n, h, d, topk, block_q, block_k = 1, 333, 2, 64, 2, 128, 64
    tol16 = {("float32", "float16"): 6e-4, ("bfloat16", "float16"): 3e-3, ("bfloat16", "bfloat16"): 5e-3}
    for dtype, tol in ((jnp.bfloat16, tol16[state_dtype, block_sum_dtype]), (jnp.float32, 1e-5)):
        (q, k, v, q_phi, k_phi), lut, *_ = _make(seed, b, n, h, d, dtype, topk, block_q, block_k)
        v = (v.astype(jnp.float32) * jnp.asarray([1e4, 1e-5])[None, None, :, None]).astype(dtype)
        cfg = validate_call(q, k, v, q_phi, k_phi, lut, block_q, block_k, "complement", None, 1e-6, True, config)
        sums = linear_states.outer_sum(k_phi, v, cfg, block_rows=block_k)
        assert sums.h.dtype == (jnp.dtype(block_sum_dtype) if dtype == jnp.bfloat16 else jnp.float32)
        assert (sums.scale is not None) == (dtype == jnp.bfloat16 and block_sum_dtype == "float16")
        h_i, z_i = linear_states.complement_states(k_phi, v, lut, cfg, sums=sums)
        bf16_states = state_dtype == "bfloat16" and dtype == jnp.bfloat16
        assert h_i.dtype == (jnp.bfloat16 if bf16_states else jnp.float32)
        kp, vv, sel = np.asarray(k_phi, np.float64), np.asarray(v, np.float64), np.asarray(lut)
        for hh in range(h):
            for i in range(cfg.nq):
                rows = np.concatenate(
                    [np.arange(j * block_k, min(n, (j + 1) * block_k)) for j in range(cfg.nk) if j not in sel[0, hh, i]]
                )
                h_ref = kp[0, rows, hh].T @ vv[0, rows, hh]
                z_ref = kp[0, rows, hh].sum(axis=0)
                assert _rel(h_i[0, hh, i], h_ref) < tol, (seed, dtype, hh, i, _rel(h_i[0, hh, i], h_ref))
                assert _rel(z_i[0, hh, i], z_ref) < 1e-5, (seed, dtype, hh, i)


@pytest.mark.parametrize("scope", ["complement", "all"])
def test_mosaic_forward_path_with_a_stand_in_sparse_kernel(scope, monkeypatch):
    """The "mosaic" forward (GPU only) = a sparse kernel giving (o_s, LSE) + the Triton linear epilogue. On CPU the
    Mosaic kernel cannot run, so a stand-in returns the Triton sparse-only forward's (o_s, LSE): the epilogue, the
    residuals it hands to the backward and the custom_vjp wiring must still give the reference output and
    gradients (the Mosaic kernel itself is checked on the GPU by experiments/dev/probe_mosaic_sparse.py)."""
    calls = []

    def stand_in(q, k, v, lut, *, block_k, sm_scale, stages, config):
        calls.append(stages)
        cfg = validate_call(q, k, v, q, k, lut, 128, block_k, "all", sm_scale, 1e-6, True, KernelConfig())
        out = attention.forward(q, k, v, None, None, lut, None, cfg._replace(linear=False), fused=False, residuals=True)
        return out["o_s"], out["lse"]

    monkeypatch.setattr(mosaic_forward, "sparse_attention_mosaic", stand_in)
    seed = _seed()
    args, lut, w1, _, alpha = _make(seed, 1, 200, 2, 64, jnp.float32, 2, 128, 64, alpha=True)
    kw = dict(block_q=128, block_k=64, linear_scope=scope)
    ref_kw = dict(kw)
    kw["config"] = KernelConfig(forward="mosaic")

    def loss(fn, kw):
        return lambda *xs: jnp.sum(fn(*xs[:5], lut, xs[5], **kw) * w1)

    out = sla2_fused_attention(*args, lut, alpha, **kw)
    assert _rel(out, reference_fused(*args, lut, alpha, **ref_kw)) < 2e-4, seed
    o_s, o_l = sparse_linear_attention(*args, lut, **kw)
    r_s, r_l = reference_branches(*args, lut, **ref_kw)
    assert _rel(o_s, r_s) < 2e-4 and _rel(o_l, r_l) < 2e-4, seed
    g = _grad(loss(sla2_fused_attention, kw), tuple(range(6)), *args, alpha)
    rg = _grad(loss(reference_fused, ref_kw), tuple(range(6)), *args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, scope, name, _rel(a, b))
    assert calls, "the mosaic path was not taken"


def _lut_token_mask(sel_blocks, n, block_q, block_k):
    """(B, H, Nq, Nk) bool block selection -> (B, H, N, N) token mask (query rows, keys < N)."""
    mask = jnp.repeat(jnp.repeat(sel_blocks, block_q, axis=2), block_k, axis=3)
    return mask[:, :, :n, :n]


def _dense_sparse_grads(q, k, v, do, lse, delta, mask, alpha, sm_scale, block_q):
    """The Mosaic backward kernels' contract in dense float32 (token mask (B, H, N, N)): P = exp2(S * sm_scale *
    log2 e - lse), dP = a * dO V^T, dS = P (dP - delta) -> dq = sm_scale dS K, dk = sm_scale dS^T Q, dv = (a P)^T dO."""
    n = q.shape[1]
    q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * sm_scale * np.log2(np.e)
    p = jnp.where(mask, jnp.exp2(s - lse[:, :, :n, None]), 0.0)
    a = jnp.ones(lse.shape, jnp.float32) if alpha is None else jnp.repeat(alpha, block_q, axis=-1)
    a = a[:, :, :n, None]
    dp = a * jnp.einsum("bnhd,bmhd->bhnm", do, v)
    ds = p * (dp - delta[:, :, :n, None])
    dq = sm_scale * jnp.einsum("bhnm,bmhd->bnhd", ds, k)
    dk = sm_scale * jnp.einsum("bhnm,bnhd->bmhd", ds, q)
    dv = jnp.einsum("bhnm,bnhd->bmhd", a * p, do)
    return dq, dk, dv


@pytest.mark.parametrize(
    "scope, dq_rows, phi_vjp",
    [("complement", 128, "pass"), ("all", 128, "mosaic"), ("complement", 64, "mosaic")],
)
def test_mosaic_backward_path_with_stand_in_sparse_kernels(scope, dq_rows, phi_vjp, monkeypatch):
    """The "mosaic" backward (GPU only) = Triton kernels for the per-row terms and the linear parts + the Mosaic dQ
    and dK/dV kernels for the sparse loops. On CPU stand-ins implement those two kernels' contract in dense
    float32 (from the LUT, or from the transposed LUT and its counts): the per-row terms handed to them, their
    wiring and the Triton linear kernels must still give the reference gradients (the Mosaic kernels themselves
    are checked on the GPU by experiments/dev/probe_mosaic_dq.py and probe_mosaic_dkv.py). dq_rows: query rows per
    program of the per-row kernel (the "dq_linear" launch entry; 64: two programs per query block). phi_vjp: where
    the call without phi arrays applies phi's vjp (KernelConfig.phi_vjp): with "mosaic..." the stand-ins also take
    dphi(Q) / dphi(K) and the linear dV and add them as the Mosaic kernels' contract says (phi's written-out vjp)."""
    calls = []
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def dq_stand_in(q, k, v, do, lse, delta, lut, alpha=None, *, block_k, sm_scale, stages=2, config=None,
                    dq_phi=None, feature_map=None):  # fmt: skip
        calls.append("dq" if dq_phi is None else "dq+vjp")
        nk = -(-q.shape[1] // block_k)
        sel = jnp.any(lut[..., None] == jnp.arange(nk), axis=3)  # (B, H, Nq, Nk)
        mask = _lut_token_mask(sel, q.shape[1], 128, block_k)
        dq = _dense_sparse_grads(q, k, v, do, lse, delta, mask, alpha, sm_scale, 128)[0]
        if dq_phi is not None:
            dq = dq + feature_map.vjp(f32(q), f32(dq_phi))
        return dq.astype(q.dtype)

    def dkv_stand_in(q, k, v, do, lse, delta, lut_t, count, alpha=None, *, block_k, sm_scale, config=None,
                     dk_phi=None, dv_add=None, feature_map=None):  # fmt: skip
        calls.append("dkv" if dk_phi is None else "dkv+vjp")
        nq = lut_t.shape[-1]
        listed = jnp.arange(nq)[:, None] < count[..., None, :]  # (B, H, slot, Nk): entry t of key block j is valid
        ids = jnp.swapaxes(lut_t, 2, 3)  # (B, H, slot, Nk)
        sel = jnp.any((ids[..., None, :] == jnp.arange(nq)[:, None]) & listed[..., None, :], axis=2)  # (B,H,Nq,Nk)
        mask = _lut_token_mask(sel, q.shape[1], 128, block_k)
        _, dk, dv = _dense_sparse_grads(q, k, v, do, lse, delta, mask, alpha, sm_scale, 128)
        if dk_phi is not None:
            dk, dv = dk + feature_map.vjp(f32(k), f32(dk_phi)), dv + f32(dv_add)
        return dk.astype(k.dtype), dv.astype(k.dtype)

    monkeypatch.setattr(mosaic_dq, "sparse_attention_dq_mosaic", dq_stand_in)
    monkeypatch.setattr(mosaic_dkv, "sparse_attention_dkv_mosaic", dkv_stand_in)
    seed = _seed()
    args, lut, w1, w2, alpha = _make(seed, 1, 200, 2, 64, jnp.float32, 2, 128, 64, alpha=True)
    ref_kw = dict(block_q=128, block_k=64, linear_scope=scope)
    config = KernelConfig(backward="mosaic", phi_vjp=phi_vjp, launch=(("dq_linear", Launch(4, 2, dq_rows)),))
    kw = dict(ref_kw, config=config)
    fused = lambda *xs: jnp.sum(sla2_fused_attention(*xs[:5], lut, xs[5], **kw) * w1)
    ref_fused = lambda *xs: jnp.sum(reference_fused(*xs[:5], lut, xs[5], **ref_kw) * w1)
    g = jax.jit(jax.grad(fused, argnums=tuple(range(6))))(*args, alpha)
    rg = _grad(ref_fused, tuple(range(6)), *args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, scope, name, _rel(a, b))
    branches = lambda *xs: sum(jnp.sum(o * w) for o, w in zip(sparse_linear_attention(*xs, lut, **kw), (w1, w2)))
    ref_branches = lambda *xs: sum(jnp.sum(o * w) for o, w in zip(reference_branches(*xs, lut, **ref_kw), (w1, w2)))
    g = jax.jit(jax.grad(branches, argnums=tuple(range(5))))(*args)
    rg = _grad(ref_branches, tuple(range(5)), *args)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, scope, "branches", name, _rel(a, b))
    # without phi arrays (feature_map): the Triton linear kernels apply phi to the Q / K rows they read, then phi's vjp
    q, k, v = args[:3]
    raw_ref = lambda q, k, v, a: jnp.sum(
        reference_fused(q, k, v, softmax_phi(q), softmax_phi(k), lut, a, **ref_kw) * w1
    )
    rg = _grad(raw_ref, (0, 1, 2, 3), q, k, v, alpha)
    raw_kw = dict(kw, feature_map=softmax_phi)  # the library's map: it carries its vjp written out
    raw = lambda q, k, v, a: jnp.sum(sla2_fused_attention(q, k, v, None, None, lut, a, **raw_kw) * w1)
    g = jax.jit(jax.grad(raw, argnums=(0, 1, 2, 3)))(q, k, v, alpha)
    for name, a, b in zip(("q", "k", "v", "alpha"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, scope, "feature_map", name, _rel(a, b))
    fused = phi_vjp == "mosaic"
    assert calls.count("dq") == calls.count("dkv") == 3 - fused, calls
    assert calls.count("dq+vjp") == calls.count("dkv+vjp") == fused, calls


def test_bad_block_sum_dtype_refused():
    with pytest.raises(ValueError, match="block_sum_dtype"):
        KernelConfig(block_sum_dtype="float32")


@pytest.mark.parametrize("block_sum_dtype", ["float16", "bfloat16"])
def test_bfloat16_states_give_the_reference_result(block_sum_dtype):
    """KernelConfig.state_dtype "bfloat16" (H_i in the forward and dq, dH_j in dkv), from float16 or bfloat16
    per-block sums: output and all gradients of the fused SLA2 op still match the float32 reference within the bf16
    tolerances (ragged N, D 128, both linear parts)."""
    seed = _seed()
    args, lut, w1, _, alpha = _make(seed, 1, 333, 2, 128, jnp.bfloat16, 3, 128, 64, alpha=True)
    ref_kw = dict(block_q=128, block_k=64)
    kw = dict(ref_kw, config=KernelConfig(state_dtype="bfloat16", block_sum_dtype=block_sum_dtype))
    loss = lambda fn, kw: lambda *xs: jnp.sum(fn(*xs[:5], lut, xs[5], **kw).astype(jnp.float32) * w1)
    fwd_tol, grad_tol = TOL[jnp.bfloat16]
    assert _rel(sla2_fused_attention(*args, lut, alpha, **kw), reference_fused(*args, lut, alpha, **ref_kw)) < fwd_tol
    g = jax.jit(jax.grad(loss(sla2_fused_attention, kw), argnums=tuple(range(6))))(*args, alpha)
    rg = _grad(loss(reference_fused, ref_kw), tuple(range(6)), *args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < grad_tol, (seed, name, _rel(a, b))


@pytest.mark.parametrize("nq, nk, topk", [(7, 11, 4), (300, 5, 3)])  # 300: running counts up to ~180 per key block
def test_selection_and_transposed_lut_against_numpy(seed, nq, nk, topk):
    """selection (a scatter of the LUT, in either layout) and transpose_lut (the query blocks of each key block,
    ascending, padded with Nq, and their count; running count by a triangular matmul) vs a numpy loop; ids outside
    [0, Nk) select nothing."""
    _selection, _transpose_lut = linear_states.selection, linear_states.transpose_lut
    rng = np.random.default_rng(seed)
    b, h = 2, 3
    lut = np.stack([np.sort(rng.choice(nk, topk, replace=False)) for _ in range(b * h * nq)]).reshape(b, h, nq, topk)
    lut = lut.astype(np.int32)
    sel = np.zeros((b, h, nk, nq), bool)
    for bi, hi, qi, t in np.ndindex(*lut.shape):
        sel[bi, hi, lut[bi, hi, qi, t], qi] = True
    np.testing.assert_array_equal(np.asarray(_selection(jnp.asarray(lut), nk)), sel)
    lut_t, count = _transpose_lut(jnp.asarray(lut), nk)
    np.testing.assert_array_equal(np.asarray(count), sel.sum(-1))
    for bi, hi, j in np.ndindex(b, h, nk):
        ids = np.flatnonzero(sel[bi, hi, j])
        np.testing.assert_array_equal(np.asarray(lut_t[bi, hi, j]), np.concatenate([ids, np.full(nq - ids.size, nq)]))
    outside = lut.copy()
    outside[..., 0], outside[..., -1] = -1, nk
    expect = sel.copy()
    for bi, hi, qi in np.ndindex(b, h, nq):
        expect[bi, hi, lut[bi, hi, qi, 0], qi] = expect[bi, hi, lut[bi, hi, qi, -1], qi] = False
    np.testing.assert_array_equal(np.asarray(_selection(jnp.asarray(outside), nk)), expect)
    queries_first = _selection(jnp.asarray(outside), nk, queries_first=True)
    np.testing.assert_array_equal(np.asarray(queries_first), np.swapaxes(expect, 2, 3))
    # made wider (the width of the stored block sums): the extra columns select nothing
    wide = np.asarray(_selection(jnp.asarray(outside), nk, queries_first=True, width=nk + 5))
    np.testing.assert_array_equal(wide[..., :nk], np.swapaxes(expect, 2, 3))
    assert not wide[..., nk:].any()
    wide = np.asarray(_selection(jnp.asarray(outside), nk, width=nq + 3))
    np.testing.assert_array_equal(wide[..., :nq], expect)
    assert not wide[..., nq:].any()
    # the transposed LUT from a selection made wider (the backward's one selection for both stages)
    from_wide = _transpose_lut(jnp.asarray(lut), nk, sel=_selection(jnp.asarray(lut), nk, width=nq + 3))
    for got, want in zip(from_wide, (lut_t, count)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_backward_makes_the_key_side_selection_once(monkeypatch):
    """With Nq = 5 (the gradient states' sums stored 8 wide), the backward's gradient states and transposed LUT use
    one selection of the LUT (key blocks first), and the gradients still match the dense reference."""
    calls, fn = [], linear_states.selection

    def counted(lut, nk, *, queries_first=False, width=None):
        calls.append((queries_first, width))
        return fn(lut, nk, queries_first=queries_first, width=width)

    monkeypatch.setattr(linear_states, "selection", counted)
    seed = _seed()
    args, lut, w1, w2, _ = _make(seed, 1, 600, 2, 64, jnp.float32, 3, 128, 64)
    kw = dict(block_q=128, block_k=64, linear_scope="complement")

    def loss(f, kw):
        def one_call(*a):
            o_s, o_l = f(*a, lut, **kw)
            return jnp.sum(o_s * w1) + jnp.sum(o_l * w2)

        return one_call

    g = _grad(loss(sparse_linear_attention, {**kw, "interpret": True}), tuple(range(5)), *args)
    assert [c for c in calls if not c[0]] == [(False, linear_states.stored_blocks(5))], calls
    rg = _grad(loss(reference_branches, kw), tuple(range(5)), *args)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi"), g, rg):
        assert _rel(a, b) < 2e-3, (seed, name, _rel(a, b))


@pytest.mark.parametrize(
    "block_q, block_k, dtype, expected",
    [
        (128, 64, jnp.bfloat16, True),
        (128, 128, jnp.bfloat16, False),  # the Mosaic forward's shared memory plan holds 64-key ring slots only
        (128, 32, jnp.float16, False),
        (64, 64, jnp.bfloat16, False),
        (128, 64, jnp.float32, False),
    ],
)
def test_mosaic_kernels_only_for_the_shapes_they_are_built_for(block_q, block_k, dtype, expected):
    """mosaic_supports: b_q 128, b_k 64, 16-bit inputs; anything else takes the Triton kernels by heuristic_config
    on a Hopper GPU (instead of failing in the Mosaic compiler, e.g. shared memory overflow at b_k 128), and an
    explicit KernelConfig(forward="mosaic") for it is refused with the reason."""
    from pallas_kernels import heuristic_config

    assert (mosaic_supports(256, 64, dtype, block_q, block_k) is None) is expected
    chosen = heuristic_config(256, 64, dtype, block_q, block_k, gpu="hopper")
    assert chosen.forward == chosen.backward == ("mosaic" if expected else "triton")
    assert heuristic_config(256, 64, dtype, block_q, block_k, gpu="ampere").forward == "triton"
    if not expected:
        q = jnp.zeros((1, 256, 2, 64), dtype)
        lut = jnp.zeros((1, 2, 256 // block_q, 1), jnp.int32)
        with pytest.raises(ValueError, match="Mosaic"):
            validate_call(q, q, q, q, q, lut, block_q, block_k, "complement", None, 1e-6, False,
                          KernelConfig(forward="mosaic"))
