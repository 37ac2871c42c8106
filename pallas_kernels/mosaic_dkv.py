"""The dK/dV kernel on Hopper: block-sparse softmax attention's dK, dV in Mosaic GPU (GPU only, no interpret mode).

The sparse loop of the Triton ``dkv_kernel`` (triton_backward.py; fused case, no linear-branch terms) as a
warp-specialised kernel.
Work item = (batch, head, key block j of 64 keys); one program per item, or (``persistent``) one program per SM
walking items p, p + P, ... Three warpgroups per program:
  * warpgroups 0 and 1 (compute): for every query block i that selected j (the transposed LUT's row, ascending),
    warpgroup w takes the 64 query rows i * 128 + w * 64 ... + 63. Keys as rows, so no computed tile is transposed:
      S^T = K Q_w^T, P^T = exp2(S^T * scale - lse), dv += (a_i P^T) dO_w, dP^T = V dO_w^T,
      dS^T = P^T (a_i dP^T - delta), dk += dS^T Q_w
    (five wgmma per step: M = 64 keys, N = 64 rows or D, K = D or 64 rows). Each warpgroup holds its own dk, dv
    (64 x D float32); at the end the two halves are summed through shared memory and stored by TMA.
  * warpgroup 2 (memory): TMA copies of K_j, V_j and of Q, dO (64 x D), lse, delta (64) of each half query block
    into a ring of ``stages`` slots per compute warpgroup, each refilled as soon as its warpgroup released it; the
    ring runs on across items, so the next item's first loads overlap this item's epilogue.
Trip count count[b, h, j] (dynamic); query rows >= N (only in the last query block, which the ascending list puts
last) are masked on that entry alone, so a garbage lse / delta there cannot make NaN.
Flop per item 8 * 128 * 64 * D * count; bytes per step 4 * 128 * D (Q, dO; mostly from L2).
Checked on the GPU only (experiments/dev/probe_mosaic_dkv.py); timings and variants: docs/dev/backward_kernels.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_LOG2E = math.log2(math.e)
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


def _num_sms() -> int:
    """Streaming multiprocessors of the first device (132 on H100 SXM if unknown)."""
    try:
        return int(jax.devices()[0].core_count)
    except Exception:  # noqa: BLE001 - attribute missing on some backends
        return 132


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


class _Variant(NamedTuple):
    """Static choices of one kernel build (see sparse_attention_dkv_mosaic)."""

    stages: int
    exchange: str  # "pair" | "serial"
    schedule: str  # "three_groups" | "early_dp"
    exchange_tiled: bool
    persistent: bool
    staging: str  # "kv" | "union"
    programs: int | None  # persistent programs (None: one per SM)
    grid_order: str = "heads"  # "heads" (grid (H, Nk, B)) | "kblocks" (grid (Nk, H, B))
    drain_read_only: bool = False  # end once the dk / dv stores read shared memory (not once their writes landed)
    profile_dir: str | None = None  # Mosaic's on-device profiler (named regions per warpgroup) writes a trace here


def sparse_attention_dkv_mosaic(
    q, k, v, do, lse, delta, lut_t, count, alpha=None, *, block_k=64, sm_scale=None, stages=2, exchange=None,
    schedule="early_dp", exchange_tiled=True, persistent=False, staging="kv", programs=None, grid_order="heads",
    drain_read_only=False, profile_dir=None
):  # fmt: skip
    """dK, dV of the sparse branch over the transposed LUT.

    q, k, v, do: (B, N, H, D) bf16/f16, N % 8 == 0, D in {64, 128}; lse, delta: (B, H, Nq * 128) float32 (lse in
    base 2 of the logits scaled by sm_scale * log2(e), delta = a_i * rowsum(dO * o_s)); lut_t: (B, H, Nk, Nq)
    int32, the query blocks that selected key block j ascending (padding after count[b, h, j] entries is not read);
    count: (B, H, Nk) int32; alpha: None or (B, H, Nq) float32. Returns dk, dv (B, N, H, D) in k.dtype.
    Variants (for the GPU probe): ``exchange`` None (automatic), "pair" or "serial" (how the two warpgroups' partial
    sums are combined), ``exchange_tiled`` (swizzled float32 exchange buffer, else plain), ``schedule``
    "three_groups" (S^T | dV, dP^T | dK) or "early_dp" (S^T, dP^T | dV, dK), ``persistent`` (one program per SM
    walking key blocks, the next block's loads overlapping this one's epilogue, else one program per key block),
    ``staging`` "kv" (outputs staged in the K, V tiles) or "union" (in tiles aliased with the exchange buffer,
    serial exchange only, so K, V of the next key block load during the epilogue), ``programs`` (persistent
    programs, default one per SM; small values exercise the multi-block walk in tests), ``grid_order`` "heads" (grid
    (H, Nk, B): the programs in flight are all heads of a few key blocks) or "kblocks" (grid (Nk, H, B): consecutive
    key blocks of one head, whose gathered Q / dO blocks are one head's and stay in L2), ``drain_read_only`` (a
    program ends once its stores read shared memory) and ``profile_dir`` (Mosaic's on-device profiler: timestamps of
    the named regions per warpgroup, a trace written there).
    """
    if schedule not in ("three_groups", "early_dp") or exchange not in (None, "pair", "serial"):
        raise ValueError(f"unknown schedule {schedule!r} or exchange {exchange!r}")
    if staging not in ("kv", "union") or grid_order not in ("heads", "kblocks"):
        raise ValueError(f"unknown staging {staging!r} or grid_order {grid_order!r}")
    _check_inputs(q, k, v, do, lse, delta, lut_t, count, alpha, block_k)
    d = q.shape[-1]
    exchange = "serial" if staging == "union" else exchange or _exchange_mode(d, q.dtype.itemsize, stages)
    variant = _Variant(
        stages,
        exchange,
        schedule,
        exchange_tiled,
        persistent,
        staging,
        programs,
        grid_order,
        drain_read_only,
        profile_dir,
    )
    kernel = _build(q.shape, q.dtype, sm_scale, variant, alpha is not None, _num_sms())
    args = (q, k, v, do, lse, delta, lut_t, count) + ((alpha,) if alpha is not None else ())
    return kernel(*args)


@functools.cache
def _build(shape, dtype, sm_scale, variant: _Variant, has_alpha, num_sms):
    """The plgpu.kernel callable for one static configuration."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    b, n, h, d = shape
    nk = -(-n // _KEYS)
    items = b * h * nk  # (batch, head, key block), heads fastest as in a (H, Nk, B) grid
    programs = min(variant.programs or num_sms, items) if variant.persistent else items
    stages, exchange, union = variant.stages, variant.exchange, variant.staging == "union"
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    scale = sm_scale * _LOG2E
    ragged_q = n % _BLOCK_Q != 0
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    cols = plgpu.Layout.WGMMA.reduce(0)  # a vector along the query rows (the columns of S^T)

    persistent = variant.persistent

    def item_ids(it):
        """(batch, head, key block) of this program's it-th work item (grid axes when one item per program)."""
        if not persistent:
            return lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kblock")
        e = lax.axis_index("prog") + it * programs
        return lax.div(e, h * nk), lax.rem(e, h), lax.rem(lax.div(e, h), nk)

    def for_each_item(item):
        """item(it, g0) -> g0 + count for each work item of this program (g0: ring steps before it)."""
        if not persistent:  # straight-line code: no loop state to keep live through the step loop
            item(0, 0)
            return
        my_items = lax.div(items - lax.axis_index("prog") + programs - 1, programs)
        lax.fori_loop(0, my_items, item, jnp.int32(0))

    def compute(refs, smem, bars, wg):
        k_ref, v_ref, lut_ref, count_ref, alpha_ref, dk_ref, dv_ref = refs
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, red_smem, out_smem = smem
        q_ready, do_ready, lse_ready, delta_ready, free, kv_ready, kv_free, red_full, red_empty, out_free = bars
        with jax.named_scope("c_setmaxnreg"):
            plgpu.set_max_registers(232, action="increase")
        if not persistent:
            with jax.named_scope("c_issue_kv"):
                pl.when(wg == 0)(lambda: load_kv(k_ref, v_ref, k_smem, v_smem, kv_ready, item_ids(0)))
        zeros = plgpu.layout_cast(jnp.full((_KEYS, d), 0.0, f32), wgmma_layout)

        def item(it, g0):
            bi, hi, j = item_ids(it)
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

            def step_three_groups(t, carry, masked=False):
                """One half query block (64 rows): three wgmma groups (S^T | dV, dP^T | dK)."""
                dk, dv = carry
                slot = lax.rem(g0 + t, stages) * 2 + wg
                qi = lut_ref[bi, hi, j, t]
                q_w, do_w = q_smem.at[slot], do_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_w, (1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores, plgpu.ACC((_KEYS, _ROWS), f32))
                p_t, valid = probs(s_t, slot, qi, masked)
                a = alpha_ref[bi, hi, qi] if has_alpha else None
                w_t = p_t * a if has_alpha else p_t
                plgpu.barrier_wait(do_ready.at[slot])

                def dv_and_dp(acc_refs):
                    dv_acc, dp_acc = acc_refs
                    plgpu.wgmma(dv_acc, w_t.astype(dtype), do_w)
                    plgpu.wgmma(dp_acc, v_smem, plgpu.transpose_ref(do_w, (1, 0)))

                dp0 = plgpu.layout_cast(jnp.full((_KEYS, _ROWS), 0.0, f32), wgmma_layout)
                dv, dp_t = pl.run_state(dv_and_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(dp0)))
                ds_t = score_grads(p_t, dp_t, slot, a, valid)

                def dk_step(acc_ref):
                    plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_w)

                dk = pl.run_state(dk_step)(plgpu.ACC.init(dk))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            def step_early_dp(t, carry, masked=False):
                """The same with two wgmma groups (S^T, dP^T | dV, dK): fewer waits, more registers live."""
                dk, dv = carry
                slot = lax.rem(g0 + t, stages) * 2 + wg
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

            step = step_early_dp if variant.schedule == "early_dp" else step_three_groups
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
            if union:  # K, V are no longer read: the next key block's may load during the epilogue
                plgpu.barrier_arrive(kv_free)
            dk, dv = carry
            outs = ((out_smem[0], dk_ref), (out_smem[1], dv_ref)) if union else ((k_smem, dk_ref), (v_smem, dv_ref))
            with jax.named_scope("c_finish"):
                finish(dk * sm_scale, dv, wg, it, (bi, hi, j), outs, red_smem, (red_full, red_empty, kv_free, out_free))
            return g0 + cnt

        for_each_item(item)
        with jax.named_scope("c_drain"):  # the last stores complete (or read shared memory) before the program ends
            plgpu.wait_smem_to_gmem(0, wait_read_only=variant.drain_read_only)

    def finish(dk, dv, wg, it, ids, outs, red_smem, bars):
        """Sums the two warpgroups' partial dk, dv through shared memory and stores them (TMA)."""
        red_full, red_empty, kv_free, out_free = bars
        bi, hi, j = ids
        keys = pl.ds(j * _KEYS, _KEYS)
        (dk_tile, dk_ref), (dv_tile, dv_ref) = outs
        load = functools.partial(plgpu.load, idx=(), layout=wgmma_layout, optimized=variant.exchange_tiled)

        def store(x, tile, out_ref):
            with jax.named_scope("c_store"):
                tile[...] = x.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(tile, out_ref.at[bi, keys, hi])

        def stores_done():
            """The output tiles are read by TMA: the K, V tiles (or the union) may be overwritten."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(out_free if union else kv_free)

        if exchange == "pair":  # warpgroup 0 finishes dk, warpgroup 1 dv (staging "kv" only)

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
                store(dk + load(red_smem.at[1]), dk_tile, dk_ref)
                stores_done()

            @pl.when(wg == 1)
            def _():
                store(dv + load(red_smem.at[0]), dv_tile, dv_ref)
                stores_done()
        else:  # one buffer: warpgroup 1 hands over dk, then dv; warpgroup 0 finishes both

            @pl.when(wg == 1)
            def _():
                if union and persistent:  # the buffer doubles as the previous key block's output tiles
                    pl.when(it > 0)(lambda: plgpu.barrier_wait(out_free))
                red_smem.at[0][...] = dk
                plgpu.barrier_arrive(red_full)
                plgpu.barrier_wait(red_empty)
                red_smem.at[0][...] = dv
                plgpu.barrier_arrive(red_full)
                if not union:
                    plgpu.barrier_arrive(kv_free)

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(red_full)
                dk_total = dk + load(red_smem.at[0])
                plgpu.barrier_arrive(red_empty)
                plgpu.barrier_wait(red_full)
                dv_total = dv + load(red_smem.at[0])
                store(dk_total, dk_tile, dk_ref)
                store(dv_total, dv_tile, dv_ref)
                stores_done()

    def memory(refs, smem, bars):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref = refs
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = smem
        q_ready, do_ready, lse_ready, delta_ready, free, kv_ready, kv_free = bars
        with jax.named_scope("m_setmaxnreg"):
            plgpu.set_max_registers(40, action="decrease")

        def item(it, g0):
            bi, hi, j = item_ids(it)
            cnt = count_ref[bi, hi, j]

            def fetch(t, _, wait=None):
                g = g0 + t
                for w in range(2):
                    s = lax.rem(g, stages) * 2 + w
                    if wait is None:
                        pl.when(g >= stages)(lambda s=s: plgpu.barrier_wait(free.at[s]))
                    elif wait:
                        plgpu.barrier_wait(free.at[s])
                    rows = pl.ds(lut_ref[bi, hi, j, t] * _BLOCK_Q + w * _ROWS, _ROWS)
                    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[s], q_ready.at[s])
                    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[s], lse_ready.at[s])
                    plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem.at[s], do_ready.at[s])
                    plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[s], delta_ready.at[s])
                return _

            first = jnp.minimum(cnt, stages)
            if not persistent:  # K, V come from compute warpgroup 0; the first ring slots are free
                with jax.named_scope("m_prime"):
                    lax.fori_loop(0, first, functools.partial(fetch, wait=False), None)
                with jax.named_scope("m_refill"):
                    lax.fori_loop(first, cnt, functools.partial(fetch, wait=True), None)
                return g0 + cnt
            lax.fori_loop(0, first, fetch, None)  # may run ahead of the previous key block's epilogue
            pl.when(it > 0)(lambda: plgpu.barrier_wait(kv_free))
            load_kv(k_ref, v_ref, k_smem, v_smem, kv_ready, (bi, hi, j))
            lax.fori_loop(first, cnt, fetch, None)
            return g0 + cnt

        for_each_item(item)

    def load_kv(k_ref, v_ref, k_smem, v_smem, kv_ready, ids):
        bi, hi, j = ids
        keys = pl.ds(j * _KEYS, _KEYS)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hi], k_smem, kv_ready.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hi], v_smem, kv_ready.at[1])

    def entry(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref = refs[:8]
        alpha_ref = refs[8] if has_alpha else None
        dk_ref, dv_ref = refs[-2:]
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        f32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)) if variant.exchange_tiled else ()
        red = plgpu.SMEM((2 if exchange == "pair" else 1, _KEYS, d), f32, transforms=f32_tiles)
        out = [plgpu.SMEM((_KEYS, d), dtype, transforms=tiles) for _ in range(2)]
        smem = (
            plgpu.SMEM((2 * stages, _ROWS, d), dtype, transforms=tiles),  # Q halves
            plgpu.SMEM((2 * stages, _ROWS, d), dtype, transforms=tiles),  # dO halves
            plgpu.SMEM((2 * stages, _ROWS), f32),  # lse
            plgpu.SMEM((2 * stages, _ROWS), f32),  # delta
            plgpu.SMEM((_KEYS, d), dtype, transforms=tiles),  # K (staging "kv": then dk out)
            plgpu.SMEM((_KEYS, d), dtype, transforms=tiles),  # V (staging "kv": then dv out)
            plgpu.RefUnion(red, out) if union else red,  # partial sums exchange (staging "union": and outputs)
        )
        ring = tuple(plgpu.Barrier(num_barriers=2 * stages) for _ in range(5))  # Q, dO, lse, delta ready; free
        others = (
            plgpu.Barrier(num_barriers=2),  # K, V loaded
            plgpu.Barrier(num_arrivals=2),  # K, V tiles free again
            plgpu.Barrier(num_arrivals=2 if exchange == "pair" else 1),  # partial sums written
            plgpu.Barrier(num_arrivals=1),  # exchange buffer read (serial)
            plgpu.Barrier(num_arrivals=1),  # output tiles read by TMA (union)
        )

        def body(smem, ring, others):
            wg = lax.axis_index("wg")
            if union:
                red_smem, out_smem = smem[6]
            else:
                red_smem, out_smem = smem[6], None
            smem = smem[:6] + (red_smem, out_smem)

            @pl.when(wg < 2)
            def _compute():
                refs_c = (k_ref, v_ref, lut_ref, count_ref, alpha_ref, dk_ref, dv_ref)
                compute(refs_c, smem, ring + others, wg)

            @pl.when(wg == 2)
            def _memory():
                refs_m = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lut_ref, count_ref)
                memory(refs_m, smem[:6], ring + others[:2])

        pl.run_scoped(body, smem, ring, others, collective_axes="wg")

    out_struct = jax.ShapeDtypeStruct(shape, dtype)
    grid, names = (h, nk, b), ("heads", "kblock", "batch")
    if persistent:
        grid, names = (programs,), ("prog",)
    elif variant.grid_order == "kblocks":
        grid, names = (nk, h, b), ("kblock", "heads", "batch")
    profile = {"profile_space": _PROFILE_REGIONS, "profile_dir": variant.profile_dir} if variant.profile_dir else {}
    return plgpu.kernel(
        entry,
        out_type=(out_struct, out_struct),
        grid=grid,
        grid_names=names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
    )
