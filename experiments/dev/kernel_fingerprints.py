"""Kernel fingerprints: normalised jaxprs of every kernel kind (Triton and Mosaic, bf16/f32, complement/all,
D 64/128, fused and branches, forward and forward+backward, int8 / int8_fp8, front end, block selection).

    python -m experiments.dev.kernel_fingerprints new OUT.json

Writes {kind: sha256 prefix} to OUT.json and the normalised texts to OUT.json.texts.json (kernel names, source
locations and custom_vjp function names removed), so that a refactor can be checked to leave every kernel's
jaxpr unchanged: run it before and after and compare the two files.
"""
import hashlib, json, re, sys, os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import front_end as prep, KernelConfig
from pallas_kernels import sla2_fused_attention, sparse_linear_attention, sla2_fused_attention_lowbit, sparse_linear_attention_lowbit
from sla2_jax.feature_maps import PHI_FUNCTIONS

def norm(text):
    text = re.sub(r"name_and_src_info=[^\n]*?(?= [a-z_]+=|\]$)", "", text)
    text = re.sub(r"name=[A-Za-z0-9_.<>-]+", "", text)
    text = re.sub(r"/[\w/.-]+\.py:\d+(:\d+)?", "", text)
    return re.sub(r"\b(fwd|bwd)=\w+", "", text)

def fp(fn, *args):
    t = norm(str(jax.make_jaxpr(fn)(*args)))
    return hashlib.sha256(t.encode()).hexdigest()[:16], t

def inputs(n, d, dtype, topk, h=2):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), dtype) for _ in range(3))
    qp, kp = jax.nn.softmax(q.astype(jnp.float32), -1).astype(dtype), jax.nn.softmax(k.astype(jnp.float32), -1).astype(dtype)
    nq, nk = -(-n // 128), -(-n // 64)
    lut = jnp.asarray(np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(h * nq)]), -1).reshape(1, h, nq, topk), jnp.int32)
    alpha = jnp.full((1, h, nq), 0.7, jnp.float32)
    return q, k, v, qp, kp, lut, alpha

def kinds():
    out = {}
    for path in ("triton", "mosaic"):
        for scope in ("complement", "all"):
            for dtype in (jnp.bfloat16, jnp.float32):
                if path == "mosaic" and dtype == jnp.float32: continue
                for d in (64, 128):
                    n, topk = 1000, 3
                    q, k, v, qp, kp, lut, alpha = inputs(n, d, dtype, topk)
                    interp = path == "triton"
                    kw = dict(block_q=128, block_k=64, linear_scope=scope, interpret=interp, config=KernelConfig(forward=path, backward=path))
                    tag = f"{path}/{scope}/{jnp.dtype(dtype).name}/d{d}"
                    def fused(q, k, v, qp, kp, a, lut=lut, kw=kw): return sla2_fused_attention(q, k, v, qp, kp, lut, a, **kw)
                    def branches(q, k, v, qp, kp, lut=lut, kw=kw): return sparse_linear_attention(q, k, v, qp, kp, lut, **kw)
                    def fused_loss(*x, fused=fused): return jnp.sum(fused(*x).astype(jnp.float32))
                    def br_loss(*x, branches=branches):
                        a, b = branches(*x); return jnp.sum(a.astype(jnp.float32)) + jnp.sum(b.astype(jnp.float32) * 0.5)
                    out[tag + "/fused_fwd"] = (fused, (q, k, v, qp, kp, alpha))
                    out[tag + "/fused_grad"] = (jax.grad(fused_loss, argnums=tuple(range(6))), (q, k, v, qp, kp, alpha))
                    out[tag + "/branches_fwd"] = (branches, (q, k, v, qp, kp))
                    out[tag + "/branches_grad"] = (jax.grad(br_loss, argnums=tuple(range(5))), (q, k, v, qp, kp))
                    if dtype == jnp.bfloat16 and scope == "complement":
                        for quant in ("int8", "int8_fp8"):
                            qkw = dict(kw, quant=quant)
                            def lf(q, k, v, qp, kp, a, qkw=qkw, lut=lut): return sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, **qkw)
                            def lb(q, k, v, qp, kp, qkw=qkw, lut=lut): return sparse_linear_attention_lowbit(q, k, v, qp, kp, lut, **qkw)
                            out[tag + f"/{quant}_fused_fwd"] = (lf, (q, k, v, qp, kp, alpha))
                            out[tag + f"/{quant}_branches_fwd"] = (lb, (q, k, v, qp, kp))
                            def lfl(*x, lf=lf): return jnp.sum(lf(*x).astype(jnp.float32))
                            out[tag + f"/{quant}_fused_grad"] = (jax.grad(lfl, argnums=tuple(range(6))), (q, k, v, qp, kp, alpha))
    # front end
    for d in (64, 128):
        q, k, v, qp, kp, lut, alpha = inputs(1000, d, jnp.bfloat16, 3)
        for fm in ("softmax", "elu", None):
            out[f"front/means_phi/{fm}/d{d}"] = (lambda x, fm=fm: prep.block_means_and_phi(x, 64, PHI_FUNCTIONS.get(fm), interpret=True, pass_through=True), (k,))
            out[f"front/means_phi_grad/{fm}/d{d}"] = (jax.grad(lambda x, fm=fm: sum(jnp.sum(y.astype(jnp.float32)) for y in prep.block_means_and_phi(x, 64, PHI_FUNCTIONS.get(fm), interpret=True) if y is not None)), (k,))
            out[f"front/int8_keys/{fm}/d{d}"] = (lambda x, fm=fm: prep.block_means_phi_int8(x, 64, PHI_FUNCTIONS.get(fm), interpret=True, pass_through=True), (k,))
            out[f"front/int8_queries/{fm}/d{d}"] = (lambda x, m, fm=fm: prep.block_means_phi_int8_queries(x, 128, PHI_FUNCTIONS.get(fm), m, 0.127, interpret=True, pass_through=True), (q, jnp.zeros((1, 2, d))))
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 8, 16)), jnp.float32)
    out["front/select"] = (lambda s: prep.select_blocks(s, 3, 1000, 64, interpret=True), (scores,))
    return out

def main():
    # argv: a label (unused) and the output path
    result, texts = {}, {}
    for name, (fn, args) in kinds().items():
        try:
            h, t = fp(fn, *args)
        except Exception as e:
            h, t = "ERROR " + type(e).__name__ + ": " + str(e)[:200], ""
        result[name] = h; texts[name] = t
    json.dump(result, open(sys.argv[2], "w"), indent=1, sort_keys=True)
    json.dump(texts, open(sys.argv[2] + ".texts.json", "w"))
    print(sum(1 for v in result.values() if not v.startswith("ERROR")), "kinds;", [k for k, v in result.items() if v.startswith("ERROR")])

if __name__ == "__main__":
    # the Mosaic path on CPU: force "mosaic" when the tag says so (kinds() calls in one process: set per call)
    main()
