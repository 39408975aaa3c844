"""The package's shape (DEVELOPING.md): one method registry read by every layer, constants shared
with the compiled extensions, CUDA self-tests that are themselves right, no import cycle, modules
small enough to read in one sitting."""
import ast
import os

import pytest
import torch

import wweight
from wweight import _dispatch, _ext, config, methods
from wweight.sparse import plan

PKG = os.path.dirname(os.path.abspath(wweight.__file__))
MAX_LINES = 400


def _modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name, path, modules):
    """Every wweight module ``name`` imports anywhere in its file (function-level imports included)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule; "from pkg import name" the package
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            # importing a.b.c also runs the __init__ of every package above it that the importer is
            # not already inside (the parent-package import Python does implicitly)
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not name.startswith(mod + "."):
                    out.add(mod)
    return out


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_small():
    big = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them, or say in DEVELOPING.md why not): {big}"


def test_every_registered_method_is_routed_and_configurable():
    for name in methods.registered():
        m = methods.get(name)
        assert m.family in ("sparse", "iso", "interp")
        assert name in wweight.MERGE_METHODS and name in config.METHODS
        assert (name in wweight.ISO_METHODS) == (m.family == "iso")
        assert (name in methods.INTERP_METHODS) == (m.family == "interp")
        for p in m.params:
            assert p.default is not None and p.scope in (methods.SHARED, methods.PER_MODEL)
            if p.kind is float:
                assert p.default in p.range and (p.default in p.config_range or p.required)
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("no_such_method")


def test_compiled_constants_match_python():
    want = {str(dt).replace("torch.", ""): code for dt, code in _ext.DTYPE_CODES.items()}
    for ext in (_ext.cpu_extension(), _ext.cuda_extension()):
        if ext is None:
            continue
        assert dict(ext.DTYPE_CODES) == want
        assert ext.SPARSE_BLOCK == plan.BLOCK
        assert dict(ext.SPARSE_MODES) == {"MODE_NONE": plan.MODE_NONE, "MODE_WINDOW": plan.MODE_WINDOW,
                                          "MODE_RANDOM": plan.MODE_RANDOM}


def _cpu_backends(family):
    # the torch sparse primitives merge only with a base (its linear merge is the reference)
    names = ["torch"] if family != "sparse" else []
    if family == "sparse" and _ext.cpu_extension() is not None:
        names.append("cpu")
    try:
        import triton  # noqa: F401

        if os.environ.get("TRITON_INTERPRET") == "1":
            names.append("triton")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("family", ["sparse", "quant"])
def test_cuda_selftests_pass_on_the_cpu_backends(family):
    # a wrong self-test would disable good CUDA kernels on the first GPU run: run each one on the
    # backends CI has (same contract), where it must pass
    selftests = _dispatch.backend_module(family, "cuda").SELFTESTS
    names = _cpu_backends(family)
    if not names:
        pytest.skip(f"no CPU backend of the {family} family runs its primitives here (no C++ build, no triton)")
    for name in names:
        prims = _dispatch.backend_module(family, name)
        for op, fn in selftests.items():
            assert fn(torch.device("cpu"), prims=prims), (family, op, name)
