"""The developer tools in experiments/dev import and parse their arguments on CPU, and the folder's README names
each of them, so that a change of the kernels' API cannot break them silently (their checks run on a GPU)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax.numpy as jnp
import pytest
from helpers import lowered_for_cuda

DEV = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "dev"
MODULES = sorted(p.stem for p in DEV.glob("*.py") if p.stem != "__init__")
# tools whose main() parses sys.argv with argparse: `--help` prints and exits without touching a device
WITH_HELP = (
    "attention_geometry",
    "autotune_kernels",
    "check_int8_gpu",
    "check_kernels_gpu",
    "check_mosaic_library",
    "probe_int8_epilogue",
    "probe_int8_front",
    "probe_mosaic_dkv",
    "probe_mosaic_dq",
    "probe_mosaic_fp8",
    "probe_mosaic_int8",
    "probe_mosaic_sparse",
    "probe_prep_bwd",
    "profile_mosaic",
    "profile_router",
    "sass_report",
    "stage_profile",
)


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    importlib.import_module(f"experiments.dev.{name}")


@pytest.mark.parametrize("name", WITH_HELP)
def test_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"experiments.dev.{name}")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_readme_names_every_tool():
    readme = (DEV / "README.md").read_text()
    for name in MODULES:
        assert f"`{name}.py`" in readme, f"experiments/dev/README.md has no line for {name}.py"


def test_not_packaged():
    """pyproject's package search ships the library and the kernels only: experiments/ (dev tools included) runs
    from the repository."""
    import tomllib

    with open(DEV.parents[1] / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include and not any(name.startswith("experiments") for name in include), include


def test_kernel_changes_of_stage_profile():
    """stage_profile --kernel: fields and launch entries become a validated KernelConfig; unknown fields refused."""
    from experiments.dev import stage_profile

    changes = stage_profile.parse_kernel_changes(["loop=pipelined", "outputs_in_ring=false", "launch.dq=8/2/128",
                                                  "forward=triton"])
    config = stage_profile.kernel_config((1, 2, 1000, 64), jnp.bfloat16, changes)
    assert (config.loop, config.outputs_in_ring, config.forward) == ("pipelined", False, "triton")
    assert tuple(config.launch_params("dq")) == (8, 2, 128)
    with pytest.raises(SystemExit):
        stage_profile.parse_kernel_changes(["no_such_field=1"])


def test_launch_entries_in_kernel_changes():
    """One syntax in every tool: launch.KERNEL=W/S/R items of the benchmark's --kernel (and of check_phi_in_kernels'
    kernel: forms) set those launch entries and keep the others; bad entries are refused naming the item."""
    from experiments import benchmark
    from experiments.dev import check_phi_in_kernels as tool
    from pallas_kernels.config import Launch

    base = tool.heuristic_config(1000, 128, jnp.bfloat16).replace(launch=(("fwd", Launch(8, 3, 64)),))
    changes = tool.kernel_fields("kernel:launch.dkv=8/2/64,launch.dq=4/1/128,loop=pipelined")
    assert changes == benchmark.kernel_changes("launch.dkv=8/2/64,launch.dq=4/1/128,loop=pipelined", reserved=())
    config = benchmark.with_kernel_changes(base, changes)
    assert [tuple(config.launch_params(k)) for k in ("dkv", "dq", "fwd")] == [(8, 2, 64), (4, 1, 128), (8, 3, 64)]
    assert config.loop == "pipelined"
    assert benchmark.with_kernel_changes(base, tool.kernel_fields("kernel:loop=pipelined")).launch == base.launch
    for bad in ("kernel:launch.nope=8/2/64", "kernel:launch.dkv=8/2", "kernel:launch.dkv=8,2,64", "kernel:launch=1",
                "launch:dkv=8/2/64", "other"):
        with pytest.raises(ValueError):
            tool.kernel_fields(bad)
    _, chosen = benchmark.kernel_config((1, 2, 1000, 64), changes={"launch": {"dq": Launch(4, 1, 128)}})
    assert tuple(chosen.launch_params("dq")) == (4, 1, 128)


def test_autotune_prints_launch_table_entries():
    from experiments.dev import autotune_kernels

    lines = autotune_kernels.table_lines({"fwd": (8, 3, 64)}, 128, 128, 64)
    assert lines == ['        ("fwd", 128, 128, 64): Launch(8, 3, 64),']
    config = autotune_kernels.with_launch(autotune_kernels.heuristic_config(1000, 128, jnp.bfloat16), "dq", (4, 1, 32))
    assert tuple(config.launch_params("dq")) == (4, 1, 32)


def test_probe_mosaic_sparse_kernels_lower_for_cuda():
    """The Mosaic forward calls of probe_mosaic_sparse (plain, fused epilogue, INT8 under a loop variant) lower for
    CUDA on CPU: their arguments match the kernels' signatures and KernelConfig."""
    import functools

    import numpy as np

    from experiments.dev import probe_mosaic_sparse as probe
    from experiments.dev.common import uniform_lut
    from pallas_kernels import quantize

    rng = np.random.default_rng(0)
    b, n, h, d = 1, 1000, 2, 64
    nq, nk = -(-n // 128), -(-n // 64)
    q = jnp.zeros((b, n, h, d), jnp.bfloat16)
    lut = uniform_lut(rng, b, h, nq, nk, 3)
    linear = probe.random_linear_inputs(rng, b, n, h, d, nq, jnp.bfloat16)[:4]
    keys = quantize.QuantisedKeys(jnp.zeros((b, n, h, d), jnp.int8), jnp.ones((b, h, nk)), jnp.zeros((b, h, d)))
    def int8(q, k, v, lut, **changes):
        return probe.mf.sparse_attention_mosaic_int8(q, k, v, lut, keys, config=probe.config(**changes))

    calls = {
        "plain": (probe.sparse_attention_mosaic, (q, q, q, lut)),
        "fused": (lambda *a: probe.fused(*a, outputs=("o", "lse")), (q, q, q, lut, linear)),
        "int8_pipelined": (functools.partial(int8, **probe.LOOP_VARIANTS["pipelined"]), (q, q, q, lut)),
    }
    for name, (fn, args) in calls.items():
        text = lowered_for_cuda(fn, *args)
        assert "mosaic" in text.lower(), name


def test_attention_geometry_orders_and_chunked_core():
    import jax
    import numpy as np

    from experiments.dev import attention_geometry as geo

    orders = geo.token_orders((8, 4, 8))
    for perm in orders.values():
        assert sorted(perm.tolist()) == list(range(8 * 4 * 8))
    t, h, w = np.unravel_index(orders["tiles"][:64], (8, 4, 8))  # the first key block of 64 is one 4x4x4 cube
    assert set(t) == set(h) == set(w) == {0, 1, 2, 3}
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 256, 2, 16))
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(geo.chunked_dense_core(q, k, v, chunk=64), ref, atol=1e-5)
