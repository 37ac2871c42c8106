"""Kernel fingerprints: normalised jaxprs of every kernel kind (Triton and Mosaic, bf16/f32, complement/all,
D 64/128, fused and branches, forward and forward+backward, int8 / int8_fp8, the fused kernels without phi arrays
(feature_map, with and without key_block_sums), front end, block selection) and of the library's pallas path
(sla2_attention: routing, states and fused kernel).

    python -m experiments.dev.kernel_fingerprints OUT.json          # before and after a refactor
    python -m experiments.dev.kernel_fingerprints --compare BEFORE.json AFTER.json

Writes {kind: sha256 prefix} to OUT.json and the normalised texts to OUT.json.texts.json (kernel names, source
locations and custom_vjp function names removed), so that a refactor can be checked to leave every kernel's
jaxpr unchanged. Only traced, never run: the Mosaic kinds trace on a CPU host too (JAX_PLATFORMS=cpu by default).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import (  # noqa: E402
    KernelConfig,
    front_end,
    key_block_sums,
    sla2_fused_attention,
    sla2_fused_attention_lowbit,
    sparse_linear_attention,
    sparse_linear_attention_lowbit,
)
from sla2_jax.feature_maps import PHI_FUNCTIONS  # noqa: E402

N, TOPK = 1000, 3  # ragged N: the masked last blocks are traced too


def normalised(text: str) -> str:
    """A jaxpr's text without kernel names, source locations and custom_vjp function names."""
    text = re.sub(r"name_and_src_info=[^\n]*?(?= [a-z_]+=|\]$)", "", text)
    text = re.sub(r"name=[A-Za-z0-9_.<>-]+", "", text)
    text = re.sub(r"/[\w/.-]+\.py:\d+(:\d+)?", "", text)
    return re.sub(r"\b(fwd|bwd)=\w+", "", text)


def fingerprint(fn, args) -> tuple[str, str]:
    """(sha256 prefix, normalised jaxpr text) of fn(*args)."""
    text = normalised(str(jax.make_jaxpr(fn)(*args)))
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def inputs(d: int, dtype, h: int = 2):
    """(q, k, v, phi(q), phi(k)) (1, N, H, D) dtype, an ascending LUT (block_q 128, block_k 64), alpha 0.7."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, N, h, d)), dtype) for _ in range(3))
    qp, kp = (jax.nn.softmax(x.astype(jnp.float32), -1).astype(dtype) for x in (q, k))
    nq, nk = -(-N // 128), -(-N // 64)
    lut = np.sort(np.stack([rng.permutation(nk)[:TOPK] for _ in range(h * nq)]), -1).reshape(1, h, nq, TOPK)
    return (q, k, v, qp, kp), jnp.asarray(lut, jnp.int32), jnp.full((1, h, nq), 0.7, jnp.float32)


def total(fn):
    """x -> the float32 sum of fn(x)."""
    return lambda *x: jnp.sum(fn(*x).astype(jnp.float32))


def branches_total(fn):
    """x -> sum(o_s) + sum(o_l) / 2 of fn(x) = (o_s, o_l), in float32 (the two cotangents differ)."""

    def loss(*x):
        o_s, o_l = fn(*x)
        return jnp.sum(o_s.astype(jnp.float32)) + jnp.sum(o_l.astype(jnp.float32) * 0.5)

    return loss


def outputs_total(fn):
    """x -> the float32 sum over every output of fn(x) that is not None."""
    return lambda *x: sum(jnp.sum(y.astype(jnp.float32)) for y in fn(*x) if y is not None)


def kernel_cases():
    """(tag, dtype, d, kw) of every kernel case: Triton bf16 / f32 and Mosaic bf16, both scopes, D 64 / 128; kw
    holds the block sizes, scope, interpret flag and KernelConfig the entry points take."""
    for path in ("triton", "mosaic"):
        config = KernelConfig(forward=path, backward=path)
        for scope in ("complement", "all"):
            for dtype in (jnp.bfloat16, jnp.float32) if path == "triton" else (jnp.bfloat16,):
                for d in (64, 128):
                    kw = dict(block_q=128, block_k=64, linear_scope=scope, interpret=path == "triton", config=config)
                    yield f"{path}/{scope}/{jnp.dtype(dtype).name}/d{d}", dtype, d, kw


def attention_kinds():
    """{tag: (fn, args)} of the attention entry points, forward and forward+backward."""
    out = {}
    for tag, dtype, d, kw in kernel_cases():
        qkv, lut, alpha = inputs(d, dtype)
        fused = lambda *x, lut=lut, kw=kw: sla2_fused_attention(*x[:5], lut, x[5], **kw)  # noqa: E731
        branches = lambda *x, lut=lut, kw=kw: sparse_linear_attention(*x, lut, **kw)  # noqa: E731
        out[f"{tag}/fused_fwd"] = (fused, (*qkv, alpha))
        out[f"{tag}/fused_grad"] = (jax.grad(total(fused), argnums=tuple(range(6))), (*qkv, alpha))
        out[f"{tag}/branches_fwd"] = (branches, qkv)
        out[f"{tag}/branches_grad"] = (jax.grad(branches_total(branches), argnums=tuple(range(5))), qkv)
        if dtype != jnp.bfloat16 or kw["linear_scope"] != "complement":
            continue
        for quant in ("int8", "int8_fp8"):
            qkw = dict(kw, quant=quant)

            def low(*x, lut=lut, kw=qkw):
                return sla2_fused_attention_lowbit(*x[:5], lut, x[5], **kw)

            def low_branches(*x, lut=lut, kw=qkw):
                return sparse_linear_attention_lowbit(*x, lut, **kw)

            low_grad = jax.grad(total(low), argnums=tuple(range(6)))
            out[f"{tag}/{quant}_fused_fwd"] = (low, (*qkv, alpha))
            out[f"{tag}/{quant}_branches_fwd"] = (low_branches, qkv)
            out[f"{tag}/{quant}_fused_grad"] = (low_grad, (*qkv, alpha))
    return out


def phi_kinds():
    """{tag: (fn, args)} of the fused kernels that apply phi themselves (feature_map; the library's 16-bit path),
    with the sums of key_block_sums given (as the library passes them) or made inside, forward and gradient."""
    out = {}
    for case, dtype, d, kernel_kw in kernel_cases():
        for name in ("softmax", "elu"):
            (q, k, v, _, _), lut, alpha = inputs(d, dtype)
            kw = dict(kernel_kw, feature_map=PHI_FUNCTIONS[name])  # also key_block_sums' keywords

            def fused(q, k, v, a, lut=lut, kw=kw, with_sums=False):
                stop = jax.lax.stop_gradient
                sums = key_block_sums(stop(k), stop(v), **kw)[0] if with_sums else None
                return sla2_fused_attention(q, k, v, None, None, lut, a, key_sums=sums, **kw)

            tag = f"phi/{case}/{name}"
            for sums in (False, True):
                fn = functools.partial(fused, with_sums=sums)
                suffix = "/key_sums" if sums else ""
                out[f"{tag}{suffix}/fwd"] = (fn, (q, k, v, alpha))
                out[f"{tag}{suffix}/grad"] = (jax.grad(total(fn), argnums=(0, 1, 2, 3)), (q, k, v, alpha))
    return out


def library_kinds():
    """{tag: (fn, args)} of sla2_jax.sla2_attention on the pallas backend (routing, states, fused kernel),
    bf16, both scopes, forward and gradient of q, k, v."""
    import sla2_jax as sla

    out = {}
    for path in ("triton", "mosaic"):
        for scope in ("complement", "all"):
            for d in (64, 128):
                (q, k, v, _, _), _, _ = inputs(d, jnp.bfloat16)
                config = sla.SLA2Config(topk_ratio=0.1, backend="pallas", linear_scope=scope,
                                        kernel=KernelConfig(forward=path, backward=path))
                fn = lambda q, k, v, config=config: sla.sla2_attention(q, k, v, config=config)  # noqa: E731
                tag = f"library/{path}/{scope}/d{d}"
                out[f"{tag}/fwd"] = (fn, (q, k, v))
                out[f"{tag}/grad"] = (jax.grad(total(fn), argnums=(0, 1, 2)), (q, k, v))
    return out


def front_end_kinds():
    """{tag: (fn, args)} of the router front end's kernels and the block selection."""
    out = {}
    for d in (64, 128):
        (q, k, *_), _, _ = inputs(d, jnp.bfloat16)
        for name in ("softmax", "elu", None):
            phi = PHI_FUNCTIONS.get(name)
            means_phi = lambda x, phi=phi: front_end.block_means_and_phi(  # noqa: E731
                x, 64, phi, interpret=True, pass_through=True)
            means_phi_plain = lambda x, phi=phi: front_end.block_means_and_phi(  # noqa: E731
                x, 64, phi, interpret=True)
            keys = lambda x, phi=phi: front_end.block_means_phi_int8(  # noqa: E731
                x, 64, phi, interpret=True, pass_through=True)
            queries = lambda x, mean, phi=phi: front_end.block_means_phi_int8_queries(  # noqa: E731
                x, 128, phi, mean, 0.127, interpret=True, pass_through=True)
            out[f"front/means_phi/{name}/d{d}"] = (means_phi, (k,))
            out[f"front/means_phi_grad/{name}/d{d}"] = (jax.grad(outputs_total(means_phi_plain)), (k,))
            out[f"front/int8_keys/{name}/d{d}"] = (keys, (k,))
            out[f"front/int8_queries/{name}/d{d}"] = (queries, (q, jnp.zeros((1, 2, d))))
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 8, 16)), jnp.float32)
    out["front/select"] = (lambda s: front_end.select_blocks(s, TOPK, N, 64, interpret=True), (scores,))
    return out


def write(path: str) -> None:
    result, texts = {}, {}
    for name, (fn, args) in {**attention_kinds(), **phi_kinds(), **library_kinds(), **front_end_kinds()}.items():
        try:
            result[name], texts[name] = fingerprint(fn, args)
        except Exception as e:  # noqa: BLE001 - a kind that does not trace on this jax is recorded as such
            result[name], texts[name] = f"ERROR {type(e).__name__}: {str(e)[:200]}", ""
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    with open(path + ".texts.json", "w") as f:
        json.dump(texts, f)
    errors = [k for k, v in result.items() if v.startswith("ERROR")]
    print(f"{len(result) - len(errors)} kinds traced; errors: {errors}")


def compare(before: str, after: str) -> None:
    with open(before) as f:
        a = json.load(f)
    with open(after) as f:
        b = json.load(f)
    traced = [k for k in a if not a[k].startswith("ERROR")]
    differ = [k for k in traced if a[k] != b.get(k)]
    print(f"{len(traced) - len(differ)} of {len(traced)} traced kinds identical; differ: {differ}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="where to write the fingerprints")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    args = p.parse_args(argv)
    if args.compare:
        compare(*args.compare)
    elif args.out:
        write(args.out)
    else:
        p.error("give OUT.json or --compare BEFORE AFTER")


if __name__ == "__main__":
    main()
