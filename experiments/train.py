"""Stage runners of the SLA2 recipe: dense pre-training (0), router training (1), sparse fine-tuning (2).

Each runner owns one run folder:
  <run_dir>/ckpt/     orbax checkpoints {"model": params, "opt": optimizer state} every ckpt_every steps
  <run_dir>/done.json written last, with the final metrics; a runner that finds it returns at once
A runner that finds a checkpoint but no done.json resumes from the latest step. Data and noise are pure functions
of the step number, so a resumed run gives the same parameters as an uninterrupted one.

Parallelism: a mesh over all local devices with axes ("data", "context"). Batches are sharded over "data", the
parameters replicated. The "context" axis (size > 1: `run_recipe --context N`) makes
the attention of stages 0 and 2 sequence-parallel (Ulysses, sla2_jax.ContextParallel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments.configs import Preset, RunSpec, Stage1Config, TrainConfig
from experiments.dit import ALPHA_PARAM_NAMES, ROUTER_PARAM_NAMES, VideoDiT, flow_matching_loss, make_model, sample_t


# ----------------------------------------------------------------------------------------------------------------
# Devices, filters, checkpoints.


def make_mesh(context: int = 1) -> Mesh:
    """Mesh ("data", "context") over all local devices; context > 1 is reserved for context parallelism."""
    devices = np.array(jax.local_devices())
    if devices.size % context:
        raise ValueError(f"context={context} does not divide the {devices.size} local devices")
    return Mesh(devices.reshape(-1, context), ("data", "context"))


def context_parallel(mesh: Mesh):
    """The sla2_jax.ContextParallel of the mesh when its "context" axis is > 1 (attention sequence-sharded over it,
    batch over "data"), else None."""
    if mesh.shape["context"] == 1:
        return None
    import sla2_jax as sla

    return sla.ContextParallel(mesh, "context", "data")


def shard_batch(batch, mesh: Mesh):
    """Put every array of the batch on the mesh, split along its leading (batch) axis over "data"."""
    n = mesh.shape["data"]
    for x in jax.tree.leaves(batch):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} data-parallel devices")
    return jax.device_put(batch, NamedSharding(mesh, P("data")))


def replicate(model: nnx.Module, mesh: Mesh) -> None:
    """Place the model's state replicated on every device of the mesh (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, NamedSharding(mesh, P())))


def _path_filter(names):
    return nnx.Any(*[nnx.PathContains(n) for n in names])


ROUTER = _path_filter(ROUTER_PARAM_NAMES)
ALPHA = _path_filter(ALPHA_PARAM_NAMES)
STAGE1_TRAINABLE = nnx.All(nnx.Param, nnx.Any(ROUTER, ALPHA))  # router + alpha only
STAGE2_TRAINABLE = nnx.All(nnx.Param, nnx.Not(ROUTER))  # everything but the router


def _manager(run_dir: str, keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "ckpt")), options=ocp.CheckpointManagerOptions(max_to_keep=keep)
    )


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, model: nnx.Module, optimizer: nnx.Optimizer):
    mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model, nnx.Param).to_pure_dict()),
            opt=ocp.args.StandardSave(nnx.state(optimizer).to_pure_dict()),
        ),
    )
    mngr.wait_until_finished()


def _abstract(state: nnx.State):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.to_pure_dict())


def restore_checkpoint(mngr, step, model: nnx.Module, optimizer: Optional[nnx.Optimizer] = None):
    """Load params (and optimizer state if given) of `step` into the modules, in place."""
    items = {"model": ocp.args.StandardRestore(_abstract(nnx.state(model, nnx.Param)))}
    if optimizer is not None:
        items["opt"] = ocp.args.StandardRestore(_abstract(nnx.state(optimizer)))
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    for name, module in (("model", model), ("opt", optimizer)):
        if module is not None:
            state = nnx.state(module, nnx.Param) if name == "model" else nnx.state(module)
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(module, state)


def save_params_only(run_dir: str, step: int, model: nnx.Module) -> None:
    """A checkpoint of `model`'s parameters alone (no optimizer state) at `step` in <run_dir>/ckpt: enough for
    `load_params` (continuing a recipe elsewhere), a third of a full checkpoint's size."""
    mngr = _manager(run_dir)
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model, nnx.Param).to_pure_dict())))
    mngr.wait_until_finished()


def load_params(run_dir: str, model: nnx.Module) -> int:
    """Load the final params of a finished run into `model` (same structure). Returns the step loaded."""
    if not is_done(run_dir):
        raise ValueError(f"run_dir={run_dir!r} has not finished (no done.json)")
    mngr = _manager(run_dir)
    step = mngr.latest_step()
    restore_checkpoint(mngr, step, model)
    return step


def transfer_params(src: nnx.Module, dst: nnx.Module) -> int:
    """Copy every nnx.Param of `src` whose path also exists in `dst` (same shape). Returns how many were copied."""
    src_flat = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
    dst_state = nnx.state(dst, nnx.Param)
    dst_flat = dict(nnx.to_flat_state(dst_state))
    copied = 0
    for path, var in dst_flat.items():
        if path in src_flat:
            value = src_flat[path][...]
            if value.shape != var[...].shape:
                raise ValueError(f"param {path} has shape {value.shape} in the source, {var[...].shape} here")
            var[...] = value
            copied += 1
    nnx.update(dst, dst_state)
    return copied


def is_done(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "done.json"))


def read_done(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "done.json")) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _resume(mngr, model, optimizer) -> int:
    """Restores the latest checkpoint of `mngr` into model and optimizer (in place); returns its step, 0 if none."""
    step = mngr.latest_step()
    if step is None:
        return 0
    restore_checkpoint(mngr, step, model, optimizer)
    return step


def make_optimizer(model: nnx.Module, cfg: TrainConfig, wrt) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * 0.1
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(schedule, b2=0.99, weight_decay=cfg.weight_decay)
    )
    return nnx.Optimizer(model, tx, wrt=wrt)


# ----------------------------------------------------------------------------------------------------------------
# Stages 0 and 2: diffusion training.


@nnx.jit(static_argnames=("trainable",))
def _train_step(model: VideoDiT, optimizer: nnx.Optimizer, batch: dict, key: jax.Array, trainable):
    """One flow-matching step. batch: video (B,T,H,W,C), label (B,). Returns the scalar loss."""
    video, label = batch["video"], batch["label"]
    k_t, k_noise = jax.random.split(key)
    t = sample_t(k_t, video.shape[0])
    noise = jax.random.normal(k_noise, video.shape, video.dtype)

    def loss_fn(model):
        return flow_matching_loss(model, video, label, t, noise)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)
    return loss


def train_diffusion(
    run_dir: str,
    preset: Preset,
    run: RunSpec,
    cfg: TrainConfig,
    *,
    init: Optional[Callable[[VideoDiT], None]] = None,
    trainable=nnx.Param,
    source: Optional[data_lib.VideoSource] = None,
    stop_after: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    desc: Optional[str] = None,
    deadline: Optional[float] = None,
    on_checkpoint: Optional[Callable[[int, VideoDiT], None]] = None,
) -> dict:
    """Train a VideoDiT with the flow-matching loss (stage 0: dense from scratch; stage 2: sparse fine-tune).

    init: called on the fresh model before step 0 (loads stage-0 weights, stage-1 router). trainable: nnx filter
    of the parameters that learn. stop_after: stop (checkpointed, not done) after this many steps, to test resume.
    deadline: a time.time() value; the first checkpoint after it ends this call (checkpointed, not done), so a
    long run proceeds in time-budgeted chunks. on_checkpoint(step, model): called after every checkpoint save
    (e.g. to log the oracle kept mass while the dense model trains).
    Returns {"stopped_at": step} when stopped early, else the done.json metrics: final_loss (mean of the last log
    interval), steps, seconds, videos_per_s, loss_curve (over every chunk of the run), seconds_total.
    """
    if is_done(run_dir):
        return read_done(run_dir)
    mesh = mesh or make_mesh()
    source = source or data_lib.make_source(preset.data, data_lib.TRAIN_STREAM)
    model = make_model(preset, run, context=context_parallel(mesh))
    mngr = _manager(run_dir)
    if init is not None and mngr.latest_step() is None:  # a resumed run restores its own weights below
        init(model)
    optimizer = make_optimizer(model, cfg, trainable)
    start = _resume(mngr, model, optimizer)
    replicate(model, mesh)
    replicate(optimizer, mesh)

    base_key = jax.random.PRNGKey(cfg.seed)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    progress_path = os.path.join(run_dir, "progress.json")
    progress = {"loss_curve": [], "seconds": 0.0}
    if start and os.path.exists(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        progress["loss_curve"] = [p for p in progress["loss_curve"] if p[0] <= start]
    losses, curve, t0, seen, tic, t_ckpt = [], [], time.time(), 0, time.time(), 0.0
    bar = tqdm(
        range(start, end), desc=desc or run.name, initial=start, total=cfg.steps, dynamic_ncols=True, mininterval=2.0
    )
    for step in bar:
        batch = shard_batch(source.batch(step, cfg.batch_size), mesh)
        loss = _train_step(model, optimizer, batch, jax.random.fold_in(base_key, step), trainable)
        losses.append(loss)
        seen += cfg.batch_size
        if step == start:
            jax.block_until_ready(loss)
            t_first = time.time()  # after compilation
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            recent = float(jnp.mean(jnp.stack(losses[-cfg.log_every :])))
            if not np.isfinite(recent):
                raise FloatingPointError(f"{run.name}: loss is {recent} at step {step + 1}")
            curve.append([step + 1, recent])
            rate = seen / max(time.time() - tic, 1e-9)
            bar.set_postfix(loss=f"{recent:.4f}", vid_s=f"{rate:.1f}", tok_s=f"{rate * preset.num_tokens:.3g}")
            seen, tic = 0, time.time()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end:
            jax.block_until_ready(loss)
            tic_ckpt = time.time()
            save_checkpoint(mngr, step + 1, model, optimizer)
            t_ckpt += time.time() - tic_ckpt
            if on_checkpoint is not None:
                tic_ckpt = time.time()
                on_checkpoint(step + 1, model)
                t_ckpt += time.time() - tic_ckpt
            write_json(
                progress_path,
                {"loss_curve": progress["loss_curve"] + curve, "seconds": progress["seconds"] + time.time() - t0},
            )
            if deadline is not None and time.time() > deadline and step + 1 < end:
                end = step + 1
                break
    bar.close()
    if end < cfg.steps:
        return {"stopped_at": end}
    if losses:
        jax.block_until_ready(losses[-1])
    t_end = time.time()
    tail = losses[-cfg.log_every :] if losses else []
    metrics = {
        "run": run.name,
        "steps": cfg.steps,
        "resumed_from": start,
        "final_loss": float(jnp.mean(jnp.stack(tail))) if tail else None,
        "seconds": time.time() - t0,
        # Throughput after the first (compiling) step of this call, checkpoint saves excluded.
        "videos_per_s": ((end - start - 1) * cfg.batch_size / (t_end - t_first - t_ckpt) if end - start > 1 else None),
        "loss_curve": progress["loss_curve"] + curve,  # [step, mean training loss of the last log interval]
        "seconds_total": progress["seconds"] + time.time() - t0,  # every chunk of the run
    }
    write_json(os.path.join(run_dir, "done.json"), metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: capture Q/K/V from the frozen dense model, train router + alpha with soft top-k.


@nnx.jit
def _capture_step(model: VideoDiT, video, label, t, noise):
    tb = t[:, None, None, None, None]
    _, captured = model((1.0 - tb) * video + tb * noise, t, label, capture=True)
    return captured


def capture_qkv(
    model: VideoDiT,
    preset: Preset,
    cfg: Stage1Config,
    *,
    stream: int,
    num_videos: int,
    batch_size: int = 2,
    with_output: bool = True,
) -> dict:
    """Q/K/V of every attention layer at cfg.timesteps for `num_videos` videos of a data stream.

    Returns {"q": [L arrays (S, N, H, D)], "k": [...], "v": [...], "o": [...]} with S = num_videos * len(timesteps);
    "o" is the dense attention output (float32 reference, sla2_jax.dense_attention semantics), left out when
    with_output is False.
    """
    source = data_lib.make_source(preset.data, stream)
    qs, ks, vs = [], [], []
    for ti, t_val in enumerate(cfg.timesteps):
        for start in range(0, num_videos, batch_size):
            idx = np.arange(start, min(start + batch_size, num_videos))
            batch = source.videos(idx)
            noise = jax.random.normal(
                jax.random.fold_in(jax.random.PRNGKey(stream % 2**31), ti * 100_000 + start), batch["video"].shape
            )
            t = jnp.full((len(idx),), t_val, jnp.float32)
            cap = _capture_step(model, batch["video"], batch["label"], t, noise)
            qs.append([c[0] for c in cap])
            ks.append([c[1] for c in cap])
            vs.append([c[2] for c in cap])
    L = len(qs[0])
    out = {
        name: [jnp.concatenate([chunk[l] for chunk in lst], 0) for l in range(L)]
        for name, lst in (("q", qs), ("k", ks), ("v", vs))
    }
    if not with_output:
        return out
    ref = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        )
    )
    out["o"] = [
        jnp.concatenate(
            [
                ref(out["q"][l][i : i + 1], out["k"][l][i : i + 1], out["v"][l][i : i + 1])
                for i in range(out["q"][l].shape[0])
            ],
            0,
        )
        for l in range(L)
    ]
    return out


class RouterSet(nnx.Module):
    """One sla2_jax.SLA2Attention per DiT layer: the parameters stage 1 trains (router w_q, w_k and alpha)."""

    def __init__(self, preset: Preset, run: RunSpec, *, seed: int = 0):
        model = make_model(preset, run, seed=seed, quant="none")
        self.layers = type(model.blocks)([blk.attn.core for blk in model.blocks])


def set_routing(module: nnx.Module, routing: str) -> int:
    """Set attribute `routing` ("hard" | "soft") on every sla2_jax.SLA2Attention inside `module`. Returns count."""
    import sla2_jax as sla

    n = 0
    for _, m in nnx.iter_graph(module):
        if isinstance(m, sla.SLA2Attention):
            m.routing = routing
            n += 1
    return n


def relative_mse(o, ref):
    """mean((o - ref)^2) / mean(ref^2): scalar float32."""
    o, ref = o.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.mean((o - ref) ** 2) / (jnp.mean(ref**2) + 1e-12)


@nnx.jit
def _router_step(routers: RouterSet, optimizer: nnx.Optimizer, q, k, v, o):
    """q, k, v, o: tuples over layers of (b, N, H, D). Loss: mean over layers of the relative MSE."""

    def loss_fn(routers):
        errs = [relative_mse(layer(q[l], k[l], v[l]), o[l]) for l, layer in enumerate(routers.layers)]
        return jnp.mean(jnp.stack(errs))

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, STAGE1_TRAINABLE))(routers)
    optimizer.update(routers, grads)
    return loss


def optimal_alpha_sums(o_s, o_l, o, block_q: int):
    """Sums behind the least-squares alpha of o ~ alpha * o_s + (1 - alpha) * o_l, per head and query block.

    o_s, o_l, o: (B, N, H, D). Returns (num, den), each (H, Nq) float32: alpha* = num / den, with
    num = sum <o - o_l, o_s - o_l> and den = sum |o_s - o_l|^2 over the batch, the block's rows and channels.
    """
    from sla2_jax.blocks import to_blocks

    o_s, o_l, o = (x.astype(jnp.float32) for x in (o_s, o_l, o))
    diff = to_blocks(o_s - o_l, block_q)  # (B, H, Nq, b_q, D)
    target = to_blocks(o - o_l, block_q)
    return jnp.sum(target * diff, axis=(0, 3, 4)), jnp.sum(diff * diff, axis=(0, 3, 4))


@nnx.jit
def _alpha_sums(layer, q, k, v, o):
    from sla2_jax.functional import sparse_linear_outputs

    cfg = layer.config
    hard = cfg if cfg.quant == "none" else dataclasses.replace(cfg, quant="none")
    o_s, o_l, _ = sparse_linear_outputs(q, k, v, hard, w_q=layer.w_q[...], w_k=layer.w_k[...])
    return optimal_alpha_sums(o_s, o_l, o, cfg.block_q)


def init_alpha_least_squares(routers: RouterSet, captured: dict, clip: float = 0.02) -> list:
    """Set every layer's alpha (granularity "block" or "head") to the least-squares fit of the dense attention
    output on the captured Q/K/V with the current (initial) router and hard top-k, clipped to [clip, 1 - clip].

    The paper leaves alpha's initialisation open; alpha = 0.5 can be far from the best mix, and stage 1's Adam
    steps move a logit by about lr per step. Returns the mean alpha of each layer (for the run's record).
    """
    means = []
    for index, layer in enumerate(routers.layers):
        num, den = 0.0, 0.0
        for i in range(captured["q"][index].shape[0]):
            n, d = _alpha_sums(layer, *(captured[name][index][i : i + 1] for name in ("q", "k", "v", "o")))
            num, den = num + n, den + d
        if layer.config.alpha == "head":
            num, den = num.sum(-1), den.sum(-1)
        alpha = jnp.clip(num / jnp.maximum(den, 1e-20), clip, 1.0 - clip)
        layer.alpha_logit[...] = jnp.log(alpha) - jnp.log1p(-alpha)
        means.append(float(jnp.mean(alpha)))
    return means


def stage1_train_config(cfg) -> TrainConfig:
    """The optimiser schedule of a stage-1 run (router and alpha) from the preset's Stage1Config."""
    return TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=max(cfg.steps // 10, 1), grad_clip=1.0
    )


def train_router(run_dir: str, preset: Preset, run: RunSpec, captured: dict, *, stop_after=None) -> dict:
    """Stage 1 for one SLA2 run (one sparsity, alpha granularity, linear scope): soft top-k in the form
    run.router_routing (configs.ROUTER_FORMS), MSE to dense attention."""
    if is_done(run_dir):
        return read_done(run_dir)
    cfg = preset.stage1
    routers = RouterSet(preset, run)
    if set_routing(routers, run.router_routing) != len(routers.layers):
        raise ValueError("stage 1 needs sla2_jax.SLA2Attention layers with a `routing` attribute")
    tcfg = stage1_train_config(cfg)
    alpha_init = init_alpha_least_squares(routers, captured) if run.alpha in ("block", "head") else None
    optimizer = make_optimizer(routers, tcfg, STAGE1_TRAINABLE)
    mngr = _manager(run_dir)
    start = _resume(mngr, routers, optimizer)
    S = captured["q"][0].shape[0]
    rng = np.random.default_rng(1234)
    orders = [rng.permutation(S) for _ in range((cfg.steps * cfg.batch_size) // S + 2)]
    order = np.concatenate(orders)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0, losses = time.time(), []
    bar = tqdm(
        range(start, end),
        desc=f"stage1 {os.path.basename(run_dir)}",
        initial=start,
        total=cfg.steps,
        dynamic_ncols=True,
        mininterval=2.0,
    )
    first_loss, curve = None, []
    for step in bar:
        idx = jnp.asarray(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        pick = lambda name: tuple(x[idx] for x in captured[name])
        loss = _router_step(routers, optimizer, pick("q"), pick("k"), pick("v"), pick("o"))
        losses.append(loss)
        if first_loss is None:
            first_loss = float(loss)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            curve.append([step + 1, float(jnp.mean(jnp.stack(losses[-cfg.log_every :])))])
            bar.set_postfix(rel_mse=f"{curve[-1][1]:.4f}")
    bar.close()
    save_checkpoint(mngr, end, routers, optimizer)
    if end < cfg.steps:
        return {"stopped_at": end}
    metrics = {
        "run": os.path.basename(run_dir),
        "steps": cfg.steps,
        "first_rel_mse": first_loss,
        "final_rel_mse": float(jnp.mean(jnp.stack(losses[-cfg.log_every :]))) if losses else None,
        "rel_mse_curve": curve,
        "alpha_init": alpha_init,
        "seconds": time.time() - t0,
    }
    write_json(os.path.join(run_dir, "done.json"), metrics)
    return metrics


def load_router(run_dir: str, preset: Preset, run: RunSpec, model: VideoDiT) -> None:
    """Copy a finished stage-1 run's router and alpha into the attention cores of `model` (in place)."""
    routers = RouterSet(preset, run)
    load_params(run_dir, routers)
    for blk, layer in zip(model.blocks, routers.layers):
        transfer_params(layer, blk.attn.core)
