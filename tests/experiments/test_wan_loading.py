"""Wan2.1 checkpoints (experiments/wan/loading.py, safetensors_io.py): the safetensors format, the official
name layout, round trips, sharded checkpoints, and clear errors for bad checkpoints. Tiny shapes, CPU."""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from experiments.wan.loading import (load_wan_checkpoint, load_wan_state_dict, official_names,
                                     save_wan_checkpoint, wan_state_dict)
from experiments.wan.model import WanConfig, WanModel
from experiments.wan.safetensors_io import SafetensorsFile, load_file, save_file

TINY = WanConfig(dim=64, ffn_dim=96, num_heads=1, num_layers=2, text_dim=24, freq_dim=16, text_len=6,
                 dtype=jnp.float32, param_dtype=jnp.float32)


def _normal_flat(key, shape):
    """jax.random.normal(key, shape) float32, drawn flat and reshaped: the same values, but XLA CPU compiles a 5-D
    draw of these shapes in 2-9 s and a flat one in 0.2 s."""
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def _inputs(seed=0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = _normal_flat(kx, (1, TINY.in_dim, 2, 4, 6))
    return x, jnp.array([700.0]), jax.random.normal(kc, (1, 3, TINY.text_dim), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)


def forward(model):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, *_inputs())


def test_safetensors_round_trip_and_layout(tmp_path):
    tensors = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16),
        "c": np.arange(5, dtype=np.int64),
        "d": np.zeros((0, 3), np.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0
    assert header["b"]["dtype"] == "BF16" and header["a.weight"]["shape"] == [3, 4]
    assert header["__metadata__"] == {"format": "pt"}
    begin, end = header["a.weight"]["data_offsets"]
    np.testing.assert_array_equal(np.frombuffer(raw[8 + n + begin:8 + n + end], "<f4").reshape(3, 4),
                                  tensors["a.weight"])
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)
    assert SafetensorsFile(path).metadata == {"format": "pt"}


def test_safetensors_interop_with_the_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")   # not a dependency; checked where it is installed
    tensors = {"w": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
               "b": np.arange(4, dtype=np.float16)}
    save_file(tensors, tmp_path / "ours.safetensors")
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours = load_file(tmp_path / "theirs.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name], value)
        np.testing.assert_array_equal(ours[name], value)


def test_safetensors_rejects_corrupt_files(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        SafetensorsFile(path)
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="'x'"):
        SafetensorsFile(path)


def test_official_names_and_shapes():
    model = WanModel(TINY, rngs=nnx.Rngs(0))
    sd = wan_state_dict(model)
    d, f = TINY.dim, TINY.ffn_dim
    expected = {
        "patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, TINY.text_dim), "text_embedding.2.weight": (d, d),
        "time_embedding.0.weight": (d, TINY.freq_dim), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "blocks.0.self_attn.q.weight": (d, d), "blocks.0.self_attn.norm_q.weight": (d,),
        "blocks.1.cross_attn.o.bias": (d,), "blocks.1.cross_attn.norm_k.weight": (d,),
        "blocks.0.norm3.weight": (d,), "blocks.0.norm3.bias": (d,),
        "blocks.1.ffn.0.weight": (f, d), "blocks.1.ffn.2.weight": (d, f),
        "blocks.0.modulation": (1, 6, d), "head.head.weight": (4 * 16, d), "head.modulation": (1, 2, d),
    }
    for name, shape in expected.items():
        assert sd[name].shape == shape, name
    per_block = 27
    assert len(sd) == len(official_names(model)) == TINY.num_layers * per_block + 15
    # linear weights are stored (out, in): the transpose of the NNX kernel
    np.testing.assert_array_equal(sd["blocks.0.ffn.0.weight"], np.asarray(model.blocks[0].ffn.fc1.kernel[...]).T)


def test_checkpoint_round_trip(tmp_path):
    source = WanModel(TINY, rngs=nnx.Rngs(0))
    target = WanModel(TINY, rngs=nnx.Rngs(1))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_wan_checkpoint(source, path)
    want = forward(source)
    assert float(jnp.max(jnp.abs(forward(target) - want))) > 1e-2
    report = load_wan_checkpoint(target, path)
    assert len(report.loaded) == len(official_names(target)) and not report.kept_at_init
    np.testing.assert_array_equal(np.asarray(forward(target)), np.asarray(want))


def test_bf16_checkpoint_into_bf16_params(tmp_path):
    source = WanModel(TINY, rngs=nnx.Rngs(0))
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in wan_state_dict(source).items()}
    path = tmp_path / "bf16.safetensors"
    save_file(sd, path)
    target = WanModel(TINY.replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16), rngs=nnx.Rngs(1))
    load_wan_checkpoint(target, path)
    q = target.blocks[1].self_attn.q.kernel[...]
    assert q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q), sd["blocks.1.self_attn.q.weight"].T)


def test_patch_embedding_and_unpatchify_follow_the_conv3d_layout():
    """Tokens = Conv3d(kernel=stride=(1,2,2)) of the latent in the official weight layout, in (f, h, w) order;
    the head's channels are (pt, ph, pw, c), unpatchified as einsum('fhwpqrc->cfphqwr')."""
    model = WanModel(TINY.replace(num_layers=0), rngs=nnx.Rngs(0))
    sd = wan_state_dict(model)
    x, t, context = _inputs()
    tokens, e, _, _, _, grid = model.embed(x, t, context)
    w, b = sd["patch_embedding.weight"], sd["patch_embedding.bias"]
    xn = np.asarray(x)[0]                                           # (C, F, H, W)
    c, f, h, wd = xn.shape
    patches = xn.reshape(c, f, 1, h // 2, 2, wd // 2, 2)
    conv = np.einsum("cfphqwr,ocpqr->fhwo", patches, w) + b         # (F', H', W', dim)
    np.testing.assert_allclose(np.asarray(tokens)[0], conv.reshape(-1, TINY.dim), atol=1e-4, rtol=1e-4)
    head_out = np.asarray(model.head(tokens, e))[0]                 # (N, pt*ph*pw*c_out)
    u = head_out.reshape(*grid, 1, 2, 2, TINY.out_dim)
    want = np.einsum("fhwpqrc->cfphqwr", u).reshape(TINY.out_dim, f, h, wd)
    np.testing.assert_allclose(np.asarray(model.unembed(tokens, e, grid))[0], want, atol=1e-5)


def test_sharded_checkpoint_with_index(tmp_path):
    source = WanModel(TINY, rngs=nnx.Rngs(0))
    sd = wan_state_dict(source)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in (index, tmp_path):
        target = WanModel(TINY, rngs=nnx.Rngs(1))
        load_wan_checkpoint(target, path)
        np.testing.assert_array_equal(np.asarray(forward(target)), np.asarray(forward(source)))


def test_missing_tensor_is_named(tmp_path):
    sd = wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(0)))
    del sd["blocks.1.cross_attn.k.weight"]
    save_file(sd, tmp_path / "m.safetensors")
    model = WanModel(TINY, rngs=nnx.Rngs(1))
    before = np.asarray(model.blocks[0].self_attn.q.kernel[...])
    with pytest.raises(ValueError, match=r"missing tensors \(1\): blocks\.1\.cross_attn\.k\.weight"):
        load_wan_checkpoint(model, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(np.asarray(model.blocks[0].self_attn.q.kernel[...]), before)  # untouched


def test_wrong_shape_is_named_with_expected_and_got():
    sd = wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(0)))
    sd["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"].T        # (in, out): the classic mistake
    d, f = TINY.dim, TINY.ffn_dim
    with pytest.raises(ValueError, match=rf"blocks\.0\.ffn\.0\.weight: expected \({f}, {d}\), got \({d}, {f}\)"):
        load_wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(1)), sd)


def test_unexpected_tensor_is_named_unless_not_strict():
    sd = wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(0)))
    sd["blocks.7.self_attn.q.weight"] = np.zeros((TINY.dim, TINY.dim), np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\).*blocks\.7\.self_attn\.q\.weight"):
        load_wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(1)), sd)
    load_wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(1)), sd, strict=False)


def test_sla2_router_params_are_extras(tmp_path):
    sla = pytest.importorskip("sla2_jax")
    cfg = TINY.replace(attention="sla2", sla_config=sla.SLA2Config(block_q=16, block_k=16, topk_ratio=0.5,
                                                                   alpha="head", backend="xla"))
    official = wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(0)))
    model = WanModel(cfg, rngs=nnx.Rngs(1))
    report = load_wan_state_dict(model, official)                    # official files have no router params
    assert report.kept_at_init and all(".self_attn.attn." in name for name in report.kept_at_init)
    # a trained SLA2 model's router and alpha survive a save / load
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and "attn" in [str(p) for p in path]:
            node.set_value(node.get_value() + 0.25)
    save_wan_checkpoint(model, tmp_path / "sla2.safetensors")
    fresh = WanModel(cfg, rngs=nnx.Rngs(2))
    report = load_wan_checkpoint(fresh, tmp_path / "sla2.safetensors")
    assert not report.kept_at_init
    np.testing.assert_array_equal(np.asarray(forward(fresh)), np.asarray(forward(model)))


# --------------------------------------------------------------------------------------------------
# The diffusers layout (WanTransformer3DModel): names, sharded folders with their index, errors
# --------------------------------------------------------------------------------------------------
import os  # noqa: E402

from experiments.wan.loading import (DIFFUSERS_INDEX, detect_layout, diffusers_name,  # noqa: E402
                                     load_diffusers_transformer, open_checkpoint, param_specs,
                                     save_diffusers_transformer, wan_config_from_diffusers)

FIXTURE_MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "wan", "tiny_diffusers")


def test_diffusers_names():
    cases = {
        "patch_embedding.weight": "patch_embedding.weight",
        "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "blocks.3.self_attn.o.weight": "blocks.3.attn1.to_out.0.weight",
        "blocks.3.cross_attn.k.bias": "blocks.3.attn2.to_k.bias",
        "blocks.3.self_attn.norm_q.weight": "blocks.3.attn1.norm_q.weight",
        "blocks.12.norm3.bias": "blocks.12.norm2.bias",
        "blocks.0.modulation": "blocks.0.scale_shift_table",
        "blocks.0.ffn.0.weight": "blocks.0.ffn.net.0.proj.weight",
        "blocks.0.ffn.2.bias": "blocks.0.ffn.net.2.bias",
        "head.head.weight": "proj_out.weight",
        "head.modulation": "scale_shift_table",
        "blocks.1.self_attn.attn.w_q": "blocks.1.self_attn.attn.w_q",       # the SLA2 router: our own name
    }
    assert {name: diffusers_name(name) for name in cases} == cases


def test_diffusers_names_and_shapes_are_those_diffusers_writes():
    """Every name and shape the port asks for is in the checkpoint that diffusers itself wrote, and nothing more."""
    tensors = open_checkpoint(FIXTURE_MODEL)
    model = WanModel(wan_config_from_diffusers(FIXTURE_MODEL, text_len=16), rngs=nnx.Rngs(0))
    specs = {spec.name: spec.shape for spec in param_specs(model, "diffusers")}
    assert set(specs) == set(tensors)
    assert all(tuple(tensors.shape(name)) == tuple(shape) for name, shape in specs.items())
    assert detect_layout(tensors) == "diffusers"


def _diffusers_folder(tmp_path, max_shard_bytes=60_000):
    source = WanModel(TINY, rngs=nnx.Rngs(0))
    folder = tmp_path / "pipeline" / "transformer"
    files = save_diffusers_transformer(source, folder, max_shard_bytes=max_shard_bytes)
    return source, folder, files


def test_diffusers_sharded_round_trip(tmp_path):
    source, folder, files = _diffusers_folder(tmp_path)
    assert len(files) > 2 and (folder / DIFFUSERS_INDEX).exists()
    model, report = load_diffusers_transformer(tmp_path / "pipeline", rngs=nnx.Rngs(1), text_len=TINY.text_len,
                                               dtype=jnp.float32)
    assert report.layout == "diffusers" and model.cfg == TINY
    np.testing.assert_array_equal(np.asarray(forward(model)), np.asarray(forward(source)))
    # the same files through load_wan_checkpoint, the layout told from the names; a single unsharded file too
    target = WanModel(TINY, rngs=nnx.Rngs(2))
    assert load_wan_checkpoint(target, folder / DIFFUSERS_INDEX).layout == "diffusers"
    np.testing.assert_array_equal(np.asarray(forward(target)), np.asarray(forward(source)))
    single = tmp_path / "single"
    assert save_diffusers_transformer(source, single) == ["diffusion_pytorch_model.safetensors"]
    model, _ = load_diffusers_transformer(single, text_len=TINY.text_len, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(forward(model)), np.asarray(forward(source)))


def _rewrite_shard(folder, name, edit):
    """Rewrite the shard holding `name` with edit(tensors) applied (the index is left as it was)."""
    index = json.loads((folder / DIFFUSERS_INDEX).read_text())
    shard = folder / index["weight_map"][name]
    tensors = {k: np.array(v) for k, v in load_file(shard).items()}    # copies: the file is rewritten below
    edit(tensors)
    save_file(tensors, shard)


def test_diffusers_missing_tensor_is_named(tmp_path):
    _, folder, _ = _diffusers_folder(tmp_path)
    name = "blocks.1.attn2.to_k.weight"
    _rewrite_shard(folder, name, lambda t: t.pop(name))
    # the index still lists it: the index and its shards disagree, and the tensor is named
    with pytest.raises(ValueError, match=rf"does not match its shards for 1 tensors: {name} \(index: .*found in no shard"):
        load_diffusers_transformer(folder, text_len=TINY.text_len)
    # with the index fixed the model's own check names it
    index = json.loads((folder / DIFFUSERS_INDEX).read_text())
    del index["weight_map"][name]
    (folder / DIFFUSERS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"diffusers layout.*missing tensors \(1\): {name}$"):
        load_diffusers_transformer(folder, text_len=TINY.text_len)


def test_diffusers_misshapen_and_misnamed_tensors_are_named(tmp_path):
    _, folder, _ = _diffusers_folder(tmp_path)
    d, f = TINY.dim, TINY.ffn_dim
    bad = "blocks.0.ffn.net.0.proj.weight"
    _rewrite_shard(folder, bad, lambda t: t.update({bad: np.ascontiguousarray(t[bad].T)}))
    with pytest.raises(ValueError, match=rf"{bad.replace('.', '[.]')}: expected \({f}, {d}\), got \({d}, {f}\)"):
        load_diffusers_transformer(folder, text_len=TINY.text_len)

    _, folder, _ = _diffusers_folder(tmp_path / "second")
    good, wrong = "blocks.1.attn1.to_q.weight", "blocks.1.attn1.q.weight"     # an official-style name left over
    _rewrite_shard(folder, good, lambda t: t.update({wrong: t.pop(good)}))
    index = json.loads((folder / DIFFUSERS_INDEX).read_text())
    index["weight_map"][wrong] = index["weight_map"].pop(good)
    (folder / DIFFUSERS_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"missing tensors \(1\): {good}.*unexpected tensors \(1\).*{wrong}"):
        load_diffusers_transformer(folder, text_len=TINY.text_len)


def test_diffusers_index_naming_an_absent_shard_is_refused(tmp_path):
    _, folder, files = _diffusers_folder(tmp_path)
    os.remove(folder / files[1])
    with pytest.raises(ValueError, match=rf"names shard files that do not exist: {files[1]}"):
        load_diffusers_transformer(folder, text_len=TINY.text_len)
    (folder / DIFFUSERS_INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON with a 'weight_map'"):
        open_checkpoint(folder)


def test_diffusers_config_and_layout_errors():
    base = json.load(open(os.path.join(FIXTURE_MODEL, "transformer", "config.json")))
    cfg = wan_config_from_diffusers(base)
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.text_dim, cfg.freq_dim) == (128, 2, 2, 192, 32, 32)
    with pytest.raises(ValueError, match="image_dim"):
        wan_config_from_diffusers({**base, "image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(ValueError, match="qk_norm"):
        wan_config_from_diffusers({**base, "qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        detect_layout(["foo.weight", "bar.bias"])
    with pytest.raises(ValueError, match="layout="):
        load_wan_state_dict(WanModel(TINY, rngs=nnx.Rngs(0)), {}, layout="hub")
