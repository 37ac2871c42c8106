"""EXPERIMENTAL: block-sparse softmax attention forward on Hopper with Pallas Mosaic GPU (GPU only, no interpret).

Why: the Triton-backend forward (sparse_linear.py) runs its 64-key LUT loop at ~300 TFLOP/s; Triton cannot
specialise warps, so the tensor cores wait while the same warps do the softmax. Mosaic GPU can: this kernel
follows the warp-specialised "ping-pong" scheme of FlashAttention-3 (as jax's dense Mosaic GPU attention does),
with the key/value tiles fetched by TMA from the LUT's key blocks instead of in sequence.

Grid (H, Nq, B), three warpgroups per program (query block i of 128 rows):
  * warpgroups 0 and 1 (compute): 64 query rows each; per LUT entry t: S = Q K_j^T (wgmma), online softmax in
    base 2, acc += P V_j (wgmma). A shared barrier makes the two take turns on the tensor cores, so one's
    softmax overlaps the other's matmuls.
  * warpgroup 2 (memory): TMA copies of K_j, V_j for j = lut[b, h, i, t] into a ring of ``stages`` slots, each
    refilled as soon as both compute warpgroups released it.
Outputs o_s (B, N, H, D) in q's dtype and lse (B, H, Nq * 128) float32, base 2 of the logits scaled by
sm_scale * log2(e): the layout and convention of sparse_linear's forward, so its backward kernels can consume them.
Keys >= N (the ragged last key block, only ever the LUT's last entry: it is ascending) are masked; rows >= N are neither read (TMA fills zeros) nor written.
Flop per program 4 * 128 * block_k * D * topk; bytes per LUT entry 2 * block_k * D * itemsize (from L2 mostly).

Used by sparse_linear._forward on Hopper GPUs (OPTIONS["fwd_kernel"] "auto" / "mosaic"; docs/perf_notes.md,
"Session 3"). Checked on the GPU only (experiments/probe_mosaic_sparse.py, experiments/check_kernels_gpu.py): Mosaic
GPU kernels have no CPU interpret mode; the CPU tests cover the wiring around it with a stand-in.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_LOG2E = math.log2(math.e)
_ROWS = 64  # query rows per compute warpgroup (one wgmma M tile); a query block is 2 x 64 rows


def sparse_attention_mosaic(q, k, v, lut, *, block_k: int = 64, sm_scale: float | None = None, stages: int = 2):
    """Sparse branch of SLA over the LUT's key blocks: q, k, v (B, N, H, D) bf16/f16, N % 8 == 0, D % 64 == 0;
    lut (B, H, Nq, topk) int32 with Nq = ceil(N / 128) -> (o_s (B, N, H, D) q.dtype, lse (B, H, Nq * 128) f32)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    b, n, h, d = q.shape
    nq, topk = lut.shape[2], lut.shape[3]
    block_q = 2 * _ROWS
    if nq != -(-n // block_q) or lut.shape[:2] != (b, h):
        raise ValueError(f"lut shape {lut.shape} must be (B, H, ceil(N / {block_q}), topk) for q shape {q.shape}")
    if d % 64 or n % 8 or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"need N a multiple of 8, D of 64 and bf16/f16 inputs, got N={n}, D={d}, {q.dtype}")
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * _LOG2E
    stages = max(1, min(stages, topk))
    ragged = n % block_k != 0
    dtype = q.dtype

    def body(q_ref, k_ref, v_ref, lut_ref, o_ref, lse_ref, smem, ready, released, turn):
        bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("qblock")
        wg = lax.axis_index("wg")
        q_smem, k_smem, v_smem, lse_smem = smem
        k_ready, v_ready, q_ready = ready
        k_free, v_free = released

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            row0 = qi * block_q + wg * _ROWS
            my_q = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, _ROWS), hi], my_q, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            rows = plgpu.Layout.WGMMA.reduce(1)
            m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), rows)
            l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0.0, jnp.float32), rows)
            acc = plgpu.layout_cast(jnp.full((_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first

            def step(t, carry, masked=False):
                acc, m_i, l_i = carry
                slot = lax.rem(t, stages)

                def scores(s_ref):
                    plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((_ROWS, block_k), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:  # keys >= N exist only in the last key block: the LUT's last entry (ascending)
                    key0 = lut_ref[bi, hi, qi, t] * block_k
                    keys = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(keys + key0 < n, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
                correction = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
                l_i = l_i * correction + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may use the tensor cores
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = t + 1

                    @pl.when(nxt < topk)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, stages)])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, topk - 1, step, (acc, m_i, l_i))
            last = functools.partial(step, masked=ragged)  # a loop of one step: Mosaic wants a traced index
            acc, m_i, l_i = lax.fori_loop(topk - 1, topk, last, (acc, m_i, l_i))
            pl.when(wg == 0)(take_turn)
            acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            my_q[...] = acc.astype(dtype)  # the Q tile's slot holds the output tile
            lse_smem.at[wg][...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[bi, pl.ds(row0, _ROWS), hi])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(row0, _ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(t, slot):
                rows = pl.ds(lut_ref[bi, hi, qi, t] * block_k, block_k)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_ready.at[slot])

            for t in range(stages):
                fetch(t, t)

            @pl.loop(stages, topk)
            def _refill(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                fetch(t, slot)

    def entry(q_ref, k_ref, v_ref, lut_ref, o_ref, lse_ref):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, _ROWS, d), dtype, transforms=tiles),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),
            plgpu.SMEM((2, _ROWS), jnp.float32),
        )
        ready = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
        )
        released = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, lut_ref, o_ref, lse_ref, *scoped),
            smem,
            ready,
            released,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, h, nq * block_q), jnp.float32))
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(h, nq, b),
        grid_names=("heads", "qblock", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, lut)
