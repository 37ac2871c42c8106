"""Wan2.1's sampler in JAX: flow matching on a shifted schedule, classifier-free guidance, UniPC or Euler.

Flow matching: x_sigma = (1 - sigma) x_0 + sigma * noise, the transformer predicts the velocity v = noise - x_0,
and sampling integrates dx/dsigma = v from sigma = 1 (noise) to 0. The schedule is shifted towards high noise,
sigma' = shift * sigma / (1 + (shift - 1) * sigma): shift 3.0 at 480p and 5.0 at 720p (`DEFAULT_SHIFT`).

Two solvers, each computing what the diffusers scheduler of the same name computes with Wan's settings
(tests/experiments/test_wan_diffusers_parity.py checks timesteps, sigmas and every update against diffusers):
  `euler`: FlowMatchEulerDiscreteScheduler(shift): x <- x + (sigma_next - sigma) * v.
  `unipc`: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
           solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero"),
           Wan's default (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"): each step first
           corrects the previous step's result with the new model output (UniC), then predicts the next sample
           from the last `order` x_0 predictions (UniP, B(h) = e^h - 1), in lambda = log((1 - sigma) / sigma).
           The update is a linear combination of the current sample, the previous sample and the x_0 predictions
           x_0 = x - sigma * v; its coefficients depend only on the schedule, so they are computed once in float64
           (`UniPC.corrector`, `UniPC.predictor`) and one compiled step serves every step index.
Guidance (`guided_step`): v = v_uncond + guidance_scale * (v_cond - v_uncond), two transformer calls per step
(the negative prompt's embedding for v_uncond), as Wan and diffusers' WanPipeline do; guidance_scale <= 1 makes
one call. Wan's default guidance scale is 5.0.

The schedules follow diffusers to the last detail that changes a number: UniPC's timesteps are the integer part of
sigma * 1000 (what the transformer is given), its first sigma is 1 - 1e-6; Euler's last sigma before 0 is the
shift applied twice to 1/1000 (the scheduler's sigma_min is already shifted when set_timesteps shifts again).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = {"480p": 3.0, "720p": 5.0}
DEFAULT_GUIDANCE = 5.0
SOLVERS = ("unipc", "euler")


def shift_sigmas(sigmas, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma), elementwise, in the dtype of `sigmas`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """timesteps (n,) float32: the t given to the transformer at step i; sigmas (n + 1,) float32: the noise level
    before step i, and 0 after the last step."""

    timesteps: np.ndarray
    sigmas: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def euler_schedule(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(num_steps)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    n = num_train_timesteps
    train = shift_sigmas(np.arange(n, 0, -1, dtype=np.float32) / np.float32(n), shift).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = shift_sigmas(np.linspace(sigma_max * n, sigma_min * n, num_steps) / n, shift).astype(np.float32)
    timesteps = (sigmas * np.float32(n)).astype(np.float32)
    return FlowSchedule(timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)]))


def unipc_schedule(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero").set_timesteps:
    sigmas linspace(1, 1/n, num_steps + 1)[:-1] shifted, the first moved to 1 - 1e-6 (so log(sigma) and
    log(1 - sigma) stay finite), timesteps int(sigma * n), then a final sigma 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    n = num_train_timesteps
    sigmas = shift_sigmas(np.linspace(1.0, 1.0 / n, num_steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * n).astype(np.int64).astype(np.float32)
    return FlowSchedule(timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32))


class Euler:
    """Flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i. Stateless (state is ())."""

    name = "euler"

    def __init__(self, num_steps: int, shift: float):
        self.schedule = euler_schedule(num_steps, shift)
        self.timesteps = jnp.asarray(self.schedule.timesteps)
        self._dt = jnp.asarray(self.schedule.sigmas[1:] - self.schedule.sigmas[:-1])

    def init(self, sample: jax.Array):
        return ()

    def step(self, state, i, velocity: jax.Array, sample: jax.Array):
        """(x_{i+1}, state) from the velocity v_i (the shape of sample) at step i (int or traced int32)."""
        prev = sample.astype(jnp.float32) + self._dt[i] * velocity
        return prev.astype(velocity.dtype), state


class UniPCState(NamedTuple):
    history: jax.Array       # (order, *sample.shape): x_0 predictions of the previous steps, most recent first
    last_sample: jax.Array   # the sample the previous step's predictor started from (after its correction)


def _lam(sigma: float) -> float:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (flow sigmas)."""
    return float(np.log(1.0 - sigma) - np.log(sigma))


def _unipc_terms(sigmas: np.ndarray, target: int, source: int, older: list[int], order: int, solver_type: str):
    """The B(h) terms of one UniPC update from sigma[source] to sigma[target] with the x_0 predictions of steps
    `older` (most recent first, order - 1 of them): (ratio sigma_t / sigma_s0, alpha_t, h_phi_1, B_h, rks, b)."""
    s_t, s_0 = float(sigmas[target]), float(sigmas[source])
    alpha_t = 1.0 - s_t
    h = _lam(s_t) - _lam(s_0)
    hh = -h                                               # predict_x0
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    rks = [(_lam(float(sigmas[k])) - _lam(s_0)) / h for k in older] + [1.0]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return s_t / s_0, alpha_t, h_phi_1, b_h, np.array(rks), np.array(b)


class UniPC:
    """UniPC multistep (B(h) = e^h - 1 by default) for flow prediction with x_0 as the solver's variable.

    `corrector` (n, 3 + order) and `predictor` (n, 1 + order) float32: at step i the corrected sample is
        x_c = C[i] . [sample, last_sample, x0_i, history_0, ..., history_{order-1}]
    (step 0 has no correction: x_c = sample) and the next sample is
        x_{i+1} = P[i] . [x_c, x0_i, history_0, ..., history_{order-2}]
    with x0_i = sample - sigma_i * v_i and history_k the x_0 prediction of step i - 1 - k.
    """

    name = "unipc"

    def __init__(self, num_steps: int, shift: float, *, order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"order={order} must be 1, 2 or 3")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type={solver_type!r} must be 'bh1' or 'bh2'")
        self.order, self.solver_type = order, solver_type
        self.schedule = unipc_schedule(num_steps, shift)
        n, sig = num_steps, self.schedule.sigmas
        # order of the predictor at each step: warm-up from 1, and lower again towards the end
        orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
        if not lower_order_final and sig[-1] == 0 and orders[-1] > 1:
            raise ValueError("lower_order_final=False needs a final sigma > 0")
        corrector = np.zeros((n, 3 + order))
        predictor = np.zeros((n, 1 + order))
        corrector[0, 0] = 1.0
        for i in range(n):
            if i > 0:                                     # UniC: correct the previous prediction
                c = orders[i - 1]
                ratio, alpha_t, h_phi_1, b_h, rks, b = _unipc_terms(
                    sig, i, i - 1, [i - 1 - k for k in range(1, c)], c, solver_type)
                rhos = np.array([0.5]) if c == 1 else np.linalg.solve(np.vander(rks, c, increasing=True).T, b)
                row = corrector[i]
                row[1] = ratio                            # last_sample
                row[3] = -alpha_t * h_phi_1               # history_0 = m0
                for k in range(c - 1):                    # D1_k = (history_{k+1} - m0) / r_k
                    row[4 + k] += -alpha_t * b_h * rhos[k] / rks[k]
                    row[3] += alpha_t * b_h * rhos[k] / rks[k]
                row[2] += -alpha_t * b_h * rhos[-1]       # D1_t = x0_i - m0
                row[3] += alpha_t * b_h * rhos[-1]
            p = orders[i]                                 # UniP: predict x_{i+1}
            row = predictor[i]
            if sig[i + 1] == 0:                           # h = inf: the prediction is x0_i itself
                if p != 1:
                    raise ValueError("a final sigma of 0 needs a first-order last step")
                row[1] = 1.0
                continue
            ratio, alpha_t, h_phi_1, b_h, rks, b = _unipc_terms(sig, i + 1, i, [i - k for k in range(1, p)], p,
                                                                solver_type)
            row[0] = ratio
            row[1] = -alpha_t * h_phi_1
            if p > 1:
                rhos = np.array([0.5]) if p == 2 else np.linalg.solve(
                    np.vander(rks[:-1], p - 1, increasing=True).T, b[:-1])
                for k in range(p - 1):
                    row[2 + k] += -alpha_t * b_h * rhos[k] / rks[k]
                    row[1] += alpha_t * b_h * rhos[k] / rks[k]
        self.corrector = jnp.asarray(corrector, jnp.float32)
        self.predictor = jnp.asarray(predictor, jnp.float32)
        self.timesteps = jnp.asarray(self.schedule.timesteps)
        self._sigmas = jnp.asarray(sig)

    def init(self, sample: jax.Array) -> UniPCState:
        return UniPCState(jnp.zeros((self.order, *sample.shape), jnp.float32), jnp.zeros(sample.shape, jnp.float32))

    def step(self, state: UniPCState, i, velocity: jax.Array, sample: jax.Array):
        """(x_{i+1}, state) from the velocity v_i (the shape of sample) at step i (int or traced int32)."""
        sample = sample.astype(jnp.float32)
        x0 = sample - self._sigmas[i] * velocity.astype(jnp.float32)
        c, p = self.corrector[i], self.predictor[i]
        hist = state.history
        corrected = c[0] * sample + c[1] * state.last_sample + c[2] * x0
        corrected = corrected + jnp.tensordot(c[3:], hist, axes=1)
        prev = p[0] * corrected + p[1] * x0
        if self.order > 1:
            prev = prev + jnp.tensordot(p[2:], hist[:self.order - 1], axes=1)
        history = jnp.concatenate([x0[None], hist[:-1]], axis=0)
        return prev, UniPCState(history, corrected)


def make_solver(name: str, num_steps: int, shift: float):
    """`UniPC` (Wan's default) or `Euler` for `num_steps` steps on the schedule shifted by `shift`."""
    if name == "unipc":
        return UniPC(num_steps, shift)
    if name == "euler":
        return Euler(num_steps, shift)
    raise ValueError(f"solver={name!r} is not one of {SOLVERS}")


def guided_step(velocity_fn: Callable, solver, guidance_scale: float, params: Any, state, latents: jax.Array,
                i, context: jax.Array, negative_context: jax.Array | None):
    """One denoising step with classifier-free guidance (traceable; `i` may be a traced int32).

    velocity_fn(params, latents (B, C, F, H, W), t (B,) float32, context (B, L, D)) -> velocity like latents.
    Calls it twice (context, then negative_context) when guidance_scale > 1, once otherwise.
    Returns (latents after the step (B, C, F, H, W) float32, solver state).
    """
    t = jnp.broadcast_to(solver.timesteps[i], (latents.shape[0],))
    velocity = velocity_fn(params, latents, t, context)
    if guidance_scale > 1.0:
        uncond = velocity_fn(params, latents, t, negative_context)
        velocity = uncond + guidance_scale * (velocity - uncond)
    return solver.step(state, i, velocity, latents)


def make_step(velocity_fn: Callable, solver, guidance_scale: float = DEFAULT_GUIDANCE):
    """The jitted `guided_step`: step(params, state, latents, i (int32), context, negative_context) ->
    (latents, state). One compilation serves every step index (lower/compile it ahead to time compilation)."""
    return jax.jit(functools.partial(guided_step, velocity_fn, solver, guidance_scale))


def run_steps(step: Callable, solver, params: Any, latents: jax.Array, context: jax.Array,
              negative_context: jax.Array | None, *, progress: bool | str = False, step_times: list | None = None):
    """All of the solver's steps with `step` (from `make_step`, or its compiled form); returns the final latents.
    With `progress` (True or a label) a tqdm bar counts the steps; `step_times`, if given, receives each step's
    seconds, measured with the step's result ready (jax.block_until_ready)."""
    steps = range(solver.schedule.num_steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=progress if isinstance(progress, str) else f"{solver.name} sampling",
                     file=sys.stdout, leave=True)
    x, state = latents.astype(jnp.float32), solver.init(latents)
    for i in steps:
        start = time.perf_counter()
        x, state = step(params, state, x, jnp.int32(i), context, negative_context)
        if step_times is not None:
            jax.block_until_ready(x)
            step_times.append(time.perf_counter() - start)
    return x


def sample(velocity_fn: Callable, params: Any, latents: jax.Array, context: jax.Array,
           negative_context: jax.Array | None, *, solver="unipc", num_steps: int = 50, shift: float = 3.0,
           guidance_scale: float = DEFAULT_GUIDANCE, progress: bool | str = False, step_times: list | None = None):
    """Denoise `latents` (B, C, F, H, W) float32 noise into x_0 with Wan's sampler; returns (B, C, F, H, W) float32.

    solver: "unipc" (Wan's default), "euler", or a `UniPC` / `Euler` instance (then num_steps and shift are its
    own). One jitted step (both guidance calls, guidance and the solver update) serves every step index. With
    `progress` (True or a label) a tqdm bar counts the steps. `step_times`, if given, receives each step's
    seconds, measured with the step's result ready (jax.block_until_ready), the first including compilation.
    """
    if isinstance(solver, str):
        solver = make_solver(solver, num_steps, shift)
    if guidance_scale > 1.0 and negative_context is None:
        raise ValueError("guidance_scale > 1 needs negative_context (the negative prompt's text embedding)")
    step = make_step(velocity_fn, solver, guidance_scale)
    return run_steps(step, solver, params, latents, context, negative_context, progress=progress,
                     step_times=step_times)
