"""Low-bit (INT8 / INT8+FP8) sparse-branch forward of pallas_kernels (attention.py, quantize.py), in Pallas interpret mode.

The reference is the fake quantisation of sla2_jax (xla backend): the INT8 kernel quantises Q and the smoothed K
with the same arithmetic, so in float32 the two agree to rounding (1e-5); in bf16 they differ only by the bf16
rounding of the reference's dequantised inputs and of P (a few 1e-3), far less than the quantisation error
itself (~1e-2 vs the unquantised branch). Gradients are straight-through: the bf16 backward kernels with the
low-bit forward's LSE and O_s, so they equal the bf16 kernel's gradients up to the forward's quantisation error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import lowbit_triton_and_emulated_mosaic, output_and_grads, random_qkv, rel_err, softmax_phi
import pallas_kernels as pk
from pallas_kernels import KernelConfig, attention, front_end, mosaic_forward, quantize
from sla2_jax.feature_maps import softmax_phi as phi_fn


def _setup(seed, n, d, dtype, block_q, block_k, ratio, h=2):
    q, k, v = random_qkv(seed, (1, n, h, d), dtype)
    lut, _, mass = sla.route(q, k, sla.SLA2Config(block_q=block_q, block_k=block_k, topk_ratio=ratio))
    return q, k, v, lut, mass


def test_key_prepass_equals_reference_quantisation(seed):
    _, k, _ = random_qkv(seed, (2, 77, 3, 32), jnp.bfloat16)
    k8, scales = quantize.quantize_keys(k, 16)
    k8_ref, scales_ref = sla.quantize_int8_blocks(sla.smooth_keys(k), 16)
    assert k8.dtype == jnp.int8 and k8.shape == k.shape and scales.shape == (2, 3, 5)
    np.testing.assert_array_equal(np.asarray(k8), np.asarray(k8_ref))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(scales_ref))


@pytest.mark.parametrize("block_q", [24, 32])  # 24: one kernel each for Q and K~; 32: one kernel for both
def test_pallas_prepass_matches_reference_quantisation(seed, block_q):
    # The Pallas pre-pass divides exactly; XLA on CPU may not, so an exact tie (x / scale = m + 0.5, possible
    # with bf16 inputs) can land one step apart: allow that on a tiny fraction of the elements, nothing more.
    q, k, v = random_qkv(seed, (1, 90, 2, 64), jnp.bfloat16)
    qz = quantize.prequantize(q, k, block_q, 16, True)
    for x8, scales, ref_x, block in ((qz.k8, qz.k_scale, sla.smooth_keys(k), 16), (qz.q8, qz.q_scale, q, block_q)):
        r8, r_scales = sla.quantize_int8_blocks(ref_x, block)
        assert x8.dtype == jnp.int8 and x8.shape == r8.shape
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(r_scales))
        diff = np.abs(np.asarray(x8, np.int32) - np.asarray(r8, np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 2e-3


@pytest.mark.parametrize(
    "n,d,dtype,block_q,block_k,tol",
    [
        # float32: typically 3e-7; 1e-3 leaves room for a rare exact tie x / scale = m + 0.5 that the Pallas
        # pre-pass (exact division) and XLA on CPU (which may not divide exactly) round one int8 step apart
        (200, 64, jnp.float32, 32, 16, 1e-3),
        (150, 128, jnp.bfloat16, 64, 32, 8e-3),  # ragged N, D 128, bf16
    ],
)
def test_int8_branches_match_fake_quant_reference(seed, n, d, dtype, block_q, block_k, tol):
    q, k, v, lut, _ = _setup(seed, n, d, dtype, block_q, block_k, 0.3)
    kw = dict(block_q=block_q, block_k=block_k)
    o_s, o_l = pk.sparse_linear_attention_lowbit(q, k, v, softmax_phi(q), softmax_phi(k), lut, quant="int8", **kw)
    r_s, r_l = sla.sparse_linear_branches(q, k, v, lut, quant="int8", backend="xla", **kw)
    b_s, _ = sla.sparse_linear_branches(q, k, v, lut, quant="none", backend="xla", **kw)
    assert o_s.dtype == dtype and o_s.shape == q.shape
    err = rel_err(o_s, r_s)
    quant_err = rel_err(r_s, b_s)  # what quantisation itself changes
    assert err < tol, (err, quant_err)
    assert quant_err > 3e-3  # the comparison is not vacuous: int8 moves the output
    assert err < 0.5 * quant_err
    assert rel_err(o_l, r_l) < (1e-5 if dtype == jnp.float32 else 5e-3)


def test_front_end_keys_equal_prepass_and_reference(seed):
    """The library's low-bit path: K~ in int8 from the front end (prep.block_means_phi_int8), Q quantised in the
    kernel, no pre-pass; same output as the pre-pass path and as the fake-quant reference. float32 inputs: with
    bf16 ones an exact tie x / scale = m + 0.5 is common, and interpret mode may round it apart (see above)."""
    q, k, v, lut, mass = _setup(seed, 150, 128, jnp.float32, 64, 32, 0.3, h=1)  # ragged N, D 128
    kw = dict(block_q=64, block_k=32)
    k_phi, _, keys = front_end.block_means_phi_int8(k, 32, phi_fn)
    o_keys = pk.sla2_fused_attention_lowbit(q, k, v, softmax_phi(q), k_phi, lut, mass, keys=keys, **kw)
    o_pre = pk.sla2_fused_attention_lowbit(q, k, v, softmax_phi(q), k_phi, lut, mass, **kw)
    r_s, r_l = sla.sparse_linear_branches(q, k, v, lut, quant="int8", backend="xla", **kw)
    # The pre-pass quantises Q and K~ on its own; a near-tie x / scale ~ m + 0.5 may round one step apart from the
    # front end's K~ / the kernel's Q (which follow XLA's quantize_int8_blocks here). Seed 1802553396: one query
    # element, outputs 6.9e-5 apart. With identical int8 operands the outputs must agree to 1e-5.
    pre = quantize.prequantize(q, k, 64, 32, True)
    steps = np.concatenate(
        [
            np.abs(np.asarray(pre.k8, np.int32) - np.asarray(keys.k8, np.int32)).ravel(),
            np.abs(np.asarray(pre.q8, np.int32) - np.asarray(sla.quantize_int8_blocks(q, 64)[0], np.int32)).ravel(),
        ]
    )
    assert steps.max() <= 1 and (steps > 0).mean() < 2e-3
    assert rel_err(o_keys, o_pre) < (1e-5 if steps.max() == 0 else 1e-3)  # typically 1e-7
    assert rel_err(o_keys, sla.combine(r_s, r_l, mass, block_q=64)) < 1e-3  # typically 3e-7 (see above)
    bad = keys._replace(scale=keys.scale[..., :-1])
    with pytest.raises(ValueError, match="keys.scale"):
        pk.sla2_fused_attention_lowbit(q, k, v, softmax_phi(q), k_phi, lut, mass, keys=bad, **kw)


def test_int8_fp8_branches_close_to_fake_quant_reference(seed):
    # P is quantised against the running max of the online softmax (the reference: against the row max), so
    # the FP8 path agrees with its fake-quant reference to the FP8 error level, not to rounding.
    q, k, v, lut, _ = _setup(seed, 130, 64, jnp.float32, 32, 16, 0.4)
    kw = dict(block_q=32, block_k=16)
    o_s, _ = pk.sparse_linear_attention_lowbit(q, k, v, softmax_phi(q), softmax_phi(k), lut, quant="int8_fp8", **kw)
    r_s, _ = sla.sparse_linear_branches(q, k, v, lut, quant="int8_fp8", backend="xla", **kw)
    b_s, _ = sla.sparse_linear_branches(q, k, v, lut, quant="none", backend="xla", **kw)
    assert rel_err(o_s, r_s) < 3e-2
    assert rel_err(o_s, b_s) < 8e-2


def test_fused_equals_combine_of_reference(seed):
    q, k, v, lut, mass = _setup(seed, 190, 64, jnp.float32, 64, 32, 0.35)
    kw = dict(block_q=64, block_k=32)
    o = pk.sla2_fused_attention_lowbit(q, k, v, softmax_phi(q), softmax_phi(k), lut, mass, **kw)
    r_s, r_l = sla.sparse_linear_branches(q, k, v, lut, quant="int8", backend="xla", **kw)
    assert rel_err(o, sla.combine(r_s, r_l, mass, block_q=64)) < 1e-3  # typically 3e-7 (see above)


@pytest.mark.parametrize("d", [64, 128])
def test_gradients_equal_bf16_kernel(seed, d):
    q, k, v, lut, mass = _setup(seed, 100, d, jnp.float32, 32, 16, 0.4, h=1)
    kw = dict(block_q=32, block_k=16)
    do = jax.random.normal(jax.random.PRNGKey(seed + 1), q.shape)
    args = (q, k, v, softmax_phi(q), softmax_phi(k), mass)

    def grads(fn):  # jitted: one program instead of an op-by-op run (the same values, a fraction of the compile time)
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, **kw) * do), argnums=tuple(range(6))))(*args)

    g_low = grads(lambda q, k, v, qp, kp, a, **kw: pk.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, **kw))
    g_ref = grads(lambda q, k, v, qp, kp, a, **kw: pk.sla2_fused_attention(q, k, v, qp, kp, lut, a, **kw))
    fwd_err = rel_err(
        pk.sla2_fused_attention_lowbit(q, k, v, softmax_phi(q), softmax_phi(k), lut, mass, **kw),
        pk.sla2_fused_attention(q, k, v, softmax_phi(q), softmax_phi(k), lut, mass, **kw),
    )
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi"), g_low, g_ref):
        assert a.shape == b.shape and bool(jnp.all(jnp.isfinite(a))), name
        # straight-through: same backward kernels, only LSE / O_s come from the low-bit forward
        assert rel_err(a, b) < max(5 * fwd_err, 1e-4), (name, rel_err(a, b), fwd_err)
    # phi(q), phi(k) gradients flow only through the linear branch: independent of the quantisation
    assert rel_err(g_low[3], g_ref[3]) < 1e-5 and rel_err(g_low[4], g_ref[4]) < 1e-5
    _check_alpha_gradient_difference(g_low[5], g_ref[5], do, (q, k, v, softmax_phi(q), softmax_phi(k), lut), kw)


def _check_alpha_gradient_difference(g_low, g_ref, do, inputs, kw):
    """d alpha_i = sum over block i's rows of dO . (O_s - O_l) with the forward's own O_s (straight-through), so the
    low-bit minus bf16 difference is exactly sum dO . (O_s,low - O_s,bf16): computed here in float64 from the two
    kernels' branch outputs. (A relative bound against the forward error does not work for d alpha: the sum over a
    block cancels, so its relative error can exceed 5x the forward's on some seeds.)"""
    os_low, ol_low = pk.sparse_linear_attention_lowbit(*inputs, **kw)
    os_ref, ol_ref = pk.sparse_linear_attention(*inputs, **kw)
    np.testing.assert_array_equal(np.asarray(ol_low), np.asarray(ol_ref))  # the linear branch is not quantised
    d_os, do64 = np.asarray(os_low - os_ref, np.float64), np.asarray(do, np.float64)
    n, block = do.shape[1], kw["block_q"]
    for i in range(g_ref.shape[-1]):
        rows = slice(i * block, min(n, (i + 1) * block))
        predicted = np.sum(do64[:, rows] * d_os[:, rows])
        scale = np.linalg.norm(do64[:, rows]) * np.linalg.norm(d_os[:, rows])  # Cauchy-Schwarz bound of predicted
        got = float(g_low[0, 0, i]) - float(g_ref[0, 0, i])
        assert abs(got - predicted) <= 1e-5 * scale + 1e-6, (i, got, predicted, scale)


def test_branch_gradients_straight_through(seed):
    q, k, v, lut, _ = _setup(seed, 70, 64, jnp.float32, 32, 16, 0.5, h=1)
    kw = dict(block_q=32, block_k=16)
    cts = jax.random.normal(jax.random.PRNGKey(seed + 2), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, softmax_phi(q), softmax_phi(k), lut, **kw)[0] * cts)

    g_low = jax.jit(jax.grad(loss(pk.sparse_linear_attention_lowbit), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(pk.sparse_linear_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_low, g_ref):
        assert 0 < rel_err(a, b) < 5e-2


def test_bad_inputs():
    q, k, v = random_qkv(0, (1, 64, 1, 64), jnp.float32)
    lut = jnp.zeros((1, 1, 2, 1), jnp.int32)
    with pytest.raises(ValueError, match="quant"):
        pk.sparse_linear_attention_lowbit(q, k, v, q, k, lut, quant="int4", block_q=32, block_k=32)
    with pytest.raises(ValueError, match="head_dim"):
        pk.sparse_linear_attention_lowbit(
            q[..., :48], k[..., :48], v[..., :48], q[..., :48], k[..., :48], lut, block_q=32, block_k=32
        )
    with pytest.raises(ValueError, match="lut"):
        pk.sla2_fused_attention_lowbit(q, k, v, q, k, lut[:, :, :1], 0.5, block_q=32, block_k=32)
    with pytest.raises(ValueError, match="alpha"):
        pk.sla2_fused_attention_lowbit(q, k, v, q, k, lut, jnp.ones((3,)), block_q=32, block_k=32)


@pytest.mark.parametrize("method", ["pallas", "xla"])
def test_query_prepass_matches_reference_quantisation_and_shift(seed, method):
    """quantize_queries (the INT8 Mosaic path's Q pass): int8 Q and scales as sla2_jax.quantize_int8_blocks, the LSE
    shift (q . mean_N(K)) * c as float64 numpy, 0 past N (ragged N, two heads)."""
    q, k, _ = random_qkv(seed, (1, 90, 2, 64), jnp.bfloat16)
    mean = jnp.mean(k.astype(jnp.float32), axis=1)
    q8, scales, shift = quantize.quantize_queries(q, 32, mean, 0.37, interpret=True, method=method)
    r8, r_scales = sla.quantize_int8_blocks(q, 32)
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(r_scales))
    diff = np.abs(np.asarray(q8, np.int32) - np.asarray(r8, np.int32))  # exact ties may round apart (see above)
    assert q8.dtype == jnp.int8 and diff.max() <= 1 and (diff > 0).mean() < 2e-3
    ref = np.einsum("bnhd,bhd->bhn", np.asarray(q, np.float64), np.asarray(mean, np.float64)) * 0.37
    assert shift.shape == (1, 2, 96) and rel_err(shift[:, :, :90], ref) < 1e-6
    assert not np.any(np.asarray(shift[:, :, 90:]))


def _emulated_mosaic_kernel(q8, k8, v, lut, step_scale, *, block_k, stages, values=None, config=None):
    """XLA stand-in for mosaic_forward._sparse_forward on int8 operands (the GPU-only kernel): S = q8 k8^T times the
    LUT entry's scale, keys of unselected blocks and >= N masked, base-2 softmax; (o_s, lse (B, H, Nq * 128)).
    16-bit values only (FP8 values: tests/kernels/test_mosaic_fp8.py)."""
    assert q8.dtype == k8.dtype == jnp.int8 and step_scale.shape == lut.shape and stages >= 1 and values is None
    b, n, h, _ = v.shape
    nq, nk = lut.shape[2], -(-n // block_k)
    idx = jnp.indices(lut.shape)
    table = jnp.zeros((b, h, nq, nk), jnp.float32).at[idx[0], idx[1], idx[2], lut].set(step_scale)
    table = jnp.repeat(jnp.repeat(table, 128, axis=2)[:, :, :n], block_k, axis=3)[..., :n]  # (B, H, N, N)
    s = jnp.einsum("bnhd,bmhd->bhnm", q8.astype(jnp.float32), k8.astype(jnp.float32)) * table
    s = jnp.where(table > 0, s, -jnp.inf)
    lse = jax.nn.logsumexp(s * np.log(2.0), axis=-1) / np.log(2.0)
    o = jnp.einsum("bhnm,bmhd->bnhd", jnp.exp2(s - lse[..., None]), v.astype(jnp.float32))
    return o.astype(v.dtype), jnp.pad(lse, ((0, 0), (0, 0), (0, nq * 128 - n)))


def test_mosaic_int8_path_with_an_emulated_kernel(seed, monkeypatch):
    """The INT8 Mosaic forward (GPU only) = Q pass + per-LUT-entry scales + the Mosaic kernel + LSE shift + the Triton
    linear epilogue. On CPU an XLA emulation replaces the kernel; output and gradients must equal the Triton INT8
    path's (same quantised operands; the kernel itself is checked on the GPU by experiments/dev/probe_mosaic_int8.py)."""
    calls = []

    def kernel(*args, **kw):
        calls.append(kw)
        return _emulated_mosaic_kernel(*args, **kw)

    q, k, v, lut, mass = _setup(seed, 200, 64, jnp.float32, 128, 64, 0.5)  # ragged N, 2 query blocks
    kw = dict(block_q=128, block_k=64)
    do = jax.random.normal(jax.random.PRNGKey(seed + 3), q.shape)
    (o_ref, g_ref), (o, g) = lowbit_triton_and_emulated_mosaic(
        q, k, v, lut, mass, do, kw, kernel, monkeypatch
    )
    assert calls, "the mosaic path was not taken"
    assert rel_err(o, o_ref) < 1e-5, rel_err(o, o_ref)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, g_ref):
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def _phi_array_form(config):
    """The low-bit module forward in the form with phi arrays (the front end writes phi(Q), phi(K), the int8 K~ and
    int8 Q in its reads of K and Q; the kernels read the arrays): what the library ran before its low-bit forward
    took the bf16 path's front end (experiments.dev.common.phi_array_low_bit_route)."""
    from experiments.dev.common import phi_array_low_bit_route
    from sla2_jax import backends

    def forward(q, k, v):
        lut, mass, qp, kp, keys, queries, q2, k2 = phi_array_low_bit_route(q, k, config, config.feature_map)
        return backends.fused(q2, k2, v, qp, kp, lut, jax.lax.stop_gradient(mass), config, keys=keys,
                              queries=queries)

    return forward


@pytest.mark.parametrize("path", ["triton", "mosaic"])
def test_library_low_bit_forward_equals_the_phi_array_form(seed, path, monkeypatch):
    """sla2_attention(quant="int8", backend="pallas") routes as the bf16 forward does (K and V read once for K's
    block means and the linear states, phi in the kernels) plus the low-bit operands (int8 K~ with the mean of K's
    block means, int8 Q and its LSE shift in the read of Q that gives Q's means): output and gradients equal the
    form with phi arrays, whose smoothing mean is mean_N(K) by one XLA reduction (any mean is exact; a different
    one may move an int8 element by one step). Mosaic: the GPU-only kernel is the XLA emulation above, handed no
    phi(Q) array but q's rows (q16) and the feature map."""
    seen = []
    if path == "mosaic":
        n, d, block_q, block_k = 200, 64, 128, 64  # ragged N, 2 query blocks

        def kernel(*a, **kw):
            linear = kw.get("linear")
            seen.append(None if linear is None else (linear.q_phi is None, kw.get("q16") is not None))
            return _emulated_mosaic_kernel_with_linear(*a, **kw)

        monkeypatch.setattr(mosaic_forward, "_sparse_forward", kernel)
        dtype = jnp.bfloat16
    else:
        n, d, block_q, block_k = 150, 128, 64, 32
        dtype = jnp.float32
    q, k, v = random_qkv(seed, (1, n, 2, d), dtype)
    cfg = sla.SLA2Config(block_q=block_q, block_k=block_k, topk_ratio=0.5, quant="int8", backend="pallas",
                         kernel=KernelConfig(forward=path, backward="triton"))
    do = jax.random.normal(jax.random.PRNGKey(seed + 1), q.shape)
    o_new, g_new = output_and_grads(lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg), (q, k, v), do)
    new_calls = list(seen)
    o_old, g_old = output_and_grads(_phi_array_form(cfg), (q, k, v), do)
    if path == "mosaic":
        assert new_calls and all(c == (True, True) for c in new_calls), new_calls
        assert seen[len(new_calls):] and all(c == (False, False) for c in seen[len(new_calls):]), seen
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-3
    assert rel_err(o_new, o_old) < tol, rel_err(o_new, o_old)
    for name, a, b in zip("qkv", g_new, g_old):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    # and the output is the low-bit one (not the bf16 path's): INT8 moves it measurably
    o_16 = sla.sla2_attention(q, k, v, config=cfg.replace(quant="none", kernel=KernelConfig(forward="triton")))
    assert rel_err(o_new, o_16) > 1e-4


def test_low_bit_operands_smooth_with_the_mean_of_the_block_means(seed):
    """backends.low_bit_operands: the smoothing mean is mean_N(K) (from the block means weighted by their rows, a
    ragged last block included), K~ in int8 as quantize_int8_blocks(K - mean) to one step, Q in int8 as
    quantize_int8_blocks(Q) to one step, the shift (q . mean) * sm_scale * log2 e, Q's means the front end's."""
    from sla2_jax import backends

    q, k, v = random_qkv(seed, (1, 200, 2, 64), jnp.float32)
    cfg = sla.SLA2Config(block_q=64, block_k=32, topk_ratio=0.5, quant="int8", backend="pallas")
    _, k_means, _ = front_end.block_means_phi_int8(k, 32, None)
    q_means, keys, queries = backends.low_bit_operands(q, k, k_means, cfg)
    mean = jnp.mean(k, axis=1)
    assert rel_err(keys.mean, mean) < 1e-6, rel_err(keys.mean, mean)
    for x8, ref in ((keys.k8, sla.quantize_int8_blocks(sla.smooth_keys(k), 32)[0]),
                    (queries.q8, sla.quantize_int8_blocks(q, 64)[0])):
        steps = np.abs(np.asarray(x8, np.int32) - np.asarray(ref, np.int32))
        assert steps.max() <= 1 and (steps > 0).mean() < 2e-3, (steps.max(), (steps > 0).mean())
    shift = np.einsum("bnhd,bhd->bhn", np.asarray(q, np.float64), np.asarray(mean, np.float64)) / 8 * np.log2(np.e)
    assert rel_err(queries.shift[:, :, :200], shift) < 1e-5
    assert rel_err(q_means, front_end.block_means_and_phi(q, 64)[1]) < 1e-6


def test_bad_queries():
    q, k, v = random_qkv(0, (1, 64, 1, 64), jnp.float32)
    lut = jnp.zeros((1, 1, 2, 1), jnp.int32)
    kw = dict(block_q=32, block_k=32)
    keys = quantize.quantize_keys_with_mean(k, 32)
    q8, scale = quantize.quantize_blocks(q, 32)
    shift = jnp.zeros((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="queries need keys"):
        pk.sla2_fused_attention_lowbit(q, k, v, q, k, lut, 0.5, queries=(q8, scale, shift), **kw)
    with pytest.raises(ValueError, match="queries.shift"):
        pk.sla2_fused_attention_lowbit(q, k, v, q, k, lut, 0.5, keys=keys, queries=(q8, scale, shift[..., :32]), **kw)
    with pytest.raises(ValueError, match="queries.q8"):
        pk.sparse_linear_attention_lowbit(q, k, v, q, k, lut, keys=keys, queries=(q, scale, shift), **kw)


def _emulated_mosaic_kernel_with_linear(
    q8, k8, v, lut, step_scale, *, block_k, stages, linear=None, outputs=("o_s", "lse"), values=None, config=None,
    q16=None,
):
    """_emulated_mosaic_kernel plus the kernel's in-epilogue linear branch and SLA2 combine (the contract of
    mosaic_forward._sparse_forward with LinearInputs): o_l = phi(Q_i) H_i / den, den = phi(Q_i) . Z_i + eps,
    o = alpha o_s + (1 - alpha) o_l; row outputs padded to Nq * 128 (den with 1). Outputs in the order asked.
    LinearInputs.q_phi None: phi(Q) = LinearInputs.feature_map of q16's rows, rounded to their dtype."""
    o_s, lse = _emulated_mosaic_kernel(q8, k8, v, lut, step_scale, block_k=block_k, stages=stages, values=values)
    if linear is None:
        return o_s, lse
    f32 = jnp.float32
    n, nq = v.shape[1], lut.shape[2]
    block = jnp.arange(n) // 128
    q_phi = linear.q_phi
    if q_phi is None:
        q_phi = linear.feature_map(q16.astype(f32)).astype(q16.dtype)
    qp32 = q_phi.astype(f32)
    den = jnp.einsum("bnhd,bhnd->bhn", qp32, linear.z[:, :, block]) + linear.eps
    o_l = (
        jnp.einsum("bnhd,bhnde->bnhe", qp32, linear.h.astype(f32)[:, :, block])
        / jnp.transpose(den, (0, 2, 1))[..., None]
    )
    vals = {"o_s": o_s.astype(f32), "o_l": o_l, "lse": lse}
    vals["den"] = jnp.pad(den, ((0, 0), (0, 0), (0, nq * 128 - n)), constant_values=1.0)
    if "o" in outputs:
        a = jnp.transpose(linear.alpha[:, :, block], (0, 2, 1))[..., None]
        vals["o"] = a * vals["o_s"] + (1.0 - a) * o_l
    return tuple(vals[x].astype(v.dtype) if x in ("o", "o_s", "o_l") else vals[x] for x in outputs)


def test_mosaic_int8_linear_epilogue_with_an_emulated_kernel(seed, monkeypatch):
    """quant "int8" on the Mosaic path with bf16 inputs: the linear branch and the combine run in the INT8 kernel's
    epilogue (mosaic_forward.sparse_linear_attention_mosaic_int8; KernelConfig.epilogue "mosaic", the default) and
    give the output and gradients of the Triton-epilogue path (epilogue "triton"). An XLA emulation replaces the
    GPU-only kernel; the primal asks for "o" alone, jax.grad for the five outputs with the LSE shift."""
    calls = []

    def kernel(*a, **kw):
        calls.append((kw.get("linear") is not None, tuple(kw.get("outputs", ("o_s", "lse")))))
        return _emulated_mosaic_kernel_with_linear(*a, **kw)

    monkeypatch.setattr(mosaic_forward, "_sparse_forward", kernel)
    q, k, v = random_qkv(seed, (1, 200, 2, 64), jnp.bfloat16)  # ragged N, 2 query blocks
    do = jax.random.normal(jax.random.PRNGKey(seed + 1), q.shape)

    def run(epilogue):
        kernel_config = KernelConfig(forward="mosaic", epilogue=epilogue)
        cfg = sla.SLA2Config(block_q=128, block_k=64, topk_ratio=0.5, quant="int8", backend="pallas", alpha="mass",
                             kernel=kernel_config)
        return output_and_grads(lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg), (q, k, v), do)

    o, g = run("mosaic")
    fused_calls = list(calls)
    o_ref, g_ref = run("triton")
    assert (True, ("o",)) in fused_calls, fused_calls
    assert (True, ("o", "o_s", "o_l", "lse", "den")) in fused_calls, fused_calls
    assert calls[len(fused_calls) :] and not any(linear for linear, _ in calls[len(fused_calls) :])
    assert rel_err(o, o_ref) < 1e-2, rel_err(o, o_ref)  # the Triton epilogue rounds o_s to bf16 before the combine
    for name, a, b in zip(("q", "k", "v"), g, g_ref):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
