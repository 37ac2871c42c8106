"""experiments.timing.in_model_seconds: the model calls fn `layers` times on distinct inputs, fn traced once."""

import jax.numpy as jnp

from experiments.timing import in_model_seconds


def test_in_model_traces_fn_once_and_returns_seconds_per_call():
    traces = []

    def fn(x, y):
        traces.append(x.shape)  # runs at trace time only
        return x @ y

    sets = [(jnp.full((8, 8), float(i)), jnp.eye(8)) for i in range(3)]
    seconds = in_model_seconds(fn, sets, layers=5, warmup=1, iters=2)
    assert len(traces) == 1, traces
    assert 0 < seconds < 1.0
