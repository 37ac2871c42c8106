"""The fused kernels without phi arrays: ``sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=phi)``
computes phi(K) in the states kernel and phi(Q) in the Mosaic epilogue (or a phi(Q) array for the Triton
forward); its backward applies phi in the kernels that read Q's and K's rows, then phi's vjp. Checked against the
dense float32 reference with phi applied outside and differentiated by JAX (the Triton path in interpret mode; the
Mosaic forward through its contract stand-in and lowered for CUDA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_seed as _seed
from helpers import lowered_for_cuda
from helpers import rel_err as _rel

from pallas_kernels import KernelConfig, linear_states, mosaic_dkv, mosaic_dq, mosaic_forward, reference
from pallas_kernels import sla2_fused_attention
from pallas_kernels.common import validate_call, written_phi_vjp
from pallas_kernels.linear_states import transpose_lut
from pallas_kernels.front_end import feature_map_rows, feature_map_vjp
from sla2_jax.feature_maps import PHI_FUNCTIONS

_STATIC = ("block_q", "block_k", "linear_scope", "sm_scale", "eps")
reference_fused = jax.jit(reference.reference_fused, static_argnames=_STATIC)


def _inputs(seed, n, h, d, dtype, topk):
    """q, k, v (1, N, H, D) dtype (k smoothed), an ascending LUT (block_q 128, block_k 64), alpha, weights w."""
    rng = np.random.default_rng(seed)
    nq, nk = -(-n // 128), -(-n // 64)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32) for _ in range(3))
    k = k - jnp.mean(k, axis=1, keepdims=True)
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(h * nq)]), axis=-1)
    lut = jnp.asarray(lut.reshape(1, h, nq, topk), jnp.int32)
    alpha = jnp.asarray(rng.uniform(0.1, 0.9, (1, h, nq)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), lut, alpha, w


def _reference_with_phi(phi, **kw):
    """The dense float32 fused reference with phi applied to q, k by JAX (so its gradient reaches q, k)."""
    def f(q, k, v, lut, alpha):
        q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
        return reference.reference_fused(q32, k32, v32, phi(q32), phi(k32), lut, alpha, **kw)

    return f


def _check_against_reference(args, lut, alpha, w, phi, kw, ftol, gtol, seed):
    o = sla2_fused_attention(*args, None, None, lut, alpha, feature_map=phi, **kw)
    ref = _reference_with_phi(phi, block_q=128, block_k=64, linear_scope=kw["linear_scope"])
    assert o.dtype == args[0].dtype and o.shape == args[0].shape
    assert _rel(o, ref(*args, lut, alpha)) < ftol, (seed, _rel(o, ref(*args, lut, alpha)))

    def loss(fn):
        return lambda q, k, v, a: jnp.sum(fn(q, k, v, a).astype(jnp.float32) * w)

    fused = lambda q, k, v, a: sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=phi, **kw)  # noqa: E731
    g = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2, 3)))(*args, alpha)
    rg = jax.jit(jax.grad(loss(lambda q, k, v, a: ref(q, k, v, lut, a)), argnums=(0, 1, 2, 3)))(*args, alpha)
    for name, a, b in zip(("q", "k", "v", "alpha"), g, rg):
        assert bool(jnp.all(jnp.isfinite(a))), (seed, name)
        assert _rel(a, b) < gtol, (seed, name, _rel(a, b))


# (N, D, dtype, scope, feature map): ragged N, D 64 and 128, both scopes, every feature map
CASES = [
    (333, 64, jnp.float32, "complement", "softmax"),
    (200, 128, jnp.bfloat16, "complement", "softmax"),
    (333, 64, jnp.float32, "all", "elu"),
    (200, 64, jnp.float32, "complement", "relu"),
]
TOL = {jnp.float32: (2e-4, 2e-3), jnp.bfloat16: (2e-2, 3e-2)}  # (forward, gradients), norm-wise relative


@pytest.mark.parametrize("n,d,dtype,scope,kind", CASES)
def test_fused_without_phi_arrays_matches_the_dense_reference(n, d, dtype, scope, kind):
    """Triton forward (phi(K) in the states kernel, a phi(Q) array), backward with phi applied to the rows of q, k
    the kernels read, then phi's vjp: output and the gradients of q, k, v, alpha against jax.grad of the dense
    float32 reference with phi applied outside."""
    seed = _seed()
    args, lut, alpha, w = _inputs(seed, n, 2, d, dtype, 2)
    kw = {"block_q": 128, "block_k": 64, "linear_scope": scope, "config": KernelConfig()}
    _check_against_reference(args, lut, alpha, w, PHI_FUNCTIONS[kind], kw, *TOL[dtype], seed)


def _count_calls(monkeypatch, name):
    """A list that gets the first argument's shape of every call of pallas_kernels.attention's `name` (a
    front-end function it imports), which still runs."""
    from pallas_kernels import attention

    calls, fn = [], getattr(attention, name)

    def counted(x, *a, **k):
        calls.append(x.shape)
        return fn(x, *a, **k)

    monkeypatch.setattr(attention, name, counted)
    return calls


@pytest.mark.parametrize("n,d,dtype,scope,kind", CASES[:3])
def test_backward_makes_no_phi_arrays(monkeypatch, n, d, dtype, scope, kind):
    """The backward makes no phi(Q) / phi(K) array (the kernels that read Q's / K's rows apply phi) and runs one
    vjp pass per tensor; output and gradients match the dense float32 reference."""
    made = _count_calls(monkeypatch, "feature_map_rows")
    vjps = _count_calls(monkeypatch, "feature_map_vjp")
    seed = _seed()
    args, lut, alpha, w = _inputs(seed, n, 2, d, dtype, 2)
    phi = PHI_FUNCTIONS[kind]
    kw = {"block_q": 128, "block_k": 64, "linear_scope": scope, "config": KernelConfig()}
    _check_against_reference(args, lut, alpha, w, phi, kw, *TOL[dtype], seed)

    def loss(q, k, v, a):
        o = sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=phi, **kw)
        return jnp.sum(o.astype(jnp.float32) * w)

    made.clear()
    jax.make_jaxpr(loss)(*args, alpha)
    forward_arrays = len(made)
    assert forward_arrays == 1, made  # the Triton forward's phi(Q) array
    made.clear()
    vjps.clear()
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args, alpha)
    assert len(made) == forward_arrays, (forward_arrays, made)  # none more in the backward
    assert len(vjps) == 2, vjps  # Q's and K's


def test_dkv_linear_kernel_applies_phi_to_k_rows():
    """The Mosaic backward's linear dK/dV part (triton_backward.dkv_linear_kernel) given K and phi gives what it
    gives from a phi(K) array (rounded to K's dtype both ways), up to a last-bit rounding of phi: dv and dphi(K),
    ragged N."""
    from pallas_kernels import attention
    from pallas_kernels.common import pallas_triton_call, seq_spec
    from pallas_kernels.triton_backward import dkv_linear_kernel

    seed = _seed()
    (q, k, v), lut, _, _ = _inputs(seed, 333, 2, 64, jnp.bfloat16, 2)
    phi = PHI_FUNCTIONS["softmax"]
    cfg = validate_call(q, k, v, q, k, lut, 128, 64, "complement", None, 1e-6, True, None)
    rng = np.random.default_rng(seed)
    dh = jnp.asarray(rng.standard_normal((1, 2, cfg.nk, 64, 64)), jnp.float32)
    dz = jnp.asarray(rng.standard_normal((1, 2, cfg.nk, 64)), jnp.float32)
    seq = seq_spec(cfg)
    outputs = [(name, jax.ShapeDtypeStruct(k.shape, k.dtype), seq) for name in ("dv", "dk_phi")]

    def run(rows, fm):
        inputs = [("v", v, seq), ("dv_s", q, seq)] + attention._dkv_linear_inputs(rows, (dh, dz), cfg)
        return pallas_triton_call(dkv_linear_kernel, (cfg.nk, 2, 1), inputs, outputs, cfg, "dkv", {"phi": fm})

    got, want = run(k, phi), run(phi(k.astype(jnp.float32)).astype(k.dtype), None)
    for a, b in zip(got, want):
        # phi evaluated in the kernel and by XLA can differ in float32's last bit, which now and then rounds a
        # bf16 phi(K) element the other way: equal up to one bf16 step per element, and nearly equal overall.
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2.0**-6, atol=2.0**-8 * float(np.abs(b).max()))
        assert _rel(a, b) < 1e-3, (seed, _rel(a, b))
    assert _rel(got[0], run(k, None)[0]) > 1e-2  # phi matters here


def test_mosaic_epilogue_gets_no_phi_array(monkeypatch):
    """With KernelConfig(forward="mosaic"), the fused kernel is handed LinearInputs.q_phi None and the feature map
    (the primal asks for "o", the forward of jax.grad for all five outputs); with the contract stand-in applying
    that feature map to its Q, output and gradients match the dense reference."""
    from test_mosaic_fwd_epilogue import _contract_stand_in

    stand_in = _contract_stand_in([])
    seen = []

    def recording_stand_in(q, k, v, lut, linear, **kw):
        seen.append((linear.q_phi is None, linear.feature_map))
        return stand_in(q, k, v, lut, linear, **kw)

    monkeypatch.setattr(mosaic_forward, "sparse_linear_attention_mosaic", recording_stand_in)
    seed = _seed()
    args, lut, alpha, w = _inputs(seed, 200, 2, 64, jnp.bfloat16, 2)
    phi = PHI_FUNCTIONS["softmax"]
    kw = {"block_q": 128, "block_k": 64, "linear_scope": "complement", "config": KernelConfig(forward="mosaic")}
    _check_against_reference(args, lut, alpha, w, phi, kw, 2e-2, 3e-2, seed)
    assert seen and all(none and fm is phi for none, fm in seen), seen


def test_outer_sum_applies_phi_to_its_rows():
    """outer_sum(K, V, phi=phi) equals outer_sum(phi(K), V) (phi(K) rounded to K's dtype both ways), rows >= N
    left out (a ragged N, where phi of a zero row would be 1 / D)."""
    seed = _seed()
    (q, k, v), lut, _, _ = _inputs(seed, 333, 2, 64, jnp.float32, 2)
    phi = PHI_FUNCTIONS["softmax"]
    cfg = validate_call(q, k, v, q, k, lut, 128, 64, "complement", None, 1e-6, True, None)
    k_phi = phi(k)
    for block_rows in (None, 64):
        got = linear_states.outer_sum(k, v, cfg, block_rows=block_rows, phi=phi)
        want = linear_states.outer_sum(k_phi, v, cfg, block_rows=block_rows)
        for a, b in zip(got, want):
            if a is not None:
                assert _rel(a, b) < 1e-6, (seed, block_rows, _rel(a, b))


def test_feature_map_rows_and_vjp_match_jax():
    """feature_map_rows = phi(x); feature_map_vjp(x, d_phi, d_x) = vjp of phi at x applied to d_phi, plus d_x."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    x, d_phi, d_x = (jnp.asarray(rng.standard_normal((1, 200, 2, 64)), jnp.float32) for _ in range(3))
    for kind, phi in PHI_FUNCTIONS.items():
        assert _rel(feature_map_rows(x, phi, interpret=True), phi(x)) < 1e-6, (seed, kind)
        want = jax.vjp(phi, x)[1](d_phi)[0] + d_x
        assert _rel(feature_map_vjp(x, d_phi, d_x, phi, interpret=True), want) < 1e-5, (seed, kind)
        assert _rel(feature_map_vjp(x, d_phi, None, phi, interpret=True), want - d_x) < 1e-5, (seed, kind)


def test_written_phi_vjps_match_autodiff():
    """Each library map's written-out vjp (phi.vjp, what the Mosaic backward kernels apply) equals jax.vjp of the map
    on random rows (no exact zeros, where autodiff splits elu's tie)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    x, d_phi = (jnp.asarray(rng.standard_normal((64, 128)), jnp.float32) for _ in range(2))
    for kind, phi in PHI_FUNCTIONS.items():
        want = jax.vjp(phi, x)[1](d_phi)[0]
        assert _rel(written_phi_vjp(phi)(x, d_phi), want) < 1e-6, (seed, kind)
    assert written_phi_vjp(lambda x: x * 2.0) is None  # a map without one: the backward keeps the vjp pass


@pytest.mark.parametrize("kind", sorted(PHI_FUNCTIONS))
@pytest.mark.parametrize("d", [64, 128])
def test_mosaic_backward_kernels_apply_phi_vjp_when_lowered_for_cuda(kind, d):
    """The Mosaic dQ and dK/dV kernels with phi's vjp in their epilogues (KernelConfig.phi_vjp "mosaic") lower for
    CUDA for every map at D 64 / 128 (the dK/dV kernel's "pair" and "serial" finish), ragged N, and take one / two
    more operands (dphi(Q); dphi(K) and the linear dV) than without; a map without a written-out vjp is refused."""
    b, n, h = 1, 1000, 2
    nq, nk = -(-n // 128), -(-n // 64)
    q = jnp.zeros((b, n, h, d), jnp.bfloat16)
    lse = jnp.zeros((b, h, nq * 128), jnp.float32)
    lut = jnp.zeros((b, h, nq, 5), jnp.int32)  # topk >= 4: the dQ ring takes the library's 4 slots (shared memory)
    lut_t, count = transpose_lut(lut, nk)
    alpha = jnp.ones((b, h, nq), jnp.float32)
    phi = PHI_FUNCTIONS[kind]
    config = KernelConfig(phi_vjp="mosaic")
    operands = lambda text: text.split("custom_call @mosaic_gpu")[1].split(")")[0].count("%")  # noqa: E731

    def dq(with_vjp):
        kw = {"feature_map": phi} if with_vjp else {}
        fn = lambda q, *dq_phi: mosaic_dq.sparse_attention_dq_mosaic(  # noqa: E731
            q, q, q, q, lse, lse, lut, alpha, stages=4, config=config, **kw, **dict(zip(["dq_phi"], dq_phi)))
        return lowered_for_cuda(fn, q, *([q] if with_vjp else []))

    def dkv(with_vjp):
        kw = {"feature_map": phi} if with_vjp else {}
        fn = lambda q, *lin: mosaic_dkv.sparse_attention_dkv_mosaic(  # noqa: E731
            q, q, q, q, lse, lse, lut_t, count, alpha, config=config, **kw, **dict(zip(["dk_phi", "dv_add"], lin)))
        return lowered_for_cuda(fn, q, *([q, q] if with_vjp else []))

    assert operands(dq(True)) == operands(dq(False)) + 1
    assert operands(dkv(True)) == operands(dkv(False)) + 2
    with pytest.raises(ValueError, match="vjp"):
        mosaic_dq.sparse_attention_dq_mosaic(q, q, q, q, lse, lse, lut, alpha, dq_phi=q, feature_map=lambda x: x)
    with pytest.raises(ValueError, match="vjp"):
        mosaic_dkv.sparse_attention_dkv_mosaic(q, q, q, q, lse, lse, lut_t, count, alpha, dk_phi=q, dv_add=q,
                                               feature_map=lambda x: x)  # fmt: skip
    with pytest.raises(ValueError, match="phi_vjp"):
        KernelConfig(phi_vjp="front_end")


def test_bad_phi_arguments_raise_value_error():
    (q, k, v), lut, alpha, _ = _inputs(0, 200, 1, 64, jnp.float32, 2)
    with pytest.raises(ValueError, match="feature_map"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha)
    with pytest.raises(ValueError, match="neither"):
        sla2_fused_attention(q, k, v, q, None, lut, alpha, feature_map=PHI_FUNCTIONS["relu"])


@pytest.mark.parametrize("kind", sorted(PHI_FUNCTIONS))
def test_mosaic_forward_applies_phi_to_its_q_tile_when_lowered_for_cuda(kind):
    """The Mosaic forward with phi(Q) from its Q tile lowers for CUDA for every feature map (the formulas use only
    operations Mosaic GPU lowers) and takes q, k, v, lut, H_i, Z_i, alpha: no phi(Q) input. The INT8 forward takes
    q's 16-bit rows in its place (as many operands as with a phi(Q) array) and refuses phi without them."""
    b, n, h, d = 1, 1000, 2, 128
    nq = -(-n // 128)
    q = jnp.zeros((b, n, h, d), jnp.bfloat16)
    lut = jnp.zeros((b, h, nq, 3), jnp.int32)
    hs, zs, alpha = jnp.zeros((b, h, nq, d, d), jnp.bfloat16), jnp.zeros((b, h, nq, d)), jnp.zeros((b, h, nq))
    config = KernelConfig(forward="mosaic")

    def lowered(q_phi):
        linear = mosaic_forward.LinearInputs(q_phi, hs, zs, alpha, 1e-6, PHI_FUNCTIONS[kind])
        fn = lambda q, k, v, lut: mosaic_forward.sparse_linear_attention_mosaic(  # noqa: E731
            q, k, v, lut, linear, outputs=("o",), config=config)
        return lowered_for_cuda(fn, q, q, q, lut)

    in_kernel, with_array = lowered(None), lowered(q)
    operands = lambda text: text.split("custom_call @mosaic_gpu")[1].split(")")[0].count("%")  # noqa: E731
    assert operands(in_kernel) == operands(with_array) - 1 == 7, (operands(in_kernel), operands(with_array))
    def lowered_int8(q_phi, q16):
        linear = mosaic_forward.LinearInputs(q_phi, hs, zs, alpha, 1e-6, PHI_FUNCTIONS[kind])
        fn = lambda q8, v, lut, q16: mosaic_forward._sparse_forward(  # noqa: E731
            q8, q8, v, lut, jnp.ones((b, h, nq, 3)), block_k=64, stages=2, linear=linear, outputs=("o",),
            config=config, q16=q16)
        return lowered_for_cuda(fn, q.astype(jnp.int8), q, lut, q16)

    int8_in_kernel, int8_with_array = lowered_int8(None, q), lowered_int8(q, None)
    assert operands(int8_in_kernel) == operands(int8_with_array) == 9, (operands(int8_in_kernel),)
    with pytest.raises(ValueError, match="q16"):
        lowered_int8(None, None)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs included."""
    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        yield eqn
        for val in eqn.params.values():
            if isinstance(val, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                yield from _equations(getattr(val, "jaxpr", val))


def _pallas_calls(jaxpr):
    """(name, [(shape, dtype) of each output]) of every pallas_call in a jaxpr, nested jaxprs included."""
    return [(eqn.params.get("name"), [(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars])
            for eqn in _equations(jaxpr) if eqn.primitive.name == "pallas_call"]


def _reductions_over_sequence(jaxpr, shape):
    """The reduce_sum equations over axis 1 (the sequence) of an operand of this shape in a jaxpr, nested jaxprs
    included."""
    return [eqn for eqn in _equations(jaxpr) if eqn.primitive.name == "reduce_sum"
            and tuple(eqn.invars[0].aval.shape) == tuple(shape) and 1 in eqn.params["axes"]]


@pytest.mark.parametrize("scope,quant", [("complement", "none"), ("all", "none"), ("complement", "int8")])
def test_the_library_forward_writes_no_phi_arrays(monkeypatch, scope, quant):
    """sla2_attention on the pallas backend with the Mosaic forward (its contract stand-in here): no kernel of the
    forward writes a 16-bit (B, N, H, D) array: the routing pass writes block means only, phi(K) stays inside the
    states kernel and phi(Q) inside the Mosaic epilogue. Both scopes: K and V are read once for the routing's K
    means and the linear states (one states kernel: per-block sums, or the totals for "all"), and one routing pass
    reads Q. Low bit ("int8"): the read of Q also writes int8 Q, one more read of K writes int8 K~ (no XLA
    reduction of K: the smoothing mean comes from K's block means)."""
    import sla2_jax as sla
    from test_mosaic_fwd_epilogue import _contract_stand_in
    from test_pallas_int8 import _emulated_mosaic_kernel_with_linear

    monkeypatch.setattr(mosaic_forward, "sparse_linear_attention_mosaic", _contract_stand_in([]))
    monkeypatch.setattr(mosaic_forward, "_sparse_forward", _emulated_mosaic_kernel_with_linear)  # INT8 kernels
    config = sla.SLA2Config(topk_ratio=0.25, backend="pallas", kernel=KernelConfig(forward="mosaic"),
                            linear_scope=scope, quant=quant)
    q, k, v = (x.astype(jnp.bfloat16) for x in jax.random.normal(jax.random.PRNGKey(0), (3, 1, 320, 2, 64)))
    jaxpr = jax.make_jaxpr(lambda q, k, v: sla.sla2_attention(q, k, v, config=config))(q, k, v)
    calls = _pallas_calls(jaxpr.jaxpr)
    names = [name for name, _ in calls]
    routing = {"none": {"sla_prep": 1}, "int8": {"sla_prep_int8_q": 1, "sla_prep_int8": 1}}[quant]
    for name in ("sla_prep", "sla_prep_int8_q", "sla_prep_int8"):
        assert names.count(name) == routing.get(name, 0), calls
    assert names.count("sla_sum_phi") == 1, calls
    assert not [c for c in calls if (q.shape, q.dtype) in c[1]], calls
    assert not _reductions_over_sequence(jaxpr.jaxpr, q.shape), "an XLA pass reduces a (B, N, H, D) array over N"
