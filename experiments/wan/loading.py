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
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.wan.safetensors_io import SafetensorsFile, save_file

_RENAMES = {"fc1": "0", "fc2": "2"}   # Sequential indices of text_embedding, time_embedding and ffn


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One model parameter and where it lives in the official layout."""

    path: tuple                # NNX path, e.g. ('blocks', 0, 'self_attn', 'q', 'kernel')
    name: str                  # checkpoint name, e.g. 'blocks.0.self_attn.q.weight'
    kind: str                  # 'copy', 'linear' (transpose), 'conv3d' (patch embedding), 'extra' (ours only)
    shape: tuple               # shape in the checkpoint


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    kept_at_init: list[str]    # 'extra' parameters absent from the checkpoint


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


def _spec(model, path: tuple, shape: tuple) -> ParamSpec:
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
        return ParamSpec(path, ".".join(keys[:-1] + ["weight"]), "linear", (shape[1], shape[0]))
    return ParamSpec(path, ".".join(keys), "copy", shape)


def param_specs(model: nnx.Module) -> list[ParamSpec]:
    """Every parameter of a `WanModel` with its checkpoint name, kind and checkpoint shape."""
    return [_spec(model, path, tuple(_get(var).shape)) for path, var in _params(model)]


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


def wan_state_dict(model: nnx.Module, *, include_extra: bool = True) -> dict[str, np.ndarray]:
    """The model's parameters as {official name: numpy array in the PyTorch layout}."""
    out = {}
    for spec, (_, var) in zip(param_specs(model), _params(model)):
        if spec.kind == "extra" and not include_extra:
            continue
        out[spec.name] = _to_checkpoint(spec, np.asarray(_get(var)))
    return out


def save_wan_checkpoint(model: nnx.Module, path: str | os.PathLike, *, include_extra: bool = True) -> None:
    """Write the model as one safetensors file in the official Wan2.1 layout."""
    save_file(wan_state_dict(model, include_extra=include_extra), path, metadata={"format": "pt"})


class _Checkpoint(Mapping):
    """name -> np.ndarray over one or more safetensors files (tensors read lazily, memory-mapped)."""

    def __init__(self, files: list[str]):
        self._where: dict[str, SafetensorsFile] = {}
        for file in files:
            handle = SafetensorsFile(file)
            for name in handle:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is in both {self._where[name].path} and {file}")
                self._where[name] = handle

    def shape(self, name: str) -> tuple:
        return self._where[name].shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def open_checkpoint(path) -> Mapping[str, np.ndarray]:
    """A lazy name -> array mapping for a .safetensors file, a shard index (.json with a "weight_map"),
    a directory of .safetensors files, or a list of files."""
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no .safetensors files in directory {path}")
    elif os.fspath(path).endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(os.fspath(path))
        files = sorted({os.path.join(base, shard) for shard in weight_map.values()})
    else:
        files = [os.fspath(path)]
    return _Checkpoint(files)


def load_wan_checkpoint(model: nnx.Module, path, *, strict: bool = True) -> LoadReport:
    """Load official-layout Wan2.1 safetensors weights into `model` in place; see `load_wan_state_dict`."""
    return load_wan_state_dict(model, open_checkpoint(path), strict=strict, source=str(path))


def load_wan_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, strict: bool = True,
                        source: str = "state dict") -> LoadReport:
    """Load {official name: array in the PyTorch layout} into `model` in place, cast to each parameter's dtype.

    Raises ValueError naming every problem at once: tensors the model needs that are missing, shape
    mismatches ("name: expected (..), got (..)"), and, if `strict`, tensors the model does not use.
    Attention-core parameters ('extra', e.g. SLA2's router) may be absent: they keep their initial values.
    Nothing is written unless every check passes.
    """
    params = _params(model)
    specs = [_spec(model, p, tuple(_get(var).shape)) for p, var in params]
    missing, mismatched, kept = [], [], []
    for spec in specs:
        if spec.name not in tensors:
            (kept if spec.kind == "extra" else missing).append(spec.name)
            continue
        got = tuple(np.shape(tensors[spec.name]))
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
        raise ValueError(f"checkpoint {source} does not fit the model: " + " | ".join(problems))

    loaded = []
    for spec, (_, var) in zip(specs, params):
        if spec.name not in tensors:
            continue
        value = _from_checkpoint(spec, np.asarray(tensors[spec.name]))
        _set(var, jnp.asarray(value, dtype=_get(var).dtype))
        loaded.append(spec.name)
    return LoadReport(loaded=loaded, kept_at_init=kept)


def official_names(model: nnx.Module) -> list[str]:
    """Checkpoint names the model requires (official layout, without the attention-core extras)."""
    return [spec.name for spec in param_specs(model) if spec.kind != "extra"]

