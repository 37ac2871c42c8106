"""Kernel configuration: every choice the kernels make, in one frozen value passed as a static argument.

``KernelConfig`` is hashable and immutable; the entry points (``sparse_linear_attention``, ``sla2_fused_attention``
and their low-bit forms) take it as ``config=`` and carry it inside the static description of the call, so it is
part of every jit and custom_vjp cache key: two configs never share a trace. ``config=None`` takes
``heuristic_config(...)``, the measured defaults for the call's shape, dtype and GPU generation (the launch tables
below). There is no module-level mutable state: a variant is chosen by passing another config, e.g.
``heuristic_config(...).replace(loop="pipelined")`` or ``KernelConfig(forward="triton")``.

The numbers behind each default are in docs/dev (forward kernel, backward kernels, low bit).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

KERNEL_FAMILIES = ("mosaic", "triton")
LOOPS = ("pingpong", "pipelined")
STATE_DTYPES = ("bfloat16", "float32")
BLOCK_SUM_DTYPES = ("float16", "bfloat16")
P8_OPERANDS = ("registers", "smem")
PHI_VJP_PLACES = ("mosaic", "pass")


class Launch(NamedTuple):
    """Launch parameters of one Triton kernel: warps, software-pipeline stages, and ``rows``: query rows per program
    (dq) or per loop step (dkv), keys per loop step for the forward (a multiple of block_k), chunk rows for the sums."""

    num_warps: int
    num_stages: int
    rows: int


# Triton launch tables, one per GPU generation: (kernel, head_dim, block_q, block_k) -> Launch. Kernels: "fwd"
# (forward), "dq" (backward over the LUT), "dkv" (backward over the transposed LUT; also the linear dK/dV part beside
# the Mosaic dK/dV kernel), "dq_linear" (the per-row terms and dphi(Q) beside the Mosaic dQ kernel), "sum" (pre-pass
# and gradient totals), "sum_phi" (the forward's states from K with phi applied in the kernel; rows = rows per loop
# step), "lowbit" (the INT8 / FP8 Triton forward). Missing keys take DEFAULT_LAUNCH.
# experiments/dev/autotune_kernels.py measures candidates on a GPU and prints the entries for its generation.
DEFAULT_LAUNCH = {
    "fwd": Launch(4, 2, 64),
    "dq": Launch(4, 2, 64),
    "dkv": Launch(4, 2, 64),
    "sum": Launch(4, 2, 128),
    # H100, wan-1.3b, 95% complement states from K: 0.345 ms (8 warps) vs 0.362 (4); a 128 x D float32 tile of phi(K)
    # beside the D x D accumulator spills (scope "all" with 128-row steps: 0.43 ms vs 0.09 from a phi(K) array)
    "sum_phi": Launch(8, 2, 64),
    # the per-row terms and dphi(Q) beside the Mosaic dQ kernel (dq_linear_kernel): rows = query rows per program
    # (a divisor of block_q); H100, wan-1.3b 97%: 8 warps 0.238 ms, 4 warps 0.333 (one 128-row block per program)
    "dq_linear": Launch(8, 2, 128),
}
LAUNCH_TABLES = {
    "hopper": {
        ("fwd", 128, 128, 64): Launch(8, 3, 64),
        ("dq", 128, 128, 64): Launch(8, 2, 128),
        ("dkv", 128, 128, 64): Launch(4, 2, 64),
        # H100, wan-1.3b fwd+bwd, one process: 64-row programs 0.209 / 0.212 ms vs 0.242 / 0.240 with 128 rows (97% /
        # 95%); 4 warps 64 rows 0.227, 4 warps 32 rows 0.217, 16 warps 128 rows 0.232
        ("dq_linear", 128, 128, 64): Launch(8, 2, 64),
        ("sum", 128, 128, 64): Launch(4, 2, 128),
        # H100, wan-1.3b, totals of scope "all" from K (CUPTI, one process): 0.152 ms vs 0.168 with (8, 2, 64) and
        # 0.161 with (8, 3, 64); the complement states take 64-row blocks either way (0.337 vs 0.340 ms). The
        # library's 16-bit forward makes the totals with K's block means (key_block_sums), one 64-row key block
        # per step: there only the warps and stages of this entry apply
        ("sum_phi", 128, 128, 64): Launch(8, 3, 128),
        ("fwd", 64, 128, 64): Launch(4, 3, 64),
        ("dq", 64, 128, 64): Launch(4, 2, 64),
        ("dkv", 64, 128, 64): Launch(4, 2, 64),
        # H100, wan-1.3b at 95%: 2.44 vs 2.59 ms with (8, 3)
        ("lowbit", 128, 128, 64): Launch(8, 4, 64),
    },
    "ampere": {},
    "other": {},
}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Every kernel choice of one call (frozen, hashable, validated on creation).

    forward / backward: the kernel family of the forward's and the backward's LUT loops: "mosaic" (warp-specialised
      Mosaic GPU kernels, Hopper, block_q 128, block_k 64, 16-bit, N % 8 == 0, D % 64 == 0) or "triton" (any GPU,
      any supported shape, and the CPU interpret mode).
    epilogue: where the Mosaic forward's linear branch and SLA2 combine run: "mosaic" (its own epilogue; needs
      bfloat16 states) or "triton" (a Triton kernel after it).
    state_dtype: the per-block linear states H_i (forward) and dH_j (backward) for 16-bit inputs; float32 inputs
      always keep float32 states.
    block_sum_dtype: the per-block sums h_j (and the backward's per-query-block sums) the masked matmul adds into
      H_i / dH_j, for 16-bit inputs: "bfloat16" (2^-8 relative, no scale: bfloat16 has float32's range; with
      state_dtype "bfloat16" the product is bf16 x bf16 -> bf16, which cuBLAS runs and writes directly: 1.3-1.4 ms at
      wan-14b-720p on an H100) or "float16" (2^-11, each sum with a power-of-two scale; XLA's own GEMM with the
      convert to bf16 states fused, 2.2 ms).
    loop / pair_steps / outputs_in_ring / p8_operand: the Mosaic forward's LUT loop ("pingpong": the two compute
      warpgroups take turns on the tensor cores; "pipelined": each overlaps its softmax with its own previous P V),
      two LUT entries per step (64 x 128 score tiles; with an odd topk the ping-pong loop's last step is a 64-key
      step), output tiles staged in finished ring slots, and how FP8 P reaches the P V wgmma. (Its programs run
      heads fastest, grid (H, Nq, B).)
    mosaic_fp8: quant "int8_fp8" takes the Mosaic forward (else the Triton low-bit kernel).
    phi_vjp: where the backward without phi arrays applies phi's vjp under the Mosaic backward: "mosaic" (Q's in the
      Mosaic dQ kernel's epilogue, K's in the Mosaic dK/dV kernel's, which then also adds the linear dV: the linear
      dK/dV kernel runs first; for feature maps with a written-out ``.vjp``, e.g. the library's) or "pass" (one
      front-end pass per tensor: read X, dphi(X), dX, write dX; what maps without ``.vjp`` and the Triton backward
      get either way). H100, wan-1.3b forward+backward: 3.264 vs 3.432 ms at 97%.
    totals_chunk: rows per program of the totals' outer sums (phi(K)^T V of scope "all" and the backward's dH, dZ
      totals; split-K, the partial sums added by XLA): a power of two >= 64. More programs against more partial sums.
    launch: Triton launch parameters per kernel name ("fwd", "dq", "dkv", "dq_linear", "sum", "sum_phi", "lowbit"),
      as a tuple of (name, Launch) pairs, warps and rows powers of two; kernels not listed take DEFAULT_LAUNCH (the
      "lowbit" kernel: the "fwd" entry).
    profile_dir: Mosaic's on-device profiler writes a trace of the named regions of the Mosaic forward, dQ and
      dK/dV kernels there (None: off).
    """

    forward: str = "triton"
    backward: str = "triton"
    epilogue: str = "mosaic"
    state_dtype: str = "bfloat16"
    block_sum_dtype: str = "bfloat16"
    loop: str = "pingpong"
    pair_steps: bool = True
    outputs_in_ring: bool = True
    p8_operand: str = "registers"
    mosaic_fp8: bool = True
    phi_vjp: str = "mosaic"
    totals_chunk: int = 1024
    launch: tuple = ()
    profile_dir: str | None = None

    def __post_init__(self):
        for name, value, choices in (
            ("forward", self.forward, KERNEL_FAMILIES),
            ("backward", self.backward, KERNEL_FAMILIES),
            ("epilogue", self.epilogue, KERNEL_FAMILIES),
            ("state_dtype", self.state_dtype, STATE_DTYPES),
            ("block_sum_dtype", self.block_sum_dtype, BLOCK_SUM_DTYPES),
            ("loop", self.loop, LOOPS),
            ("p8_operand", self.p8_operand, P8_OPERANDS),
            ("phi_vjp", self.phi_vjp, PHI_VJP_PLACES),
        ):
            if value not in choices:
                raise ValueError(f"KernelConfig.{name}={value!r} is not one of {choices}")
        chunk = self.totals_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 64 or chunk & (chunk - 1):
            raise ValueError(f"KernelConfig.totals_chunk must be a power of two >= 64, got {chunk!r}")
        for name in ("pair_steps", "outputs_in_ring", "mosaic_fp8"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KernelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        launch = tuple((str(k), Launch(*v)) for k, v in dict(self.launch).items())
        for kernel, params in launch:
            if kernel not in (*DEFAULT_LAUNCH, "lowbit"):
                raise ValueError(f"KernelConfig.launch: unknown kernel {kernel!r}")
            if min(params) < 1:
                raise ValueError(f"KernelConfig.launch[{kernel!r}] must be positive, got {params}")
            if any(x & (x - 1) for x in (params.num_warps, params.rows)):  # in-kernel shapes are powers of two
                raise ValueError(f"KernelConfig.launch[{kernel!r}]: warps and rows must be powers of two, got {params}")
        object.__setattr__(self, "launch", launch)

    def replace(self, **changes) -> KernelConfig:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def launch_params(self, kernel: str) -> Launch:
        """The Launch of Triton kernel ``kernel`` ("fwd", "dq", "dkv", "dq_linear", "sum", "sum_phi", "lowbit")."""
        table = dict(self.launch)
        if kernel in table:
            return table[kernel]
        return table.get("fwd", DEFAULT_LAUNCH["fwd"]) if kernel == "lowbit" else DEFAULT_LAUNCH[kernel]


def gpu_generation() -> str:
    """'hopper' (H100/H200/H800/GH200), 'ampere' (A100/A10/RTX 30), 'blackwell', or 'other' (also CPU)."""
    try:
        device = jax.devices()[0]
    except Exception:  # pragma: no cover - no devices
        return "other"
    if device.platform != "gpu":
        return "other"
    kind = device.device_kind.lower()
    if any(t in kind for t in ("h100", "h200", "h800", "h20", "gh200")):
        return "hopper"
    if any(t in kind for t in ("a100", "a10", "a30", "a40", "rtx 30", "a800")):
        return "ampere"
    if any(t in kind for t in ("b200", "b100", "gb200", "rtx 50", "5090")):
        return "blackwell"
    return "other"


def mosaic_supports(n: int, head_dim: int, dtype, block_q: int, block_k: int) -> str | None:
    """None when the Mosaic GPU kernels can run a call of this shape, else the reason they cannot: their
    shared-memory plans hold 128-row query blocks and 64-key slots, 16-bit tiles, and (N, H, D) tiled by 8 rows."""
    if block_q != 128 or block_k != 64:
        return f"the Mosaic kernels need block_q=128, block_k=64 (got {block_q}, {block_k})"
    if n % 8:
        return f"the Mosaic kernels need N % 8 == 0 (got N={n})"
    if head_dim % 64:
        return f"the Mosaic kernels need head_dim % 64 == 0 (got {head_dim})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"the Mosaic kernels need bfloat16 or float16 inputs (got {jnp.dtype(dtype).name})"
    return None


def heuristic_config(
    n: int, head_dim: int, dtype, block_q: int = 128, block_k: int = 64, *, gpu: str | None = None,
    interpret: bool = False,
) -> KernelConfig:
    """The measured default for a call: the Mosaic kernels on Hopper where they support the shape (not in interpret
    mode), the Triton kernels elsewhere, and this generation's Triton launch table.

    n, head_dim, dtype: the call's sequence length, head dim and input dtype; gpu: a generation name (default:
    the first device's, ``gpu_generation()``)."""
    gpu = gpu_generation() if gpu is None else gpu
    family = "mosaic" if (gpu == "hopper" and not interpret and mosaic_supports(n, head_dim, dtype, block_q, block_k) is None) else "triton"
    table = LAUNCH_TABLES.get(gpu, {})
    launch = tuple(
        (kernel, table[(kernel, head_dim, block_q, block_k)])
        for kernel in (*DEFAULT_LAUNCH, "lowbit")
        if (kernel, head_dim, block_q, block_k) in table
    )
    return KernelConfig(forward=family, backward=family, launch=launch)


__all__ = [
    "KernelConfig",
    "Launch",
    "DEFAULT_LAUNCH",
    "LAUNCH_TABLES",
    "gpu_generation",
    "heuristic_config",
    "mosaic_supports",
]
