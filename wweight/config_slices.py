"""``slices:`` of a mergekit config: frankenmerges, layer swapping, per-slice merges.

mergekit 0.1.5 (``mergekit/config.py`` ``OutputSliceDefinition``, ``mergekit/plan.py``
``MergePlanner.plan_slice``)::

    merge_method: passthrough          # or any method: each slice merges its sources
    slices:
      - sources: [{model: ./a, layer_range: [0, 4]}]
      - sources: [{model: ./b, layer_range: [2, 6], parameters: {scale: 0.5}}]
        parameters: {...}              # per-slice parameters (between the sources' and the top-level)
        base_model: ./a                # per-slice base (default: the top-level base_model)

Each slice's sources span the same number of layers (``layer_range = [start, end)``); the output's
layers are the slices' layers in order, renumbered from 0. The embeddings come from the first
slice's sources, the final norm / lm_head from the last slice's (:mod:`wweight.checkpoint.slices`).
Ranges are checked against the models' layer counts by the plan (the models are not read here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import methods as M
from .config_params import ConfigError, parse_params


@dataclass
class SliceSource:
    model: Any                               # a wweight.config.ModelEntry; its parameters: the source's
    layer_range: Tuple[int, int]             # [start, end): layers start .. end - 1 of that model


@dataclass
class SliceDef:
    sources: List[SliceSource]
    base_model: Any = None                   # ModelEntry: the slice's base_model, else the top-level one
    parameters: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a

    def has_base(self, method: str) -> bool:
        """Whether the method takes this slice's base as its base input (it is one of the sources)."""
        return (M.get(method).needs_base and self.base_model is not None
                and any(s.model.ref == self.base_model.ref for s in self.sources))


def _layer_range(v, where: str, src: str) -> Tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise ConfigError(f"{src}: {where}.layer_range must be [start, end] (two integers), got {v!r}")
    a, b = v
    if a < 0:
        raise ConfigError(f"{src}: {where}.layer_range {list(v)}: start must be >= 0")
    if b <= a:
        raise ConfigError(f"{src}: {where}.layer_range {list(v)}: end must be greater than start "
                          "(the range is [start, end), layers start .. end - 1)")
    return a, b


def parse_slices(raw: List[Any], src: str, method: str, base, top: Dict[str, Any],
                 entry: Callable[[Any, str, Dict[str, Any]], Any]) -> Tuple[List[SliceDef], List[Any]]:
    """Validate ``slices`` (a list) into :class:`SliceDef` s, and the referenced models, each once.

    ``entry(value, where, parameters)`` makes a ``ModelEntry`` of a model reference (the config's
    own reference rules); ``base``: the top-level base_model entry or None; ``top``: the validated
    top-level parameters."""
    spec = M.get(method)
    allowed_model = spec.names(M.PER_MODEL)
    allowed_slice = spec.names(M.SHARED) + allowed_model
    if not raw:
        raise ConfigError(f"{src}: slices must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
    slices: List[SliceDef] = []
    referenced: Dict[Any, Any] = {}
    if base is not None:
        referenced[base.ref] = entry(base.name, "base_model", {})
    for i, s in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(s, dict) or "sources" not in s:
            raise ConfigError(f"{src}: {where} must be a mapping with 'sources', got {s!r}")
        extra = set(s) - {"sources", "base_model", "parameters", "residual_weight"}
        if extra:
            raise ConfigError(f"{src}: {where}: unknown key {sorted(extra)[0]!r} (expected sources, base_model, "
                              "parameters)")
        raw_sources = s["sources"]
        if not isinstance(raw_sources, list) or not raw_sources:
            raise ConfigError(f"{src}: {where}.sources must be a non-empty list of {{model, layer_range}}")
        sbase = base
        if s.get("base_model") is not None:
            sbase = entry(s["base_model"], f"{where}.base_model", {})
            referenced.setdefault(sbase.ref, entry(s["base_model"], f"{where}.base_model", {}))
        params = parse_params(s.get("parameters"), f"{where}.parameters", src, method, allowed_slice)
        sources = []
        for j, so in enumerate(raw_sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(so, dict) or "model" not in so or "layer_range" not in so:
                raise ConfigError(f"{src}: {at} must be a mapping with 'model' and 'layer_range', got {so!r}")
            bad = set(so) - {"model", "layer_range", "parameters"}
            if bad:
                raise ConfigError(f"{src}: {at}: unknown key {sorted(bad)[0]!r} (expected model, layer_range, "
                                  "parameters)")
            e = entry(so["model"], f"{at}.model",
                      parse_params(so.get("parameters"), f"{at}.parameters", src, method, allowed_model))
            sources.append(SliceSource(e, _layer_range(so["layer_range"], at, src)))
            referenced.setdefault(e.ref, entry(so["model"], f"{at}.model", {}))
        lengths = [b - a for a, b in (x.layer_range for x in sources)]
        if any(n != lengths[0] for n in lengths):
            raise ConfigError(f"{src}: {where}.sources: every source must span the same number of layers "
                              f"(layer_range lengths {lengths}), as mergekit requires")
        paths = [x.model.ref for x in sources]
        if len(set(paths)) != len(paths):
            dup = next(x.model.name for k, x in enumerate(sources) if x.model.ref in paths[:k])
            raise ConfigError(f"{src}: {where}.sources: model {dup!r} is listed twice")
        sl = SliceDef(sources, sbase, params)
        _check_counts(sl, where, src, method, top)
        slices.append(sl)
    return slices, list(referenced.values())


def _check_counts(sl: SliceDef, where: str, src: str, method: str, top: Dict[str, Any]) -> None:
    """The method's input contract and required parameters, per slice (mergekit's
    ``validate_inputs`` per ``slices[i]``)."""
    spec = M.get(method)
    in_sources = sl.base_model is not None and any(x.model.ref == sl.base_model.ref for x in sl.sources)
    if spec.needs_base and sl.base_model is None and not spec.base_optional:
        raise ConfigError(f"{src}: {where}: merge_method {method!r} needs base_model (top-level or "
                          f"{where}.base_model)")
    if spec.needs_base and sl.base_model is not None and not in_sources:
        raise ConfigError(f"{src}: {where}.sources must include base_model {sl.base_model.name!r} (with a "
                          "layer_range), as mergekit requires")
    merged = [x for x in sl.sources if not (spec.needs_base and in_sources and x.model.ref == sl.base_model.ref)]
    n, lo, hi = len(merged), spec.min_models, spec.max_models
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        besides = " besides base_model" if spec.needs_base and in_sources else ""
        raise ConfigError(f"{src}: {where}: merge_method {method!r} takes {want} source(s){besides}, got {n}")
    for p in spec.params:
        if not p.required:
            continue
        if p.scope == M.SHARED:
            if p.name not in sl.parameters and p.name not in top:
                raise ConfigError(f"{src}: {where}: merge_method {method!r} needs parameters.{p.name} "
                                  f"(top-level or {where}.parameters; mergekit has no default {p.name})")
            continue
        for j, x in enumerate(sl.sources):
            if any(x is m for m in merged) and p.name not in x.model.parameters and p.name not in sl.parameters \
                    and p.name not in top:
                raise ConfigError(f"{src}: {where}.sources[{j}] ({x.model.name}) needs parameters.{p.name} "
                                  f"(merge_method {method!r} has no default {p.name})")


def merged_sources(sl: SliceDef, method: str) -> Tuple[Optional[SliceSource], List[SliceSource]]:
    """(the base source or None, the other sources in order): the merge's base and its inputs."""
    if sl.has_base(method):
        b = next(x for x in sl.sources if x.model.ref == sl.base_model.ref)
        return b, [x for x in sl.sources if x is not b]
    return None, list(sl.sources)
