"""Wan2.1 weights from and to the official safetensors layout.

The official checkpoints (e.g. `Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors`, or the 14B model's
shards `diffusion_pytorch_model-0000k-of-0000n.safetensors` with an `.index.json`) name tensors after the
PyTorch modules of `wan/modules/model.py`. This module maps every parameter of `WanModel` to that name:

    ours (NNX path)                               official name                      transform
    patch_embedding.kernel (C*pt*ph*pw, dim)      patch_embedding.weight (dim,C,pt,ph,pw)  reshape + transpose
    text_embedding.fc1 / fc2 .kernel              text_embedding.0 / .2 .weight       (in,out) <- (out,in)
    time_embedding.fc1 / fc2 .kernel              time_embedding.0 / .2 .weight       transpose
    time_projection.kernel                        time_projection.1.weight            transpose
    blocks.i.{self_attn,cross_attn}.{q,k,v,o}.kernel  same name, .weight               transpose
    blocks.i.{self_attn,cross_attn}.norm_{q,k}.weight same                            -
    blocks.i.norm3.{weight,bias}, blocks.i.modulation (1,6,dim)  same                 -
    blocks.i.ffn.fc1 / fc2 .kernel                blocks.i.ffn.0 / .2 .weight         transpose
    head.head.kernel, head.modulation (1,2,dim)   head.head.weight, head.modulation   transpose / -
    (every .bias keeps its name and shape)

Parameters of the swappable attention core (`blocks.i.self_attn.attn.*`: SLA2's router w_q, w_k and alpha,
SLA's Proj) do not exist in the official checkpoints. They are named by their NNX path, loaded when present
(a checkpoint written by `save_wan_checkpoint` of an SLA2 model) and otherwise kept at their initial values
(identity router = the SLA router; reported in the returned `LoadReport.kept_at_init`).

The diffusers layout (`WanTransformer3DModel`, e.g. the Hub's `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`, whose
`transformer/` holds `config.json`, `diffusion_pytorch_model-0000k-of-0000n.safetensors` and
`diffusion_pytorch_model.safetensors.index.json`) stores the same tensors in the same PyTorch layout under other
names (`layout="diffusers"`):

    official                                diffusers
    text_embedding.0 / .2                   condition_embedder.text_embedder.linear_1 / linear_2
    time_embedding.0 / .2                   condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                       condition_embedder.time_proj
    blocks.i.self_attn / cross_attn         blocks.i.attn1 / attn2, with q, k, v, o -> to_q, to_k, to_v, to_out.0
    blocks.i.norm3 (cross-attention norm)   blocks.i.norm2
    blocks.i.modulation                     blocks.i.scale_shift_table
    blocks.i.ffn.0 / .2                     blocks.i.ffn.net.0.proj / ffn.net.2
    head.head / head.modulation             proj_out / scale_shift_table
    patch_embedding, norm_q, norm_k         unchanged

`load_diffusers_transformer` builds the model from the `config.json` beside the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.wan.safetensors_io import SafetensorsFile, save_file

LAYOUTS = ("official", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

_RENAMES = {"fc1": "0", "fc2": "2"}   # Sequential indices of text_embedding, time_embedding and ffn
_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_DIFFUSERS_BLOCK = {   # name inside blocks.i (prefix match on whole dotted components)
    "self_attn": "attn1", "cross_attn": "attn2", "norm3": "norm2", "modulation": "scale_shift_table",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_DIFFUSERS_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def diffusers_name(official: str) -> str:
    """The diffusers name of an official-layout tensor name, e.g. 'blocks.3.self_attn.o.weight' ->
    'blocks.3.attn1.to_out.0.weight'. Names of the attention-core extras pass through unchanged."""
    for old, new in _DIFFUSERS_TOP.items():
        if official == old or official.startswith(old + "."):
            return new + official[len(old):]
    parts = official.split(".")
    if parts[0] != "blocks" or len(parts) < 3:
        return official
    head, rest = parts[:2], parts[2:]
    if len(rest) > 1 and rest[1] == "attn" and rest[0] == "self_attn":   # extras: blocks.i.self_attn.attn.*
        return official
    for old, new in _DIFFUSERS_BLOCK.items():
        old_parts = old.split(".")
        if rest[:len(old_parts)] == old_parts:
            rest = new.split(".") + rest[len(old_parts):]
            break
    if rest[0] in ("attn1", "attn2") and len(rest) > 2 and rest[1] in _DIFFUSERS_ATTN:
        rest = [rest[0]] + _DIFFUSERS_ATTN[rest[1]].split(".") + rest[2:]
    return ".".join(head + rest)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One model parameter and where it lives in a checkpoint layout."""

    path: tuple                # NNX path, e.g. ('blocks', 0, 'self_attn', 'q', 'kernel')
    name: str                  # checkpoint name, e.g. 'blocks.0.self_attn.q.weight' (official layout)
    kind: str                  # 'copy', 'linear' (transpose), 'conv3d' (patch embedding), 'extra' (ours only)
    shape: tuple               # shape in the checkpoint


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    kept_at_init: list[str]    # 'extra' parameters absent from the checkpoint
    layout: str = "official"


def _get(variable):
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable, value):
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def _params(model: nnx.Module):
    """(path, nnx.Param) pairs of the model, in graph order."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


def _spec(model, path: tuple, shape: tuple, layout: str = "official") -> ParamSpec:
    keys = [str(p) for p in path]
    if len(keys) > 3 and keys[0] == "blocks" and keys[2] == "self_attn" and keys[3] == "attn":
        return ParamSpec(path, ".".join(keys), "extra", shape)
    if keys == ["patch_embedding", "kernel"]:
        pt, ph, pw = model.cfg.patch_size
        return ParamSpec(path, "patch_embedding.weight", "conv3d",
                         (shape[1], shape[0] // (pt * ph * pw), pt, ph, pw))
    if keys[0] == "time_projection":
        keys = ["time_projection", "1"] + keys[1:]
    if keys[0] in ("text_embedding", "time_embedding") or (len(keys) > 2 and keys[2] == "ffn"):
        keys = [_RENAMES.get(k, k) for k in keys]
    if keys[-1] == "kernel":
        name, kind, shape = ".".join(keys[:-1] + ["weight"]), "linear", (shape[1], shape[0])
    else:
        name, kind = ".".join(keys), "copy"
    return ParamSpec(path, diffusers_name(name) if layout == "diffusers" else name, kind, shape)


def param_specs(model: nnx.Module, layout: str = "official") -> list[ParamSpec]:
    """Every parameter of a `WanModel` with its checkpoint name (in `layout`), kind and checkpoint shape."""
    _check_layout(layout)
    return [_spec(model, path, tuple(_get(var).shape), layout) for path, var in _params(model)]


def _to_checkpoint(spec: ParamSpec, value: np.ndarray) -> np.ndarray:
    if spec.kind == "linear":
        return np.ascontiguousarray(value.T)
    if spec.kind == "conv3d":
        return np.ascontiguousarray(value.T.reshape(spec.shape))
    return value


def _from_checkpoint(spec: ParamSpec, value: np.ndarray) -> np.ndarray:
    if spec.kind == "linear":
        return value.T
    if spec.kind == "conv3d":
        return value.reshape(spec.shape[0], -1).T
    return value


def wan_state_dict(model: nnx.Module, *, include_extra: bool = True, layout: str = "official") -> dict[str, np.ndarray]:
    """The model's parameters as {checkpoint name in `layout`: numpy array in the PyTorch layout}."""
    out = {}
    for spec, (_, var) in zip(param_specs(model, layout), _params(model)):
        if spec.kind == "extra" and not include_extra:
            continue
        out[spec.name] = _to_checkpoint(spec, np.asarray(_get(var)))
    return out


def save_wan_checkpoint(model: nnx.Module, path: str | os.PathLike, *, include_extra: bool = True,
                        layout: str = "official") -> None:
    """Write the model as one safetensors file in the official (or diffusers) Wan2.1 layout."""
    save_file(wan_state_dict(model, include_extra=include_extra, layout=layout), path, metadata={"format": "pt"})


def diffusers_config(cfg) -> dict:
    """The `config.json` of diffusers' WanTransformer3DModel for a `WanConfig` (T2V: no image embedder)."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim,
            "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
            "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def save_diffusers_transformer(model: nnx.Module, directory: str | os.PathLike, *, max_shard_bytes: int | None = None,
                               include_extra: bool = False) -> list[str]:
    """Write `model` as diffusers writes a WanTransformer3DModel: `config.json` and either one
    `diffusion_pytorch_model.safetensors` or, when the tensors exceed `max_shard_bytes`, shards
    `diffusion_pytorch_model-0000k-of-0000n.safetensors` with `diffusion_pytorch_model.safetensors.index.json`.
    Returns the weight files written."""
    os.makedirs(directory, exist_ok=True)
    tensors = wan_state_dict(model, include_extra=include_extra, layout="diffusers")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(diffusers_config(model.cfg), f, indent=2)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
        return [DIFFUSERS_WEIGHTS]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        files.append(file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, DIFFUSERS_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return files


class _Checkpoint(Mapping):
    """name -> np.ndarray over one or more safetensors files (tensors read lazily, memory-mapped)."""

    def __init__(self, files: list[str], weight_map: Mapping[str, str] | None = None, index: str | None = None):
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for file in files:
            handle = SafetensorsFile(file)
            for name in handle:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is in both {self._where[name].path} and {file}")
                self._where[name] = handle
        if weight_map is not None:   # the index must tell the truth about every tensor it lists
            wrong = [f"{name} (index: {shard}, found in "
                     f"{os.path.basename(self._where[name].path) if name in self._where else 'no shard'})"
                     for name, shard in sorted(weight_map.items())
                     if name not in self._where or os.path.basename(self._where[name].path) != os.path.basename(shard)]
            if wrong:
                raise ValueError(f"shard index {index} does not match its shards for {len(wrong)} tensors: "
                                 + ", ".join(wrong))

    def shape(self, name: str) -> tuple:
        return self._where[name].shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _from_index(index: str) -> _Checkpoint:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"shard index {index} is not JSON with a 'weight_map' ({type(err).__name__}: {err})") from None
    base = os.path.dirname(os.fspath(index))
    files = sorted({os.path.join(base, shard) for shard in weight_map.values()})
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise ValueError(f"shard index {index} names shard files that do not exist: "
                         + ", ".join(os.path.basename(f) for f in absent))
    return _Checkpoint(files, weight_map, index)


def resolve_weights_dir(path) -> str:
    """The folder that holds a model's weights: `path/transformer` for a diffusers pipeline folder (one with a
    `transformer/` subfolder), else `path`."""
    sub = os.path.join(path, "transformer")
    return sub if os.path.isdir(sub) else os.fspath(path)


def open_checkpoint(path) -> _Checkpoint:
    """A lazy name -> array mapping for a .safetensors file, a shard index (.json with a "weight_map"), a list of
    files, or a folder: a diffusers pipeline folder (its `transformer/`), a folder with one `*.index.json`
    (its shards, checked against the index), or a folder of .safetensors files (all of them)."""
    if isinstance(path, (list, tuple)):
        return _Checkpoint([os.fspath(p) for p in path])
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = resolve_weights_dir(path)
        indexes = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
        if DIFFUSERS_INDEX in indexes:
            return _from_index(os.path.join(folder, DIFFUSERS_INDEX))
        if len(indexes) == 1:
            return _from_index(os.path.join(folder, indexes[0]))
        if len(indexes) > 1:
            raise ValueError(f"{folder} holds several shard indexes ({', '.join(indexes)}): pass one of them")
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no .safetensors files in directory {folder}")
        return _Checkpoint(files)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".json"):
        return _from_index(path)
    return _Checkpoint([path])


def detect_layout(names) -> str:
    """'diffusers' if the tensor names are diffusers' (condition_embedder.*, blocks.i.attn1.*), 'official' if
    they are Wan's (time_embedding.*, blocks.i.self_attn.*); ValueError naming a few names otherwise."""
    names = list(names)
    diffusers = any(n.startswith("condition_embedder.") or ".attn1." in n or n == "proj_out.weight" for n in names)
    official = any(n.startswith(("time_embedding.", "text_embedding.", "head.head.")) or ".self_attn.q." in n
                   for n in names)
    if diffusers != official:
        return "diffusers" if diffusers else "official"
    raise ValueError("cannot tell the checkpoint layout from its tensor names "
                     f"({'both' if diffusers else 'neither'} official and diffusers names; e.g. "
                     f"{', '.join(sorted(names)[:4])}); pass layout='official' or 'diffusers'")


def load_wan_checkpoint(model: nnx.Module, path, *, strict: bool = True, layout: str = "auto") -> LoadReport:
    """Load Wan2.1 safetensors weights (official or diffusers layout; "auto" tells them by their names) into
    `model` in place; `path` as in `open_checkpoint`. See `load_wan_state_dict` for the checks."""
    tensors = open_checkpoint(path)
    return load_wan_state_dict(model, tensors, strict=strict, source=str(path), layout=layout)


def load_wan_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, strict: bool = True,
                        source: str = "state dict", layout: str = "official") -> LoadReport:
    """Load {checkpoint name: array in the PyTorch layout} into `model` in place, cast to each parameter's dtype.

    `layout`: "official", "diffusers" or "auto". Raises ValueError naming every problem at once, with the names
    of `layout`: tensors the model needs that are missing, shape mismatches ("name: expected (..), got (..)"),
    and, if `strict`, tensors the model does not use. Attention-core parameters ('extra', e.g. SLA2's router)
    may be absent: they keep their initial values. Nothing is written unless every check passes.
    """
    if layout == "auto":
        layout = detect_layout(tensors)
    _check_layout(layout)
    params = _params(model)
    specs = [_spec(model, p, tuple(_get(var).shape), layout) for p, var in params]
    missing, mismatched, kept = [], [], []
    for spec in specs:
        if spec.name not in tensors:
            (kept if spec.kind == "extra" else missing).append(spec.name)
            continue
        got = tuple(tensors.shape(spec.name)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[spec.name]))
        if got != tuple(spec.shape):
            mismatched.append(f"{spec.name}: expected {tuple(spec.shape)}, got {got}")
    used = {spec.name for spec in specs}
    unexpected = sorted(set(tensors) - used) if strict else []
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}), not used by the model "
                        f"(strict=False to ignore): {', '.join(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint {source} ({layout} layout) does not fit the model: " + " | ".join(problems))

    loaded = []
    for spec, (_, var) in zip(specs, params):
        if spec.name not in tensors:
            continue
        value = _from_checkpoint(spec, np.asarray(tensors[spec.name]))
        _set(var, jnp.asarray(value, dtype=_get(var).dtype))
        loaded.append(spec.name)
    return LoadReport(loaded=loaded, kept_at_init=kept, layout=layout)


def official_names(model: nnx.Module, layout: str = "official") -> list[str]:
    """Checkpoint names the model requires (in `layout`, without the attention-core extras)."""
    return [spec.name for spec in param_specs(model, layout) if spec.kind != "extra"]


def wan_config_from_diffusers(config: Mapping | str | os.PathLike, **overrides):
    """A `WanConfig` from diffusers' WanTransformer3DModel `config.json` (a dict, the file, or its folder).

    Only the text-to-video transformer is supported: a config with an image embedder (`image_dim`), added
    key/value projections (`added_kv_proj_dim`) or `pos_embed_seq_len` is refused, naming the field.
    `overrides` set WanConfig fields the file does not hold (text_len, attention, sla_config, dtype, ...).
    """
    from experiments.wan.model import WanConfig

    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(resolve_weights_dir(path), "config.json")
        with open(path) as f:
            config = json.load(f)
    unsupported = {k: config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                   if config.get(k) is not None}
    if unsupported:
        raise ValueError(f"diffusers config has {unsupported}: only the text-to-video transformer is supported")
    qk_norm = config.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"diffusers config has qk_norm={qk_norm!r}: only 'rms_norm_across_heads' or None")
    fields = dict(dim=config["num_attention_heads"] * config["attention_head_dim"], ffn_dim=config["ffn_dim"],
                  num_heads=config["num_attention_heads"], num_layers=config["num_layers"],
                  patch_size=tuple(config.get("patch_size", (1, 2, 2))), in_dim=config.get("in_channels", 16),
                  out_dim=config.get("out_channels") or config.get("in_channels", 16),
                  text_dim=config.get("text_dim", 4096), freq_dim=config.get("freq_dim", 256),
                  eps=config.get("eps", 1e-6), qk_norm=qk_norm is not None,
                  cross_attn_norm=config.get("cross_attn_norm", True))
    fields.update(overrides)
    return WanConfig(**fields)


def load_diffusers_transformer(path, *, rngs: nnx.Rngs | None = None, strict: bool = True, **overrides):
    """(model, LoadReport): a `WanModel` built from the diffusers `config.json` in `path` (a pipeline folder or
    its `transformer/` folder) and loaded from the safetensors beside it (single file or sharded with the index).
    `overrides` as in `wan_config_from_diffusers` (e.g. text_len, attention, sla_config, dtype, param_dtype)."""
    from experiments.wan.model import WanModel

    cfg = wan_config_from_diffusers(path, **overrides)
    model = WanModel(cfg, rngs=rngs or nnx.Rngs(0))
    report = load_wan_checkpoint(model, resolve_weights_dir(path), strict=strict, layout="diffusers")
    return model, report
