"""The dK/dV kernel on Hopper: block-sparse softmax attention's dK, dV in Mosaic GPU (GPU only, no interpret mode).

The sparse loop of the Triton ``dkv_kernel`` (triton_backward.py; fused case, no linear-branch terms) as a
warp-specialised kernel.
Grid (H, Nk, B): one program per (batch, head, key block j of 64 keys). Three warpgroups per program:
  * warpgroups 0 and 1 (compute): for every query block i that selected j (the transposed LUT's row, ascending),
    warpgroup w takes the 64 query rows i * 128 + w * 64 ... + 63. Keys as rows, so no computed tile is transposed:
      S^T = K Q_w^T, dP^T = V dO_w^T (one wgmma group), P^T = exp2(S^T * scale - lse),
      dS^T = P^T (a_i dP^T - delta), then dv += (a_i P^T) dO_w, dk += dS^T Q_w (a second group)
    (four wgmma per step: M = 64 keys, N = 64 rows or D, K = D or 64 rows). Each warpgroup holds its own dk, dv
    (64 x D float32); at the end the two halves are summed through a swizzled float32 buffer in shared memory
    (two buffers where they fit, D = 64: each warpgroup finishes one of dk, dv; else one, warpgroup 0 finishes
    both) and stored by TMA from the K, V tiles.
  * warpgroup 2 (memory): TMA copies of Q, dO (64 x D), lse, delta (64) of each half query block into a ring of
    ``stages`` slots per compute warpgroup, each refilled as soon as its warpgroup released it; warpgroup 0 issues
    the copies of K_j, V_j.
With ``dk_phi``, ``dv_add`` and ``feature_map`` (the linear branch's dphi(K) and phi(K) dH, made before this kernel):
after its last Q / dO copy the memory warpgroup TMA-loads key block j's rows of both into the next two free Q
slots of the ring, and the finishing warpgroup(s) add them: dK = sm_scale * dk + J_phi(K_j)^T dphi(K_j) (phi's vjp
at the K tile, still in shared memory, in float32) and dV = dv + dv_add, so that no separate vjp pass over K runs.
Trip count count[b, h, j] (dynamic); query rows >= N (only in the last query block, which the ascending list puts
last) are masked on that entry alone, so a garbage lse / delta there cannot make NaN.
Flop per program 8 * 128 * 64 * D * count; bytes per step 4 * 128 * D (Q, dO; mostly from L2).
Checked on the GPU only (experiments/dev/probe_mosaic_dkv.py); timings, and the variants that were measured and
deleted (persistent programs, union staging, a three-group schedule, key-block grid order, read-only drain, a plain
exchange buffer): docs/dev/backward_kernels.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import LOG2E, written_phi_vjp
from .config import KernelConfig

_ROWS = 64  # query rows per compute warpgroup and step (wgmma N); a query block is 2 x 64 rows
_BLOCK_Q = 2 * _ROWS
_KEYS = 64  # keys per program (wgmma M)
_SMEM_BYTES = 227 * 1024  # opt-in shared memory per block on H100
_PROFILE_REGIONS = 24  # named regions a warpgroup may record when the on-device profiler is on


def _smem_bytes(d: int, itemsize: int, stages: int, exchange: str) -> int:
    """Shared memory of one program: Q / dO ring, K, V, lse / delta ring and the float32 exchange buffer(s)."""
    ring = 2 * stages * _ROWS * d * itemsize * 2 + 2 * stages * _ROWS * 4 * 2
    kv = 2 * _KEYS * d * itemsize
    buffers = 2 if exchange == "pair" else 1
    return ring + kv + buffers * _KEYS * d * 4


def _exchange_mode(d: int, itemsize: int, stages: int) -> str:
    """'pair' (each warpgroup finishes one of dk, dv) where two float32 buffers fit, else 'serial' (one buffer,
    warpgroup 0 finishes both)."""
    return "pair" if _smem_bytes(d, itemsize, stages, "pair") + 4096 <= _SMEM_BYTES else "serial"


def _check_inputs(q, k, v, do, lse, delta, lut_t, count, alpha, block_k):
    b, n, h, d = q.shape
    nq, nk = -(-n // _BLOCK_Q), -(-n // _KEYS)
    if block_k != _KEYS:
        raise ValueError(f"block_k must be {_KEYS}, got {block_k}")
    if n % 8 or d not in (64, 128) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"need N a multiple of 8, D 64 or 128 and bf16/f16 inputs, got N={n}, D={d}, {q.dtype}")
    if any(x.shape != q.shape or x.dtype != q.dtype for x in (k, v, do)):
        raise ValueError("q, k, v, do must share shape and dtype")
    if lse.shape != (b, h, nq * _BLOCK_Q) or delta.shape != lse.shape:
        raise ValueError(f"lse / delta must be (B, H, {nq * _BLOCK_Q}), got {lse.shape} / {delta.shape}")
    if lut_t.shape != (b, h, nk, nq) or count.shape != (b, h, nk):
        raise ValueError(f"lut_t {lut_t.shape} / count {count.shape} must be (B, H, {nk}, {nq}) / (B, H, {nk})")
    if alpha is not None and alpha.shape != (b, h, nq):
        raise ValueError(f"alpha must be (B, H, {nq}), got {alpha.shape}")


def sparse_attention_dkv_mosaic(
    q, k, v, do, lse, delta, lut_t, count, alpha=None, *, block_k: int = 64, sm_scale: float | None = None,
    stages: int = 2, config: KernelConfig = KernelConfig(), dk_phi=None, dv_add=None, feature_map=None,
):  # fmt: skip
    """dK, dV of the sparse branch over the transposed LUT (plus the linear branch's terms, when given).

    q, k, v, do: (B, N, H, D) bf16/f16, N % 8 == 0, D in {64, 128}; lse, delta: (B, H, Nq * 128) float32 (lse in
    base 2 of the logits scaled by sm_scale * log2(e), delta = a_i * rowsum(dO * o_s)); lut_t: (B, H, Nk, Nq)
    int32, the query blocks that selected key block j ascending (padding after count[b, h, j] entries is not read);
    count: (B, H, Nk) int32; alpha: None or (B, H, Nq) float32. Returns dk, dv (B, N, H, D) in k.dtype.
    stages: ring slots per compute warpgroup (at D = 128 only 2 fit in shared memory). config: of its fields only
    ``profile_dir`` concerns this kernel (Mosaic's on-device profiler: timestamps of the named regions per
    warpgroup, a trace written there).
    dk_phi, dv_add: None, or the cotangent of phi(K) and a term to add to dV, both (B, N, H, D) in k.dtype, with
    feature_map (phi, the map the forward applied to K, carrying its vjp written out as ``phi.vjp``:
    common.written_phi_vjp): then dk also holds J_phi(K)^T dk_phi and dv also dv_add.
    """
    _check_inputs(q, k, v, do, lse, delta, lut_t, count, alpha, block_k)
    lin = (dk_phi, dv_add, feature_map)
    if any(x is None for x in lin) != all(x is None for x in lin):
        raise ValueError("dk_phi, dv_add and feature_map go together (all or none)")
    if dk_phi is not None and (any(x.shape != k.shape or x.dtype != k.dtype for x in (dk_phi, dv_add))
                               or written_phi_vjp(feature_map) is None):
        raise ValueError(f"dk_phi, dv_add must be like k {k.shape} {k.dtype} and feature_map a map with a "
                         f"written-out .vjp (common.written_phi_vjp), got {dk_phi.shape} {dk_phi.dtype}, "
                         f"{dv_add.shape} {dv_add.dtype}, {feature_map!r}")
    exchange = _exchange_mode(q.shape[-1], q.dtype.itemsize, stages)
    kernel = _build(q.shape, q.dtype, sm_scale, stages, exchange, config.profile_dir, alpha is not None,
                    written_phi_vjp(feature_map) if dk_phi is not None else None)
    args = (q, k, v, do, lse, delta, lut_t, count) + ((alpha,) if alpha is not None else ())
    return kernel(*args + ((dk_phi, dv_add) if dk_phi is not None else ()))


@functools.cache
def _build(shape, dtype, sm_scale, stages: int, exchange: str, profile_dir: str | None, has_alpha: bool, phi_vjp=None):
    """The plgpu.kernel callable for one static configuration (exchange "pair" or "serial": _exchange_mode; phi_vjp:
    None, or the written-out vjp of the feature map whose dphi(K) the kernel then takes, with dv_add)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    b, n, h, d = shape
    nk = -(-n // _KEYS)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    scale = sm_scale * LOG2E
    ragged_q = n % _BLOCK_Q != 0
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    cols = plgpu.Layout.WGMMA.reduce(0)  # a vector along the query rows (the columns of S^T)

    def block_ids():
        """(batch, head, key block) of this program."""
        return lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kblock")

    def compute(refs, smem, bars, wg):
        k_ref, v_ref, lut_ref, count_ref, alpha_ref, dk_ref, dv_ref = refs
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, red_smem = smem
        q_ready, do_ready, lse_ready, delta_ready, free, kv_ready, red_full, red_empty = bars[:8]
        lin_ready = bars[8] if phi_vjp is not None else None
        with jax.named_scope("c_setmaxnreg"):
            plgpu.set_max_registers(232, action="increase")
        with jax.named_scope("c_issue_kv"):
            pl.when(wg == 0)(lambda: load_kv(k_ref, v_ref, k_smem, v_smem, kv_ready, block_ids()))
        zeros = plgpu.layout_cast(jnp.full((_KEYS, d), 0.0, f32), wgmma_layout)
        bi, hi, j = block_ids()
        cnt = count_ref[bi, hi, j]

        def probs(s_t, slot, qi, masked):
            """P^T (64 keys x 64 rows, float32) from S^T; rows >= N zeroed on the masked entry; valid mask."""
            plgpu.barrier_wait(lse_ready.at[slot])
            lse = plgpu.load(lse_smem.at[slot], (), layout=cols)
            p_t = jnp.exp2(s_t * scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if not masked:
                return p_t, None
            rows = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=wgmma_layout)
            valid = rows + (qi * _BLOCK_Q + wg * _ROWS) < n
            return jnp.where(valid, p_t, 0.0), valid

        def score_grads(p_t, dp_t, slot, a, valid):
            """dS^T = P^T (a dP^T - delta) (float32, 64 x 64)."""
            plgpu.barrier_wait(delta_ready.at[slot])
            delta = plgpu.load(delta_smem.at[slot], (), layout=cols)
            dp_t = dp_t * a if has_alpha else dp_t
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
            return ds_t if valid is None else jnp.where(valid, ds_t, 0.0)

        def step(t, carry, masked=False):
            """One half query block (64 rows) in two wgmma groups: S^T, dP^T | dV, dK."""
            dk, dv = carry
            slot = lax.rem(t, stages) * 2 + wg
            qi = lut_ref[bi, hi, j, t]
            q_w, do_w = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_ready.at[slot])
            plgpu.barrier_wait(do_ready.at[slot])

            def scores_and_dp(acc_refs):
                s_acc, dp_acc = acc_refs
                plgpu.wgmma(s_acc, k_smem, plgpu.transpose_ref(q_w, (1, 0)))
                plgpu.wgmma(dp_acc, v_smem, plgpu.transpose_ref(do_w, (1, 0)))

            tile0 = plgpu.layout_cast(jnp.full((_KEYS, _ROWS), 0.0, f32), wgmma_layout)
            s_t, dp_t = pl.run_state(scores_and_dp)((plgpu.ACC.init(tile0), plgpu.ACC.init(tile0)))
            p_t, valid = probs(s_t, slot, qi, masked)
            a = alpha_ref[bi, hi, qi] if has_alpha else None
            ds16 = score_grads(p_t, dp_t, slot, a, valid).astype(dtype)
            w16 = (p_t * a if has_alpha else p_t).astype(dtype)

            def dv_and_dk(acc_refs):
                dv_acc, dk_acc = acc_refs
                plgpu.wgmma(dv_acc, w16, do_w)
                plgpu.wgmma(dk_acc, ds16, q_w)

            dv, dk = pl.run_state(dv_and_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        with jax.named_scope("c_wait_kv"):
            plgpu.barrier_wait(kv_ready.at[0])
            plgpu.barrier_wait(kv_ready.at[1])
        carry = (zeros, zeros)
        with jax.named_scope("c_loop"):
            if ragged_q:
                last = jnp.maximum(cnt - 1, 0)
                carry = lax.fori_loop(0, last, step, carry)
                carry = lax.fori_loop(last, cnt, functools.partial(step, masked=True), carry)
            else:
                carry = lax.fori_loop(0, cnt, step, carry)
        dk, dv = carry
        outs = ((k_smem, dk_ref), (v_smem, dv_ref))  # the K, V tiles stage the outputs
        lin = None
        if phi_vjp is not None:  # the Q slots the memory warpgroup loads dphi(K_j), dv_add into (see memory)
            s0 = lax.rem(cnt, stages) * 2
            lin = (q_smem.at[s0], q_smem.at[s0 + 1], lin_ready)
        with jax.named_scope("c_finish"):
            finish(dk * sm_scale, dv, wg, (bi, hi, j), outs, red_smem, (red_full, red_empty), lin)
        with jax.named_scope("c_drain"):  # the stores complete before the program ends
            plgpu.wait_smem_to_gmem(0, wait_read_only=False)

    def finish(dk, dv, wg, ids, outs, red_smem, bars, lin):
        """Sums the two warpgroups' partial dk, dv through shared memory, adds the linear branch's terms where lin
        = (dphi(K_j) tile, dv_add tile, their barriers) is given, and stores them (TMA)."""
        red_full, red_empty = bars
        bi, hi, j = ids
        keys = pl.ds(j * _KEYS, _KEYS)
        (dk_tile, dk_ref), (dv_tile, dv_ref) = outs
        load = functools.partial(plgpu.load, idx=(), layout=wgmma_layout, optimized=True)

        def with_lin_k(dk_total):  # + phi's vjp at K_j (the K tile, not yet overwritten) applied to dphi(K_j)
            if lin is None:
                return dk_total
            plgpu.barrier_wait(lin[2].at[0])
            return dk_total + phi_vjp(load(dk_tile).astype(f32), load(lin[0]).astype(f32))

        def with_lin_v(dv_total):
            if lin is None:
                return dv_total
            plgpu.barrier_wait(lin[2].at[1])
            return dv_total + load(lin[1]).astype(f32)

        def store(x, tile, out_ref):
            with jax.named_scope("c_store"):
                tile[...] = x.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(tile, out_ref.at[bi, keys, hi])

        if exchange == "pair":  # warpgroup 0 finishes dk, warpgroup 1 dv

            @pl.when(wg == 0)
            def _():
                red_smem.at[0][...] = dv

            @pl.when(wg == 1)
            def _():
                red_smem.at[1][...] = dk

            plgpu.barrier_arrive(red_full)
            plgpu.barrier_wait(red_full)

            @pl.when(wg == 0)
            def _():
                store(with_lin_k(dk + load(red_smem.at[1])), dk_tile, dk_ref)

            @pl.when(wg == 1)
            def _():
                store(with_lin_v(dv + load(red_smem.at[0])), dv_tile, dv_ref)
        else:  # one buffer: warpgroup 1 hands over dk, then dv; warpgroup 0 finishes both

            @pl.when(wg == 1)
            def _():
                red_smem.at[0][...] = dk
                plgpu.barrier_arrive(red_full)
                plgpu.barrier_wait(red_empty)
                red_smem.at[0][...] = dv
                plgpu.barrier_arrive(red_full)

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(red_full)
                dk_total = dk + load(red_smem.at[0])
                plgpu.barrier_arrive(red_empty)
                plgpu.barrier_wait(red_full)
                dv_total = dv + load(red_smem.at[0])
                store(with_lin_k(dk_total), dk_tile, dk_ref)
                store(with_lin_v(dv_total), dv_tile, dv_ref)

    def memory(refs, smem, bars):
        q_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref = refs[:6]
        q_smem, do_smem, lse_smem, delta_smem = smem
        q_ready, do_ready, lse_ready, delta_ready, free = bars[:5]
        with jax.named_scope("m_setmaxnreg"):
            plgpu.set_max_registers(40, action="decrease")
        bi, hi, j = block_ids()
        cnt = count_ref[bi, hi, j]

        def fetch(t, _, wait):
            for w in range(2):
                s = lax.rem(t, stages) * 2 + w
                if wait:
                    plgpu.barrier_wait(free.at[s])
                rows = pl.ds(lut_ref[bi, hi, j, t] * _BLOCK_Q + w * _ROWS, _ROWS)
                plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[s], q_ready.at[s])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[s], lse_ready.at[s])
                plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem.at[s], do_ready.at[s])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[s], delta_ready.at[s])
            return _

        first = jnp.minimum(cnt, stages)
        with jax.named_scope("m_prime"):  # the first ring slots are free
            lax.fori_loop(0, first, functools.partial(fetch, wait=False), None)
        with jax.named_scope("m_refill"):
            lax.fori_loop(first, cnt, functools.partial(fetch, wait=True), None)
        if phi_vjp is not None:  # dphi(K_j), dv_add into the two Q slots a step t = cnt would take
            dk_phi_ref, dv_add_ref = refs[6:]
            lin_ready = bars[5]
            s0 = lax.rem(cnt, stages) * 2

            @pl.when(cnt >= stages)  # slots used before: wait until their last step released them
            def _():
                plgpu.barrier_wait(free.at[s0])
                plgpu.barrier_wait(free.at[s0 + 1])

            keys = pl.ds(j * _KEYS, _KEYS)
            with jax.named_scope("m_lin"):
                plgpu.copy_gmem_to_smem(dk_phi_ref.at[bi, keys, hi], q_smem.at[s0], lin_ready.at[0])
                plgpu.copy_gmem_to_smem(dv_add_ref.at[bi, keys, hi], q_smem.at[s0 + 1], lin_ready.at[1])

    def load_kv(k_ref, v_ref, k_smem, v_smem, kv_ready, ids):
        bi, hi, j = ids
        keys = pl.ds(j * _KEYS, _KEYS)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hi], k_smem, kv_ready.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hi], v_smem, kv_ready.at[1])

    def entry(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref = refs[:8]
        alpha_ref = refs[8] if has_alpha else None
        lin_refs = refs[8 + has_alpha : 10 + has_alpha] if phi_vjp is not None else ()
        dk_ref, dv_ref = refs[-2:]
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        f32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2 * stages, _ROWS, d), dtype, transforms=tiles),  # Q halves
            plgpu.SMEM((2 * stages, _ROWS, d), dtype, transforms=tiles),  # dO halves
            plgpu.SMEM((2 * stages, _ROWS), f32),  # lse
            plgpu.SMEM((2 * stages, _ROWS), f32),  # delta
            plgpu.SMEM((_KEYS, d), dtype, transforms=tiles),  # K, then the dk output tile
            plgpu.SMEM((_KEYS, d), dtype, transforms=tiles),  # V, then the dv output tile
            plgpu.SMEM((2 if exchange == "pair" else 1, _KEYS, d), f32, transforms=f32_tiles),  # partial sums
        )
        ring = tuple(plgpu.Barrier(num_barriers=2 * stages) for _ in range(5))  # Q, dO, lse, delta ready; free
        lin_bars = (plgpu.Barrier(num_barriers=2),) if phi_vjp is not None else ()  # dphi(K_j), dv_add loaded
        others = (
            plgpu.Barrier(num_barriers=2),  # K, V loaded
            plgpu.Barrier(num_arrivals=2 if exchange == "pair" else 1),  # partial sums written
            plgpu.Barrier(num_arrivals=1),  # exchange buffer read (serial)
        )

        def body(smem, ring, others):
            wg = lax.axis_index("wg")

            @pl.when(wg < 2)
            def _compute():
                refs_c = (k_ref, v_ref, lut_ref, count_ref, alpha_ref, dk_ref, dv_ref)
                compute(refs_c, smem, ring[:5] + others + ring[5:], wg)  # ring[5:]: the dphi(K_j), dv_add barriers

            @pl.when(wg == 2)
            def _memory():
                refs_m = (q_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref, *lin_refs)
                memory(refs_m, smem[:4], ring)

        pl.run_scoped(body, smem, ring + lin_bars, others, collective_axes="wg")

    out_struct = jax.ShapeDtypeStruct(shape, dtype)
    profile = {"profile_space": _PROFILE_REGIONS, "profile_dir": profile_dir} if profile_dir else {}
    return plgpu.kernel(
        entry,
        out_type=(out_struct, out_struct),
        grid=(h, nk, b),
        grid_names=("heads", "kblock", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
    )
