"""The dQ kernel on Hopper: block-sparse softmax attention's dQ in Mosaic GPU (GPU only, no interpret mode).

The sparse loop of the Triton ``dq_kernel`` (triton_backward.py; fused case, without the linear-branch terms),
written as a warp-specialised Mosaic GPU kernel on the skeleton of the forward (mosaic_forward.py).

Grid (H, Nq, B): one program per (batch, head, query block i of 128 rows). Three warpgroups per program:
  * warpgroups 0 and 1 (compute): 64 query rows each; Q, dO, LSE and delta tiles loaded once by TMA; per LUT
    entry t (key block j = lut[b, h, i, t]): S = Q K_j^T and dP = dO V_j^T (two wgmma, one wait), in registers
    P = exp2(S * sm_scale * log2(e) - LSE), dS = P * (a_i dP - delta), then dQ_acc += dS K_j (wgmma with dS as
    the register operand). The two warpgroups run freely (no turns on the tensor cores: dS has no row reductions
    to hide). dQ = sm_scale * dQ_acc in q's dtype, staged in the warpgroup's Q tile and stored by TMA.
  * warpgroup 2 (memory): TMA copies of K_j, V_j into a ring of ``stages`` slots; V_j's slot is released once
    both warpgroups read dP, K_j's once both finished dS K_j.
Keys >= N (only in the LUT's last entry: it is ascending) are masked; rows >= N are neither read (TMA fills zeros)
nor written (TMA stores are clipped).
With ``dq_phi`` and ``feature_map`` (the linear branch's dphi(Q) and phi): once the last LUT entry's dP has read the
dO tile, each compute warpgroup TMA-loads its 64 dphi(Q) rows into it, and the epilogue adds phi's vjp at the Q tile
(still in shared memory) applied to them, in float32, to dQ: dQ = sm_scale * dQ_acc + J_phi(Q)^T dphi(Q). Bytes: one
more read of a (N, D) tile per program; the separate vjp pass over Q (read Q, dphi(Q), dQ, write dQ) goes.
Flop per program 6 * 128 * block_k * D * topk; bytes per LUT entry 2 * block_k * D * itemsize (mostly from L2).

Checked on the GPU only (experiments/dev/probe_mosaic_dq.py against a dense float32 reference and the Triton dq
kernel); Mosaic GPU kernels have no CPU interpret mode (tests/kernels/test_mosaic_dq.py lowers it for CUDA on a
CPU host). Timings, and the variants that were measured and deleted (turns on the tensor cores, alpha as a TMA row
vector, several query blocks per program with or without Q / dO prefetch, query-block grid order, read-only drain,
early LUT reads): docs/dev/backward_kernels.md (wan-1.3b at 95%, H100: 0.92 ms with 2 stages, 0.88 ms with 4, vs
1.83 ms for the Triton dq call).
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

_ROWS = 64  # query rows per compute warpgroup (one wgmma M tile)
_BLOCK_Q = 2 * _ROWS  # a query block (one LUT row) is two warpgroups' rows
_PROFILE_REGIONS = 16  # named regions a warpgroup may record when the on-device profiler is on


def sparse_attention_dq_mosaic(
    q, k, v, do, lse, delta, lut, alpha=None, *, block_k: int = 64, sm_scale: float | None = None,
    stages: int = 2, config: KernelConfig = KernelConfig(), dq_phi=None, feature_map=None,
):  # fmt: skip
    """dQ of the sparse branch over the LUT's key blocks (plus phi's vjp at Q applied to dq_phi, when given).

    q, k, v, do: (B, N, H, D) bf16/f16 (one dtype), N % 8 == 0, D in {64, 128}; lse, delta: (B, H, Nq * 128)
    float32 (lse base 2 of the logits scaled by sm_scale * log2(e), delta = a * rowsum(dO * O_s)); lut:
    (B, H, Nq, topk) int32 ascending key-block ids (blocks of block_k keys), Nq = ceil(N / 128); alpha: None or
    (B, H, Nq) float32. Returns dq (B, N, H, D) in q.dtype. ValueError for unsupported input.
    stages: K/V ring slots (the library passes 4). config: of its fields only ``profile_dir`` concerns this kernel
    (Mosaic's on-device profiler: timestamps of the named regions per warpgroup, a trace written there).
    dq_phi: None, or the cotangent of phi(Q) (B, N, H, D) in q.dtype, with feature_map (phi: a function of a float32
    (rows, D) tile -> float32 (rows, D), the one the forward applied to Q, carrying its vjp written out as
    ``phi.vjp``: common.written_phi_vjp): then dq also holds J_phi(Q)^T dq_phi.
    """
    _check_inputs(q, k, v, do, lse, delta, lut, alpha, block_k)
    if (dq_phi is None) != (feature_map is None):
        raise ValueError("dq_phi and feature_map go together (both or neither)")
    bad_phi = dq_phi is not None and (dq_phi.shape, dq_phi.dtype) != (q.shape, q.dtype)
    if bad_phi or (dq_phi is not None and written_phi_vjp(feature_map) is None):
        raise ValueError(f"dq_phi must be like q {q.shape} {q.dtype} and feature_map a map with a written-out .vjp "
                         f"(common.written_phi_vjp), got {dq_phi.shape} {dq_phi.dtype}, {feature_map!r}")
    return _dq_call(
        q, k, v, do, lse, delta, lut, alpha, dq_phi, block_k=block_k, sm_scale=sm_scale, stages=stages,
        profile_dir=config.profile_dir, phi=feature_map,
    )  # fmt: skip


def _check_inputs(q, k, v, do, lse, delta, lut, alpha, block_k):
    """Raises ValueError unless the shapes and dtypes are the ones sparse_attention_dq_mosaic supports."""
    b, n, h, d = q.shape
    nq = -(-n // _BLOCK_Q)
    if any(x.shape != q.shape or x.dtype != q.dtype for x in (k, v, do)):
        raise ValueError("q, k, v, do must share one (B, N, H, D) shape and dtype")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or d not in (64, 128) or n % 8:
        raise ValueError(f"need bf16/f16 inputs, D in (64, 128) and N % 8 == 0, got {q.dtype}, D={d}, N={n}")
    if block_k not in (64, 128):
        raise ValueError(f"block_k must be 64 or 128, got {block_k}")
    if lut.ndim != 4 or lut.shape[:3] != (b, h, nq) or lut.dtype != jnp.int32:
        raise ValueError(f"lut must be int32 (B, H, ceil(N / {_BLOCK_Q}), topk), got {lut.shape} {lut.dtype}")
    for name, x in (("lse", lse), ("delta", delta)):
        if x.shape != (b, h, nq * _BLOCK_Q) or x.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 (B, H, Nq * {_BLOCK_Q}), got {x.shape} {x.dtype}")
    if alpha is not None and (alpha.shape != (b, h, nq) or alpha.dtype != jnp.float32):
        raise ValueError(f"alpha must be None or float32 (B, H, Nq), got {alpha.shape} {alpha.dtype}")


def _dq_call(q, k, v, do, lse, delta, lut, alpha, dq_phi, *, block_k, sm_scale, stages, profile_dir, phi):
    """The kernel launch (inputs already checked); returns dq (B, N, H, D) q.dtype. With dq_phi: dphi(Q) is
    loaded into the dO tile after the last dP has read it, and phi's vjp is added in the epilogue."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    b, n, h, d = q.shape
    topk = lut.shape[3]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    scale = sm_scale * LOG2E
    stages = max(1, min(stages, topk))
    ragged = n % block_k != 0
    dtype = q.dtype
    has_alpha = alpha is not None
    has_phi = dq_phi is not None
    inputs = [q, k, v, do, lut, lse, delta] + ([alpha] if has_alpha else []) + ([dq_phi] if has_phi else [])
    tile = (_ROWS, block_k)

    def body(refs, smem, ready, released):
        q_ref, k_ref, v_ref, do_ref, lut_ref, lse_ref, delta_ref = refs[:7]
        alpha_ref = refs[7] if has_alpha else None
        dq_phi_ref = refs[7 + has_alpha] if has_phi else None
        dq_ref = refs[len(inputs)]
        bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("qblock")
        wg = lax.axis_index("wg")
        q_smem, do_smem, k_smem, v_smem, row_smem = smem
        tile_ready, row_ready, k_ready, v_ready = ready[:4]
        phi_ready = ready[4] if has_phi else None
        k_free, v_free = released

        def wait_kv(slot):
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

        @pl.when(wg < 2)
        def _compute():
            with jax.named_scope("c_setmaxnreg"):
                plgpu.set_max_registers(232, action="increase")
            rows = lambda: pl.ds(qi * _BLOCK_Q + wg * _ROWS, _ROWS)  # this warpgroup's 64 query rows
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]

            with jax.named_scope("c_issue_q"):  # TMA of this warpgroup's Q, dO tiles and lse, delta rows
                plgpu.copy_gmem_to_smem(q_ref.at[bi, rows(), hi], my_q, tile_ready.at[wg])
                plgpu.copy_gmem_to_smem(do_ref.at[bi, rows(), hi], my_do, tile_ready.at[2 + wg])
                for r, ref in enumerate((lse_ref, delta_ref)):
                    plgpu.copy_gmem_to_smem(ref.at[bi, hi, rows()], row_smem.at[r, wg], row_ready.at[2 * r + wg])
            with jax.named_scope("c_wait_kv0"):
                wait_kv(0)

            def row_b(x):
                return lax.broadcast_in_dim(x, tile, [0])

            key0_last = lut_ref[bi, hi, qi, topk - 1] * block_k  # read early: GMEM latency
            with jax.named_scope("c_wait_q"):
                plgpu.barrier_wait(tile_ready.at[wg])
                plgpu.barrier_wait(tile_ready.at[2 + wg])
                row_vals = []
                for r in range(2):
                    plgpu.barrier_wait(row_ready.at[2 * r + wg])
                    row_vals.append(plgpu.load(row_smem.at[r, wg], (), layout=plgpu.Layout.WGMMA.reduce(1)))
            lse_r, delta_r = row_vals
            a = alpha_ref[bi, hi, qi] if has_alpha else None
            acc = plgpu.layout_cast(jnp.full((_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def step(t, acc, last=False):  # t: the LUT entry
                slot = lax.rem(t, stages)

                def scores(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, my_do, v_smem.at[slot].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32), plgpu.ACC(tile, jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                if last and has_phi:  # the dO tile is read for the last time: it takes dphi(Q)'s rows
                    plgpu.copy_gmem_to_smem(dq_phi_ref.at[bi, rows(), hi], my_do, phi_ready.at[wg])
                if last and ragged:  # keys >= N exist only in the last key block: the LUT's last entry
                    keys = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(keys + key0_last < n, s, -jnp.inf)
                p = jnp.exp2(s * scale - row_b(lse_r))
                if a is not None:
                    dp = dp * a
                ds16 = (p * (dp - row_b(delta_r))).astype(dtype)

                def grads(acc_ref):
                    plgpu.wgmma(acc_ref, ds16, k_smem.at[slot])
                    nxt = t + 1

                    @pl.when(nxt < topk)
                    def _():
                        wait_kv(lax.rem(nxt, stages))

                acc = pl.run_state(grads)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(k_free.at[slot])
                return acc

            with jax.named_scope("c_loop"):
                acc = lax.fori_loop(0, topk - 1, step, acc)
                last = functools.partial(step, last=True)  # a loop of one step: Mosaic wants a traced index
                acc = lax.fori_loop(topk - 1, topk, last, acc)
            dq = acc * sm_scale
            if has_phi:
                with jax.named_scope("c_phi_vjp"):  # + phi's vjp at this warpgroup's Q rows (float32)
                    plgpu.barrier_wait(phi_ready.at[wg])
                    load = functools.partial(plgpu.load, idx=(), layout=plgpu.Layout.WGMMA)
                    dq = dq + written_phi_vjp(phi)(load(my_q).astype(jnp.float32), load(my_do).astype(jnp.float32))
            with jax.named_scope("c_store"):  # the Q tile, read by the last wgmma, holds dQ
                my_q[...] = dq.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_q, dq_ref.at[bi, rows(), hi])
            with jax.named_scope("c_drain"):  # the store completes before the program ends
                plgpu.wait_smem_to_gmem(0, wait_read_only=False)

        @pl.when(wg == 2)
        def _memory():
            with jax.named_scope("m_setmaxnreg"):
                plgpu.set_max_registers(40, action="decrease")

            def fetch(t, slot):  # K, V of the LUT entry t (its key block: a scalar GMEM read) into ring slot
                keys = pl.ds(lut_ref[bi, hi, qi, t] * block_k, block_k)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hi], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hi], v_smem.at[slot], v_ready.at[slot])

            with jax.named_scope("m_prime"):
                for t in range(stages):
                    fetch(t, t)

            with jax.named_scope("m_refill"):

                @pl.loop(stages, topk)
                def _refill(t):
                    slot = lax.rem(t, stages)
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    fetch(t, slot)

    def entry(*refs):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, _ROWS, d), dtype, transforms=tiles),  # Q per compute warpgroup, then its dQ
            plgpu.SMEM((2, _ROWS, d), dtype, transforms=tiles),  # dO
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),  # K ring
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),  # V ring
            plgpu.SMEM((2, 2, _ROWS), jnp.float32),  # lse, delta rows per compute warpgroup
        )
        ready = (
            plgpu.Barrier(num_barriers=4),  # Q of warpgroup 0, 1, then dO of warpgroup 0, 1
            plgpu.Barrier(num_barriers=4),  # row vector r (lse, delta) of warpgroup wg: 2 * r + wg
            plgpu.Barrier(num_barriers=stages),  # K slot loaded
            plgpu.Barrier(num_barriers=stages),  # V slot loaded
        ) + ((plgpu.Barrier(num_barriers=2),) if has_phi else ())  # dphi(Q) rows of warpgroup 0, 1 loaded
        released = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2  # K, V slot read by both warpgroups
        pl.run_scoped(lambda *scratch: body(refs, *scratch), smem, ready, released, collective_axes="wg")

    profile = {"profile_space": _PROFILE_REGIONS, "profile_dir": profile_dir} if profile_dir else {}
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(h, lut.shape[2], b),
        grid_names=("heads", "qblock", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
    )(*inputs)
