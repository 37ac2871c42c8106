"""The dQ kernel on Hopper: block-sparse softmax attention's dQ in Mosaic GPU (GPU only, no interpret mode).

The sparse loop of the Triton ``dq_kernel`` (triton_backward.py; fused case, without the linear-branch terms),
written as a warp-specialised Mosaic GPU kernel on the skeleton of the forward (mosaic_forward.py).

Grid (H, Nq, B), three warpgroups per program (query block i of 128 rows):
  * warpgroups 0 and 1 (compute): 64 query rows each; Q, dO, LSE and delta tiles loaded once by TMA; per LUT
    entry t (key block j = lut[b, h, i, t]): S = Q K_j^T and dP = dO V_j^T (two wgmma, one wait), in registers
    P = exp2(S * sm_scale * log2(e) - LSE), dS = P * (a_i dP - delta), then dQ_acc += dS K_j (wgmma with dS as
    the register operand). The two warpgroups run freely; the private ``pingpong`` variant (FlashAttention-3
    turns on the tensor cores, as the forward) measured 15-25% slower: dS has no row reductions to hide.
  * warpgroup 2 (memory): TMA copies of K_j, V_j into a ring of ``stages`` slots; V_j's slot is released once
    both warpgroups read dP, K_j's once both finished dS K_j.
dQ = sm_scale * dQ_acc in q's dtype. Keys >= N (only in the LUT's last entry: it is ascending) are masked; rows
>= N are neither read (TMA fills zeros) nor written (TMA stores are clipped).
Flop per program 6 * 128 * block_k * D * topk; bytes per LUT entry 2 * block_k * D * itemsize (mostly from L2).

Checked on the GPU only (experiments/dev/probe_mosaic_dq.py against a dense float32 reference and the Triton dq
kernel); Mosaic GPU kernels have no CPU interpret mode. Timings and variants: docs/dev/backward_kernels.md
(wan-1.3b at 95%, H100: 0.92 ms with 2 stages, 0.88 ms with 4, vs 1.83 ms for the Triton dq call).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_LOG2E = math.log2(math.e)
_ROWS = 64  # query rows per compute warpgroup (one wgmma M tile)
_BLOCK_Q = 2 * _ROWS  # a query block (one LUT row) is two warpgroups' rows
_PROFILE_REGIONS = 16  # named regions a warpgroup may record when the on-device profiler is on


def sparse_attention_dq_mosaic(
    q,
    k,
    v,
    do,
    lse,
    delta,
    lut,
    alpha=None,
    *,
    block_k: int = 64,
    sm_scale: float | None = None,
    stages: int = 2,
):
    """dQ of the sparse branch over the LUT's key blocks.

    q, k, v, do: (B, N, H, D) bf16/f16 (one dtype), N % 8 == 0, D in {64, 128}; lse, delta: (B, H, Nq * 128)
    float32 (lse base 2 of the logits scaled by sm_scale * log2(e), delta = a * rowsum(dO * O_s)); lut:
    (B, H, Nq, topk) int32 ascending key-block ids (blocks of block_k keys), Nq = ceil(N / 128); alpha: None or
    (B, H, Nq) float32. Returns dq (B, N, H, D) in q.dtype. ValueError for unsupported input.
    """
    _check_inputs(q, k, v, do, lse, delta, lut, alpha, block_k)
    return _dq_call(
        q,
        k,
        v,
        do,
        lse,
        delta,
        lut,
        alpha,
        block_k=block_k,
        sm_scale=sm_scale,
        stages=stages,
    )


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


def _dq_call(
    q,
    k,
    v,
    do,
    lse,
    delta,
    lut,
    alpha,
    *,
    block_k,
    sm_scale,
    stages,
    pingpong=False,
    alpha_rows=False,
    blocks=1,
    prefetch=False,
    grid_order="heads",
    drain_read_only=False,
    lut_early=False,
    profile_dir=None,
):
    """The kernel launch (inputs already checked); returns dq (B, N, H, D) q.dtype. Variants for the probe:
    ``pingpong`` (the two compute warpgroups take turns on the tensor cores), ``alpha_rows`` (alpha read as a
    per-row vector by TMA instead of a scalar from GMEM), ``blocks`` (query blocks per program, Nq % blocks == 0:
    the K/V ring runs on across them and the next block's Q, dO load during the current block's last step, or with
    ``prefetch`` into a second buffer at the current block's start), ``grid_order`` "heads" (grid (H, Nq, B): the
    programs in flight together are all heads of a few query blocks) or "qblocks" (grid (Nq, H, B): consecutive query
    blocks of one head, so the K/V blocks they gather are one head's and stay in L2), ``drain_read_only`` (the
    program ends once its dQ stores have READ shared memory, not once their writes landed), ``lut_early`` (the memory
    warpgroup reads the first ``stages`` LUT entries before issuing any copy, and each later one before waiting for
    its slot, instead of one dependent read per copy) and ``profile_dir``
    (Mosaic's on-device profiler: per-warpgroup timestamps of the named regions, a trace written there)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    b, n, h, d = q.shape
    nq, topk = lut.shape[2], lut.shape[3]
    if nq % blocks:
        raise ValueError(f"blocks={blocks} must divide Nq={nq}")
    total = blocks * topk  # LUT entries streamed by one program
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    scale = sm_scale * _LOG2E
    stages = max(1, min(stages, total))
    ragged = n % block_k != 0
    dtype = q.dtype
    has_alpha = alpha is not None
    row_inputs = 3 if has_alpha and alpha_rows else 2  # lse, delta (, alpha per row) TMA-loaded per warpgroup
    inputs = [q, k, v, do, lut, lse, delta]
    if has_alpha:
        inputs.append(jnp.repeat(alpha, _BLOCK_Q, axis=-1) if alpha_rows else alpha)
    tile = (_ROWS, block_k)
    prefetch = prefetch and blocks > 1
    nbuf = 2 if prefetch else 1  # buffers of the Q, dO and row tiles

    def body(refs, smem, ready, released, turn):
        q_ref, k_ref, v_ref, do_ref, lut_ref, *row_refs = refs[: len(inputs)]
        dq_ref = refs[len(inputs)]
        alpha_ref = row_refs.pop() if has_alpha and not alpha_rows else None
        bi, hi, qi0 = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("qblock") * blocks
        wg = lax.axis_index("wg")
        q_smem, do_smem, k_smem, v_smem, row_smem, *dq_smem = smem
        tile_ready, row_ready, k_ready, v_ready = ready
        k_free, v_free = released

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def wait_kv(slot):
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

        @pl.when(wg < 2)
        def _compute():
            with jax.named_scope("c_setmaxnreg"):
                plgpu.set_max_registers(232, action="increase")
            window = lambda g: (bi, pl.ds((qi0 + g) * _BLOCK_Q + wg * _ROWS, _ROWS), hi)

            def load_block(g):  # TMA of query block qi0 + g's tiles of this warpgroup into buffer g % nbuf
                buf = g % nbuf
                plgpu.copy_gmem_to_smem(q_ref.at[window(g)], q_smem.at[buf, wg], tile_ready.at[4 * buf + wg])
                plgpu.copy_gmem_to_smem(do_ref.at[window(g)], do_smem.at[buf, wg], tile_ready.at[4 * buf + 2 + wg])
                for r, ref in enumerate(row_refs):
                    src = ref.at[bi, hi, pl.ds((qi0 + g) * _BLOCK_Q + wg * _ROWS, _ROWS)]
                    j = buf * row_inputs + r
                    plgpu.copy_gmem_to_smem(src, row_smem.at[j, wg], row_ready.at[2 * j + wg])

            def row_b(x):
                return lax.broadcast_in_dim(x, tile, [0])

            def block(g):
                buf = g % nbuf
                my_q, my_do = q_smem.at[buf, wg], do_smem.at[buf, wg]
                if prefetch and g + 1 < blocks:  # the other buffer: free once block g - 1's dQ store read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    load_block(g + 1)
                key0_last = lut_ref[bi, hi, qi0 + g, topk - 1] * block_k  # read early: GMEM latency
                with jax.named_scope("c_wait_q"):
                    plgpu.barrier_wait(tile_ready.at[4 * buf + wg])
                    plgpu.barrier_wait(tile_ready.at[4 * buf + 2 + wg])
                    row_vals = []
                    for r in range(row_inputs):
                        j = buf * row_inputs + r
                        plgpu.barrier_wait(row_ready.at[2 * j + wg])
                        row_vals.append(plgpu.load(row_smem.at[j, wg], layout=plgpu.Layout.WGMMA.reduce(1)))
                lse_r, delta_r = row_vals[0], row_vals[1]
                a = None
                if has_alpha:
                    a = row_b(row_vals[2]) if alpha_rows else alpha_ref[bi, hi, qi0 + g]
                acc = plgpu.layout_cast(jnp.full((_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                if pingpong:
                    pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first

                def step(e, acc, last=False):  # e: the program's LUT entry (g * topk + t)
                    slot = lax.rem(e, stages)

                    def scores(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(dp_ref, my_do, v_smem.at[slot].transpose((1, 0)))
                        if pingpong:
                            take_turn()
                        return s_ref[...], dp_ref[...]

                    s, dp = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32), plgpu.ACC(tile, jnp.float32))
                    plgpu.barrier_arrive(v_free.at[slot])
                    if last and not prefetch and g + 1 < blocks:  # Q, dO of this block are read: fetch the next
                        load_block(g + 1)
                    if last and ragged:  # keys >= N exist only in the last key block: the LUT's last entry
                        keys = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
                        s = jnp.where(keys + key0_last < n, s, -jnp.inf)
                    p = jnp.exp2(s * scale - row_b(lse_r))
                    if a is not None:
                        dp = dp * a
                    ds16 = (p * (dp - row_b(delta_r))).astype(dtype)
                    if pingpong:
                        ds16 = lax.optimization_barrier(ds16)
                        plgpu.barrier_arrive(turn)  # dS done: the other warpgroup may use the tensor cores
                        plgpu.barrier_wait(turn)

                    def grads(acc_ref):
                        plgpu.wgmma(acc_ref, ds16, k_smem.at[slot])
                        nxt = e + 1

                        @pl.when(nxt < total)
                        def _():
                            wait_kv(lax.rem(nxt, stages))

                    acc = pl.run_state(grads)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return acc

                e0 = g * topk
                with jax.named_scope("c_loop"):
                    acc = lax.fori_loop(e0, e0 + topk - 1, step, acc)
                    last = functools.partial(step, last=True)  # a loop of one step: Mosaic wants a traced index
                    acc = lax.fori_loop(e0 + topk - 1, e0 + topk, last, acc)
                if pingpong:
                    pl.when(wg == 0)(take_turn)
                if dq_smem:  # a separate dQ buffer (the next block's Q is loading): the previous store read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out = dq_smem[0].at[wg] if dq_smem else my_q  # else this block's Q tile holds its dQ
                with jax.named_scope("c_store"):
                    out[...] = (acc * sm_scale).astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out, dq_ref.at[window(g)])

            with jax.named_scope("c_issue_q"):
                load_block(0)
            with jax.named_scope("c_wait_kv0"):
                wait_kv(0)
            for g in range(blocks):
                block(g)
            with jax.named_scope("c_drain"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=drain_read_only)

        @pl.when(wg == 2)
        def _memory():
            with jax.named_scope("m_setmaxnreg"):
                plgpu.set_max_registers(40, action="decrease")

            def key_block(e):  # the program's LUT entry e (a scalar GMEM read)
                g = lax.div(e, jnp.int32(topk))
                return lut_ref[bi, hi, qi0 + g, e - g * topk]

            def fetch(kb, slot):
                keys = pl.ds(kb * block_k, block_k)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hi], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hi], v_smem.at[slot], v_ready.at[slot])

            with jax.named_scope("m_prime"):
                if lut_early:  # all reads in flight together, before the first copy is issued
                    kbs = [key_block(jnp.int32(e)) for e in range(stages)]
                    for e in range(stages):
                        fetch(kbs[e], e)
                else:
                    for e in range(stages):
                        fetch(key_block(jnp.int32(e)), e)

            with jax.named_scope("m_refill"):

                @pl.loop(stages, total)
                def _refill(e):
                    slot = lax.rem(e, stages)
                    kb = key_block(e) if lut_early else None  # read while the slot drains
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    fetch(key_block(e) if kb is None else kb, slot)

    def entry(*refs):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((nbuf, 2, _ROWS, d), dtype, transforms=tiles),  # Q per buffer and compute warpgroup
            plgpu.SMEM((nbuf, 2, _ROWS, d), dtype, transforms=tiles),  # dO
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),  # K ring
            plgpu.SMEM((stages, block_k, d), dtype, transforms=tiles),  # V ring
            plgpu.SMEM((nbuf * row_inputs, 2, _ROWS), jnp.float32),  # lse, delta (, alpha) rows per buffer
        ]
        if blocks > 1 and not prefetch:
            smem.append(plgpu.SMEM((2, _ROWS, d), dtype, transforms=tiles))  # dQ out, while the next Q loads
        ready = (
            plgpu.Barrier(num_barriers=4 * nbuf),  # buffer b: Q of warpgroup 0, 1, then dO of warpgroup 0, 1
            plgpu.Barrier(num_barriers=2 * nbuf * row_inputs),  # row vector j of warpgroup wg: 2 * j + wg
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        )
        released = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        scoped = lambda *scratch: body(refs, *scratch)
        turn = plgpu.Barrier(num_arrivals=2)
        pl.run_scoped(scoped, tuple(smem), ready, released, turn, collective_axes="wg")

    if grid_order not in ("heads", "qblocks"):
        raise ValueError(f"grid_order must be 'heads' or 'qblocks', got {grid_order!r}")
    grid, names = (h, nq // blocks, b), ("heads", "qblock", "batch")
    if grid_order == "qblocks":
        grid, names = (nq // blocks, h, b), ("qblock", "heads", "batch")
    profile = {"profile_space": _PROFILE_REGIONS, "profile_dir": profile_dir} if profile_dir else {}
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=grid,
        grid_names=names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
    )(*inputs)
