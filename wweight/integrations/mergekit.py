"""wweight's merge methods inside mergekit 0.1.5: ``install()`` / ``uninstall()``.

mergekit looks every method up by name in one dict, ``mergekit.merge_methods.registry._METHODS``
(its planner, executor task and model card all call ``mergekit.merge_methods.get(name)`` at run
time). mergekit 0.1.5's ``registry.register(method)`` only *adds* a name (a duplicate raises
``ValueError``), so :func:`install` registers new names that way and overrides existing ones by
replacing their entry; :func:`uninstall` puts mergekit's own objects back.

What gets installed (the list is wweight's one registry, :mod:`wweight.methods`):

* ``iso_c``, ``iso_cts``, ``tsv_m`` -- new in mergekit (Marczak et al. 2025, "No Task Left Behind";
  Gargiulo et al. 2025, "Task Singular Vectors"), with wweight's parameters ``alpha`` (1.0) and,
  for Iso-CTS, ``common_space_fraction`` (0.8); the base model is required. Each is a per-key merge
  given ``alpha`` (the batching over same-shape keys in ``merge_state_dicts`` is only speed), so
  mergekit's per-tensor executor can run it.
* with ``override`` (the default), the methods both libraries have: ``linear``, ``task_arithmetic``,
  ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
  ``della_linear``, ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``, ``sce``,
  ``ram``, ``ramplus_tl``, ``nearswap``, ``arcee_fusion``, ``passthrough``. Each keeps *mergekit's
  own* ``MergeMethodSpec`` object (parameter names, scopes, defaults, input contract, optional-tensor
  policy), so a config validates and resolves exactly as without the adapter; only the numbers
  come from :func:`wweight.merge_tensors`.

Per tensor, mergekit's executor hands the method a ``TensorGroup`` (inputs in config order, the
base flagged, dtypes already aligned to the config's ``dtype``); the adapter passes it on the way
mergekit's method reads it: for base-aware methods the base is ``base`` and the other inputs
(``group.non_base``, in order) are the models, a base alone is returned as is (mergekit's
task-arithmetic family, SCE and RAM do that); for ``linear``, ``karcher`` and ``passthrough``
(mergekit ignores the base) every input, the base model included, is a model. The result has the
inputs' dtype; mergekit then applies ``out_dtype``.

Results are mergekit's bit for bit except where the README says otherwise ("mergekit's other
methods", "Sparse masks"): DARE / DELLA masks come from wweight's Philox stream (keyed per tensor by
``seed`` and the tensor's name, as ``wweight merge``; with ``seed=None`` a key is drawn from torch's
generator per tensor, so ``mergekit-yaml --random-seed`` still makes a run reproducible), elements
tied at a TIES / Breadcrumbs magnitude cut or an SCE top-k cut are kept by lowest index, arcee_fusion
uses all elements above 1M, ``linear``'s fp32 sums are not fused multiply-adds, and ramplus_tl /
arcee_fusion return the inputs' dtype where mergekit's return float32.

The command line: ``python -m wweight.integrations.mergekit CONFIG OUT [mergekit-yaml options]`` is
``mergekit-yaml`` with :func:`install` done first (``--random-seed S`` also keys the DARE / DELLA
masks as ``wweight merge --random-seed S`` does; ``--wweight-backend NAME`` picks wweight's backend).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .. import _dispatch
from .. import methods as M
from ..merge import merge_tensors
from ..sparse.ops import key_seed

try:
    from mergekit.merge_methods import registry as _registry
    from mergekit.merge_methods.base import (MISSING, BasePolicy, GroupMergeMethod, InputContract, MergeMethod,
                                             MergeMethodSpec, ParameterScope, ParameterSpec, TensorGroup)
except ImportError as e:  # pragma: no cover - mergekit is a test dependency
    raise ImportError(f"wweight.integrations.mergekit needs mergekit 0.1.5 (pip install mergekit): {e}") from None

__all__ = ["install", "uninstall", "installed", "WweightMergeMethod", "main"]

#: Methods whose masks are random (they take a Philox key).
_RANDOM = ("random", "della_magprune")
_ISO_META = {
    "iso_c": ("Iso-C", "https://arxiv.org/abs/2502.04959"),
    "iso_cts": ("Iso-CTS", "https://arxiv.org/abs/2502.04959"),
    "tsv_m": ("TSV-M", "https://arxiv.org/abs/2412.00081"),
}

# name -> what mergekit had under that name before the first install (None: the name was new)
_ORIGINALS: Dict[str, Optional[MergeMethod]] = {}


class WweightMergeMethod(GroupMergeMethod):
    """A mergekit ``MergeMethod`` whose numbers come from :func:`wweight.merge_tensors`.

    ``spec`` is the mergekit spec it answers to (mergekit's own for the methods both have);
    ``original`` is the mergekit method it replaces (``None`` for a new name).
    """

    def __init__(self, name: str, spec: MergeMethodSpec, original: Optional[MergeMethod],
                 backend: Optional[str] = None, seed: Optional[int] = None):
        self.spec = spec
        self.method = M.get(name)
        self.original = original
        self.backend = backend
        self.seed = seed

    def __repr__(self) -> str:
        return f"WweightMergeMethod({self.spec.name!r}, backend={self.backend!r}, seed={self.seed!r})"

    def merge_group(self, group: TensorGroup, /, **parameters: Any):
        m = self.method
        if m.needs_base:
            base = group.base.tensor if group.base is not None else None
            entries = group.non_base
            if base is not None and not entries:
                return base  # mergekit: the base alone is the merge (GTA, SCE, RAM return it as is)
        else:
            base, entries = None, group.entries  # mergekit ignores the base: it is one more model
        kw: Dict[str, Any] = {}
        for p in m.params:
            value = parameters[p.name]
            if p.scope == M.PER_MODEL:
                value = [value[e.id] for e in entries]
                if p.name == "scale":  # passthrough: mergekit's None is "no scaling"
                    value = [1.0 if v is None else v for v in value]
            kw[p.api_name] = value
        if m.sparsification in _RANDOM and self.seed is not None:
            kw["seed"] = key_seed(self.seed, group.metadata.name or "")
        return merge_tensors(m.name, base, [e.tensor for e in entries], backend=self.backend, **kw)


def _new_spec(name: str) -> MergeMethodSpec:
    """A mergekit spec for a method mergekit lacks, from wweight's registry entry."""
    m = M.get(name)
    params = tuple(ParameterSpec(p.name, p.kind, ParameterScope.SHARED if p.scope == M.SHARED
                                 else ParameterScope.NON_BASE, default=MISSING if p.required else p.default)
                   for p in m.params)
    pretty, url = _ISO_META.get(name, (name, None))
    policy = BasePolicy.IGNORED if not m.needs_base else \
        BasePolicy.OPTIONAL if m.base_optional else BasePolicy.REQUIRED
    return MergeMethodSpec(name=name, parameters=params, contract=InputContract(base=policy),
                           pretty_name=pretty, reference_url=url)


def _check_spec(name: str, spec: MergeMethodSpec) -> None:
    """mergekit's spec and wweight's registry entry must describe the same method (else this mergekit
    is not the 0.1.5 the adapter follows): same parameter names, defaults and base handling."""
    m = M.get(name)
    theirs = {p.name: p for p in spec.parameters}
    if set(theirs) != set(m.names()):
        raise RuntimeError(f"mergekit's {name!r} takes {sorted(theirs)}, wweight's {sorted(m.names())}: "
                           f"this mergekit version is not the one wweight.integrations.mergekit follows (0.1.5)")
    for p in m.params:
        q = theirs[p.name]
        per_model = q.scope != ParameterScope.SHARED
        default_ok = q.required or q.default == p.default or (p.name == "scale" and q.default is None)
        if per_model != (p.scope == M.PER_MODEL) or not default_ok:
            raise RuntimeError(f"mergekit's {name!r} parameter {p.name!r} ({q.scope.value}, default {q.default!r}) "
                               f"differs from wweight's ({p.scope}, default {p.default!r})")
    if (spec.contract.base == BasePolicy.IGNORED) == m.needs_base:
        raise RuntimeError(f"mergekit's {name!r} base policy {spec.contract.base.value!r} differs from wweight's")


def _table() -> Dict[str, MergeMethod]:
    table = getattr(_registry, "_METHODS", None)
    if not isinstance(table, dict):  # pragma: no cover - another mergekit layout
        raise RuntimeError("mergekit.merge_methods.registry._METHODS not found: this mergekit is not 0.1.5")
    return table


def _mergekit_has(name: str) -> bool:
    if name in _ORIGINALS:
        return _ORIGINALS[name] is not None
    current = _table().get(name)
    return (current.original if isinstance(current, WweightMergeMethod) else current) is not None


def _names(methods: Union[None, str, Iterable[str]], argname: str = "methods") -> List[str]:
    if methods is None:
        return list(M.MERGE_METHODS)
    names = [methods] if isinstance(methods, str) else list(methods)
    unknown = [n for n in names if n not in M.MERGE_METHODS]
    if unknown:
        raise ValueError(f"{argname} must be names from {list(M.MERGE_METHODS)}, got {unknown}")
    return names


def install(methods: Union[None, str, Sequence[str]] = None, *, override: bool = True,
            backend: Optional[str] = None, seed: Optional[int] = None) -> Tuple[str, ...]:
    """Register wweight-backed methods in mergekit's registry; returns the names installed.

    Args:
        methods: method names (one string or several) from :data:`wweight.MERGE_METHODS`; ``None`` = all
            of them that ``override`` allows.
        override: replace the methods mergekit already has (they keep mergekit's spec). ``False``
            installs only names mergekit lacks (the iso methods); naming a method mergekit has is
            then a ``ValueError``.
        backend: wweight backend for every merge (``None``/``"auto"``: wweight's dispatch).
        seed: Philox run seed of DARE / DELLA masks (each tensor keyed by ``wweight.key_seed(seed,
            name)``, as ``wweight merge --random-seed``); ``None`` draws a key from torch's generator
            per tensor.

    Idempotent: installing again replaces wweight's entries (with the new ``backend`` / ``seed``) and
    still remembers mergekit's originals for :func:`uninstall`.
    """
    if not isinstance(override, bool):
        raise TypeError(f"override must be a bool, got {type(override).__name__}")
    if backend is not None:
        _dispatch._check_name(backend)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    names = _names(methods)
    if methods is None and not override:
        names = [n for n in names if not _mergekit_has(n)]
    elif not override:
        clash = [n for n in names if _mergekit_has(n)]
        if clash:
            raise ValueError(f"methods {clash} are mergekit's own; pass override=True to replace them")
    table = _table()
    for name in names:
        if name not in _ORIGINALS:
            current = table.get(name)
            _ORIGINALS[name] = current.original if isinstance(current, WweightMergeMethod) else current
        original = _ORIGINALS[name]
        spec = original.spec if original is not None else _new_spec(name)
        _check_spec(name, spec)
        table[name] = WweightMergeMethod(name, spec, original, backend, seed)
    return tuple(names)


def uninstall(methods: Union[None, str, Sequence[str]] = None) -> Tuple[str, ...]:
    """Put mergekit's own methods back (and drop the names wweight added); returns the names restored.

    ``None`` = every method :func:`install` touched. A name whose entry is no longer wweight's (someone
    registered over it) is left alone. Idempotent.
    """
    names = [n for n in (_names(methods) if methods is not None else list(_ORIGINALS)) if n in _ORIGINALS]
    table = _table()
    done = []
    for name in names:
        original = _ORIGINALS.pop(name)
        if isinstance(table.get(name), WweightMergeMethod):
            if original is None:
                del table[name]
            else:
                table[name] = original
            done.append(name)
    return tuple(done)


def installed() -> Tuple[str, ...]:
    """Names whose mergekit entry is currently wweight's."""
    return tuple(n for n, v in _table().items() if isinstance(v, WweightMergeMethod))


def _pop_option(argv: List[str], flag: str) -> Optional[str]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from argv; return VALUE (last one wins)."""
    value, out, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a[len(flag) + 1:]
        else:
            out.append(a)
        i += 1
    argv[:] = out
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``mergekit-yaml`` with wweight's methods installed: ``CONFIG OUT [mergekit-yaml options]``.

    ``--wweight-backend NAME`` (ours, removed before mergekit sees the options) picks wweight's backend;
    mergekit's ``--random-seed S`` is also the Philox run seed of DARE / DELLA masks.
    """
    from mergekit.scripts import run_yaml

    args = list(sys.argv[1:] if argv is None else argv)
    backend = _pop_option(args, "--wweight-backend")
    seed = None
    for i, a in enumerate(args):
        if a == "--random-seed" and i + 1 < len(args):
            seed = args[i + 1]
        elif a.startswith("--random-seed="):
            seed = a.split("=", 1)[1]
    try:
        seed = None if seed is None else int(seed)
    except ValueError:
        seed = None  # mergekit's own option parser reports it
    install(backend=backend, seed=seed)
    try:  # click's standalone mode prints usage errors and always ends in SystemExit
        run_yaml.main.main(args=args, prog_name="python -m wweight.integrations.mergekit")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    # run the importable module's main, so install() state lives in wweight.integrations.mergekit
    from wweight.integrations.mergekit import main as _main

    sys.exit(_main())
