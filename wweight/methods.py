"""The one registry of merge methods, read by every layer.

``merge_tensors`` / ``merge_state_dicts`` route a method to the family that owns it, the YAML
config (``wweight.config``) takes its parameter names, scopes, defaults and ranges from here,
``wweight merge --help`` and the benchmarks list the methods from here, and the references
(``wweight.reference``) read the method definitions (consensus, sparsification, normalize,
rescale) from here. Each entry follows mergekit 0.1.5's ``MergeMethodSpec``
(``mergekit/merge_methods/generalized_task_arithmetic.py``): the same method names, parameter
names, scopes (shared / per model) and defaults.

Adding a method: one :func:`register` call below, plus the family's kernels (DEVELOPING.md).

============================  ======  =========  ===============  =========  =======
method                        family  consensus  sparsification   normalize  rescale
============================  ======  =========  ===============  =========  =======
``linear``                    sparse  --         --               True       --
``task_arithmetic``           sparse  --         --               False      False
``ties``                      sparse  sum        magnitude        True       False
``dare_ties``                 sparse  sum        random           False      True
``dare_linear``               sparse  --         random           False      True
``breadcrumbs``               sparse  --         magnitude_outl.  False      False
``breadcrumbs_ties``          sparse  sum        magnitude_outl.  False      False
``della``                     sparse  sum        della_magprune   True       True
``della_linear``              sparse  --         della_magprune   False      True
``iso_c`` ``iso_cts``         iso     (spectral merges of "No Task Left Behind", ICML 2025)
``tsv_m``                     iso     (Task Singular Vectors, CVPR 2025)
============================  ======  =========  ===============  =========  =======

The ``interp`` family (:mod:`wweight.interp`) holds mergekit 0.1.5's other methods, each its own
algorithm: ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``, ``sce``, ``ram``,
``ramplus_tl``, ``nearswap``, ``arcee_fusion``, ``passthrough`` (parameters below, as mergekit's
method signatures in ``mergekit/merge_methods/<name>.py`` declare them).

The ``linear`` merge runs on the sparse family's fused kernel (no mask), hence its family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

SHARED, PER_MODEL = "shared", "per_model"


@dataclass(frozen=True)
class Range:
    """An interval ``lo .. hi``; ``lo_open`` / ``hi_open`` exclude the end point."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        return ((v > self.lo) if self.lo_open else (v >= self.lo)) and ((v < self.hi) if self.hi_open else (v <= self.hi))

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


ANY = Range()
UNIT = Range(0.0, 1.0)


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method (mergekit's ``ParameterSpec``).

    ``name`` is the YAML / mergekit name, ``arg`` the keyword of :func:`wweight.merge_tensors` /
    :func:`wweight.merge_state_dicts`. ``default`` is the value when neither a model's nor the
    top-level ``parameters`` give one; ``required`` parameters have no default in a YAML config
    (mergekit's ``weight``), while the Python API still falls back to ``default``.

    ``range`` is what the op accepts. ``yaml_range`` is what the YAML config accepts where it is
    stricter (``None``: the same): the config refuses a density of 0 and a gamma / epsilon of 1,
    which the ops take as "drop the whole task vector". Both are pinned by the test suite
    (tests/test_sparse.py runs density 0, tests/test_cli.py expects "density must be in (0, 1]");
    making them one range is a behaviour change left to a later issue.
    """

    name: str
    kind: type
    scope: str
    default: Any = None
    required: bool = False
    range: Range = ANY
    yaml_range: Optional[Range] = None
    arg: str = ""
    help: str = ""
    inert: bool = False   # accepted for mergekit compatibility, passed to no op

    @property
    def api_name(self) -> str:
        return self.arg or self.name

    @property
    def config_range(self) -> Range:
        return self.yaml_range or self.range


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: which family runs it and how (see the table in the module docstring)."""

    name: str
    family: str                          # package under wweight/ that owns it: "sparse" | "iso" | "interp"
    params: Tuple[Param, ...]
    needs_base: bool = True              # the base (when given) is an argument of its own, not an input
    base_optional: bool = False          # needs_base methods that also run without a base (nuslerp)
    min_models: int = 1                  # models besides the base (all inputs when not needs_base)
    max_models: Optional[int] = None
    consensus: Optional[str] = None      # "sum": TIES sign election
    sparsification: Optional[str] = None  # a wweight.sparsify method
    paper: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"merge_method {self.name!r} has no parameter {name!r}")

    def names(self, scope: Optional[str] = None) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params if scope is None or p.scope == scope)

    def default(self, name: str) -> Any:
        return self.param(name).default

    @property
    def normalize(self) -> bool:
        """Default of the ``normalize`` parameter (False for methods without one)."""
        return "normalize" in self.names() and bool(self.default("normalize"))

    @property
    def rescale(self) -> bool:
        """Default of the ``rescale`` parameter (False for methods without one)."""
        return "rescale" in self.names() and bool(self.default("rescale"))


_REGISTRY: Dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    """The registered method ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {list(_REGISTRY)}, got {name!r}") from None


def registered(family: Optional[str] = None) -> Tuple[str, ...]:
    """Method names in registration order (of one family, if given)."""
    return tuple(m.name for m in _REGISTRY.values() if family is None or m.family == family)


# -------------------------------------------------------------------------------------- parameters

def _bool(name: str, default: bool, help: str) -> Param:
    return Param(name, bool, SHARED, default=default, help=help)


WEIGHT = Param("weight", float, PER_MODEL, default=1.0, required=True, arg="weights",
               help="weight of the model's task vector")
DENSITY = Param("density", float, PER_MODEL, default=1.0, range=UNIT, yaml_range=Range(0.0, 1.0, lo_open=True),
                help="fraction of the task vector kept")
GAMMA = Param("gamma", float, PER_MODEL, default=0.01, range=UNIT, yaml_range=Range(0.0, 1.0, hi_open=True),
              help="Breadcrumbs: fraction of the largest magnitudes dropped")
EPSILON = Param("epsilon", float, PER_MODEL, default=0.15, range=UNIT, yaml_range=Range(0.0, 1.0, hi_open=True),
                help="DELLA: half-width of the keep probabilities around density")
LAMBDA = Param("lambda", float, SHARED, default=1.0, arg="lambda_", help="scale of the merged task vector")
INT8_MASK = Param("int8_mask", bool, SHARED, default=False, inert=True,
                  help="mergekit's memory option for masks (accepted, no effect in wweight)")
ALPHA = Param("alpha", float, SHARED, default=1.0, help="scale of the merged task vector (tuned on validation data)")
CSF = Param("common_space_fraction", float, SHARED, default=0.8, range=Range(0.0, 1.0, lo_open=True),
            help="Iso-CTS: fraction of the rank given to the common subspace")


def _task_arithmetic(name: str, consensus, sparsification, normalize: bool, rescale: bool, paper: str,
                     extra: Tuple[Param, ...] = ()) -> MergeMethod:
    params = (_bool("normalize", normalize, "divide by the summed weights (of agreeing models, with consensus)"),
              _bool("rescale", rescale, "L1 rescale of each sparsified task vector"),
              LAMBDA, INT8_MASK, WEIGHT, DENSITY) + extra
    return MergeMethod(name, "sparse", params, consensus=consensus, sparsification=sparsification, paper=paper)


register(MergeMethod("linear", "sparse",
                     (_bool("normalize", True, "divide by the sum of the weights"), WEIGHT),
                     needs_base=False, paper="Wortsman et al. 2022, model soups"))
register(_task_arithmetic("task_arithmetic", None, None, False, False, "Ilharco et al. 2023, task arithmetic"))
register(_task_arithmetic("ties", "sum", "magnitude", True, False, "Yadav et al. 2023, TIES-Merging"))
register(_task_arithmetic("dare_ties", "sum", "random", False, True, "Yu et al. 2023, DARE"))
register(_task_arithmetic("dare_linear", None, "random", False, True, "Yu et al. 2023, DARE"))
register(_task_arithmetic("breadcrumbs", None, "magnitude_outliers", False, False,
                          "Davari & Belilovsky 2023, Model Breadcrumbs", (GAMMA,)))
register(_task_arithmetic("breadcrumbs_ties", "sum", "magnitude_outliers", False, False,
                          "Davari & Belilovsky 2023, Model Breadcrumbs", (GAMMA,)))
register(_task_arithmetic("della", "sum", "della_magprune", True, True, "Deep et al. 2024, DELLA", (EPSILON,)))
register(_task_arithmetic("della_linear", None, "della_magprune", False, True, "Deep et al. 2024, DELLA",
                          (EPSILON,)))
register(MergeMethod("iso_c", "iso", (ALPHA,), paper="Marczak et al. 2025, Iso-C"))
register(MergeMethod("iso_cts", "iso", (ALPHA, CSF), paper="Marczak et al. 2025, Iso-CTS"))
register(MergeMethod("tsv_m", "iso", (ALPHA,), paper="Gargiulo et al. 2025, TSV-M"))


# ------------------------------------------------------------ interp: mergekit 0.1.5's other methods

POS = Range(0.0, math.inf)


def _shared(name: str, kind: type, default, help: str, range: Range = ANY, required: bool = False) -> Param:
    return Param(name, kind, SHARED, default=default, range=range, required=required, help=help)


def _interp(name: str, params: Tuple[Param, ...], paper: str, *, base: str = "required",
            min_models: int = 1, max_models: Optional[int] = None) -> MergeMethod:
    """``base``: mergekit's BasePolicy - "required", "optional" or "ignored" (the base, when given,
    is one more input, as for ``linear``)."""
    return MergeMethod(name, "interp", params, needs_base=base != "ignored", base_optional=base == "optional",
                       min_models=min_models, max_models=max_models, paper=paper)


RAM_EPSILON = _shared("epsilon", float, 1e-5, "RAM: |task vector| above which an entry contributes", POS)
register(_interp("slerp", (_shared("t", float, 0.5, "interpolation factor: 0 = base_model, 1 = the other model",
                                   required=True),),
                 "Shoemake 1985, spherical linear interpolation", min_models=1, max_models=1))
register(_interp("nuslerp", (WEIGHT, _bool("nuslerp_flatten", True, "slerp the flattened tensor (else per row "
                                           "or column)"),
                             _bool("nuslerp_row_wise", False, "with nuslerp_flatten false: slerp rows, not columns")),
                 "mergekit's NuSLERP (slerp with weights, optional base)", base="optional",
                 min_models=2, max_models=2))
register(_interp("multislerp", (WEIGHT, _bool("normalize_weights", True, "divide the weights by their sum"),
                                _shared("eps", float, 1e-8, "stability constant of the norms", POS)),
                 "Goddard 2025, Multi-SLERP (barycentric interpolation on the sphere)", base="optional"))
register(_interp("karcher", (_shared("max_iter", int, 10, "Riemannian gradient steps at most", POS),
                             _shared("tol", float, 1e-5, "convergence tolerance of the tangent norm", POS)),
                 "Karcher 1977 (weighted Riemannian mean on the sphere)", base="ignored"))
register(_interp("model_stock", (_bool("filter_wise", False, "one interpolation ratio per row (filter)"),),
                 "Jang et al. 2024, Model Stock", min_models=2))
register(_interp("sce", (INT8_MASK, _shared("select_topk", float, 1.0, "fraction of the highest-variance "
                                            "entries kept", UNIT)),
                 "Wan et al. 2024, FuseChat (SCE: select, calculate, erase)"))
register(_interp("ram", (RAM_EPSILON,), "Reinforced Agent Merging (RAM), arXiv 2601.13572"))
register(_interp("ramplus_tl", (_shared("r", float, 0.1, "RAM+: gain of the overlap ratio", POS),
                                _shared("alpha", float, 0.2, "RAM+: cap of the overlap ratio", POS), RAM_EPSILON),
                 "Reinforced Agent Merging Plus, tensor-local (arXiv 2601.13572)"))
register(_interp("nearswap", (_shared("t", float, 0.5, "distance below which the other model's value is taken",
                                      required=True),),
                 "alchemonaut, NearSwap (QuartetAnemoi-70B)", min_models=1, max_models=1))
register(_interp("arcee_fusion", (), "Arcee Fusion (importance = |delta| * KL of the softmaxes)",
                 min_models=1, max_models=1))
register(_interp("passthrough", (Param("scale", float, PER_MODEL, default=1.0,
                                       help="factor of the tensor (mergekit's None = 1.0: no scaling)"),),
                 "mergekit passthrough (one model's tensor, optionally scaled)", base="ignored",
                 min_models=1, max_models=1))

#: Every method, in registration order.
MERGE_METHODS: Tuple[str, ...] = registered()
#: The isotropic (spectral) methods.
ISO_METHODS: Tuple[str, ...] = registered("iso")
#: mergekit's other methods (slerp, model_stock, sce, ...), :mod:`wweight.interp`.
INTERP_METHODS: Tuple[str, ...] = registered("interp")
#: Task-arithmetic methods: (consensus, sparsification, default normalize, default rescale) per
#: name - a view of the registry for the references and tests.
TA_METHODS: Dict[str, Tuple[Optional[str], Optional[str], bool, bool]] = {
    m.name: (m.consensus, m.sparsification, m.normalize, m.rescale)
    for m in _REGISTRY.values() if m.family == "sparse" and m.needs_base}
