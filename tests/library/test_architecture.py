"""The house rules, checked: no module-level mutable state in the library or the kernels, one-way imports
(pallas_kernels never imports sla2_jax; no cycle inside pallas_kernels), and the one backend decision."""

from __future__ import annotations

import ast
import pathlib
import warnings

import jax
import jax.numpy as jnp
import pytest

from sla2_jax import backends

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("pallas_kernels", "sla2_jax")
_MUTATING = {"append", "extend", "insert", "update", "clear", "pop", "popitem", "setdefault", "remove", "add",
             "discard", "__setitem__"}


def _modules(package):
    return sorted((ROOT / package).glob("*.py"))


def _module_level_containers(tree):
    """Names bound at module level to a dict / list / set display or constructor call."""
    names = set()
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        is_container = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("dict", "list", "set")
        )
        if is_container:
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("path", [p for pkg in PACKAGES for p in _modules(pkg)], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_level_state_that_code_mutates(path):
    """A module-level dict / list / set may be a constant table; no function may mutate it (method call, item
    assignment or deletion) and no function may rebind a module-level name (``global``)."""
    tree = ast.parse(path.read_text())
    containers = _module_level_containers(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"line {node.lineno}: global {', '.join(node.names)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATING:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in containers:
                problems.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in containers:
                    problems.append(f"line {node.lineno}: {t.value.id}[...] assigned")
    assert not problems, problems


def _imports(path, package):
    """Modules of `package` and top-level packages that a file imports (relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"{package}.{node.module}" if node.module else package
                names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
                out |= set(names)
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_pallas_kernels_never_imports_the_library():
    for path in _modules("pallas_kernels"):
        bad = [m for m in _imports(path, "pallas_kernels") if m.split(".")[0] in ("sla2_jax", "experiments")]
        assert not bad, (path.name, bad)


def test_only_backends_imports_pallas_kernels():
    users = [p.name for p in _modules("sla2_jax") if any(m.startswith("pallas_kernels") for m in _imports(p, "sla2_jax"))]
    assert users == ["backends.py"], users


def test_no_import_cycle_in_pallas_kernels():
    graph = {}
    for path in _modules("pallas_kernels"):
        name = f"pallas_kernels.{path.stem}"
        graph[name] = {m for m in _imports(path, "pallas_kernels") if m in {f"pallas_kernels.{p.stem}" for p in _modules("pallas_kernels")}}
    graph.pop("pallas_kernels.__init__", None)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def _on_a_gpu(monkeypatch):
    monkeypatch.setattr(backends.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(backends, "pallas_available", lambda: True)


@pytest.mark.parametrize("head_dim", [16, 256])
def test_auto_falls_back_to_xla_with_a_warning_where_the_kernels_cannot_run(head_dim, monkeypatch):
    _on_a_gpu(monkeypatch)
    q = jnp.zeros((1, 64, 2, head_dim), jnp.bfloat16)
    with pytest.warns(UserWarning, match=f"head_dim.*{head_dim}"):
        assert backends.resolve_backend("auto", q, q, q) == "xla"
    with pytest.raises(ValueError, match=f"head_dim.*{head_dim}"):
        backends.resolve_backend("pallas", q, q, q)


def test_auto_picks_pallas_on_a_gpu_where_supported_and_xla_on_cpu(monkeypatch):
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    assert backends.resolve_backend("auto", q, q, q) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    _on_a_gpu(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", q, q, q) == "pallas"
    with pytest.warns(UserWarning, match="one dtype"):
        assert backends.resolve_backend("auto", q, q.astype(jnp.float32), q) == "xla"
    assert backends.resolve_backend("xla", q, q, q) == "xla"


def test_auto_with_head_dim_256_runs_end_to_end_on_the_fallback(monkeypatch):
    """sla2_attention with backend "auto" on a (simulated) GPU and head_dim 256: runs on xla, with the warning."""
    import sla2_jax as sla

    _on_a_gpu(monkeypatch)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 96, 1, 256), jnp.float32)
    cfg = sla.SLA2Config(block_q=32, block_k=16, topk_ratio=0.5, alpha="mass")
    with pytest.warns(UserWarning, match="head_dim"):
        o = sla.sla2_attention(q, q, q, config=cfg)
    ref = sla.sla2_attention(q, q, q, config=cfg.replace(backend="xla"))
    assert o.shape == q.shape and bool(jnp.allclose(o, ref))
