"""Timing and memory helpers: median wall time of a synchronised jitted call, compiled peak memory."""

from __future__ import annotations

import statistics
import time

import jax


def time_samples(fn, *args, warmup: int = 2, iters: int = 20) -> list[float]:
    """Seconds of each of `iters` calls fn(*args) after `warmup` calls, each synchronised with block_until_ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def time_fn(fn, *args, warmup: int = 2, iters: int = 20) -> float:
    """Median seconds of fn(*args) (see time_samples)."""
    return statistics.median(time_samples(fn, *args, warmup=warmup, iters=iters))


def pipelined_seconds(fn, *args, calls: int = 8, repeats: int = 10, warmup: int = 2) -> float:
    """Median over `repeats` of the seconds per call of `calls` calls fn(*args) issued back to back and synchronised
    once at the end (jax.block_until_ready on the last output; the stream runs them in order). The host's dispatch
    of one call overlaps the device work of the previous one, as it does for the layers of a jitted model step, so
    this is the device time a call costs in a pipeline; time_fn's single synchronised call adds the dispatch and
    synchronisation latency (~0.1-0.4 ms on the GPU) to every sample."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def compiled_memory_bytes(jitted, *args) -> int | None:
    """Peak device memory of one call estimated by the compiler: arguments + outputs + temporaries (bytes)."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                   - stats.alias_size_in_bytes)
    except Exception:  # some backends give no analysis
        return None


def in_model_seconds(fn, arg_sets, *, layers: int = 30, warmup: int = 2, iters: int = 10) -> float:
    """Seconds per call when a model makes `layers` calls of fn in one jitted function, as the attention layers of
    a DiT step do: call i takes arg_sets[i % len(arg_sets)] (distinct inputs, so no call can be shared); the first
    element of every output leaf is returned so no call is dropped. Median over `iters` synchronised runs of the
    whole function, divided by `layers`: the host's dispatch and synchronisation are paid once per step, not per
    call. arg_sets: a list of argument tuples (device arrays); give `layers` of them where memory allows.
    fn is jitted once and called inside the model's jit, so it is traced and lowered once, not `layers` times (on
    CPU, 10 calls of the pallas module's gradient lowered in 3.1 s instead of 23.8 s); XLA inlines the nested calls,
    so the compiled program is that of `layers` inline calls."""
    fn = jax.jit(fn)

    def model(sets):
        firsts = []
        for i in range(layers):
            out = fn(*sets[i % len(sets)])
            firsts += [jax.numpy.ravel(x)[0].astype(jax.numpy.float32) for x in jax.tree_util.tree_leaves(out)]
        return jax.numpy.stack(firsts)

    return time_fn(jax.jit(model), list(arg_sets), warmup=warmup, iters=iters) / layers
