"""Merge configurations: the mergekit YAML schema (the subset wweight shares), loaded safely.

``wweight merge CONFIG.yaml OUT_DIR`` accepts the same YAML as ``mergekit-yaml`` (mergekit 0.1.5,
``mergekit/config.py``) for the methods both tools have::

    merge_method: ties                 # see METHODS (slerp, model_stock, sce, ...: wweight.interp)
    base_model: ./base                 # local directory, Hugging Face layout
    models:
      - model: ./ft-math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./base+./code-lora      # MODEL+LORA: a PEFT LoRA adapter merged in on the fly
        parameters:
          weight: 1.0
          density: [{filter: mlp, value: 0.3}, {value: 0.5}]   # conditional (per tensor name)
    parameters: {normalize: true, lambda: 1.0}                   # shared, or defaults for every model
    dtype: float32                     # compute dtype (default: the inputs' dtype)
    out_dtype: bfloat16                # output dtype (default: dtype)
    tokenizer_source: base             # base | a referenced model | omitted (= base)

Resolution follows mergekit's ``ConfigReader``: a model's own ``parameters`` win over the slice's,
then the top-level ``parameters``, then the method default; a list of ``{filter, value}`` picks the
first entry whose ``filter`` is a substring of the tensor name (``None`` / ``"*"`` match all). A
list of numbers is a *gradient*, interpolated over the layer position ``t``
(:func:`wweight.config_params.evaluate_setting`; ``t`` per tensor: :mod:`wweight.checkpoint.slices`).
``slices:`` (:mod:`wweight.config_slices`) stacks layer ranges of the models (passthrough
frankenmerges) or merges equal-length ranges of several sources per slice.

Supported / not (the README's "Whole checkpoints" has the table): models, slices, parameters,
filters, gradients, base_model (top-level and per slice), ``model+lora`` references
(:mod:`wweight.checkpoint.lora`), dtype, out_dtype, tokenizer_source base / a model. Refused, all
of them named in one one-line ConfigError: ``modules``, the ``tokenizer`` block, ``tokenizer_source:
union``, ``chat_template``, ``slices[i].residual_weight``, unknown keys and merge methods outside
:data:`METHODS`; gradients of integer parameters.

Paths in the YAML are resolved against the current directory, as mergekit does. The file is read
with ``yaml.safe_load`` only: a tag that would construct a Python object is a ``ConfigError``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import methods as M
from ._hub import looks_like_hub_id
from .config_params import ConfigError, evaluate_setting, parse_params as _params

__all__ = ["ConfigError", "MergeConfig", "ModelEntry", "evaluate_setting", "load_config", "parse_config"]

#: Methods the YAML accepts, their parameters, scopes, defaults and ranges: the one registry.
METHODS = M.MERGE_METHODS
ISO_METHODS = M.ISO_METHODS

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "name")
_UNSUPPORTED_TOP = {
    "modules": "'modules' is not supported by wweight",
    "tokenizer": "the 'tokenizer' block (vocabulary surgery) is not supported; use tokenizer_source",
    "chat_template": "'chat_template' is not supported by wweight",
}


@dataclass
class ModelEntry:
    path: str                               # absolute, normalised path of the model directory
    parameters: Dict[str, Any] = field(default_factory=dict)
    name: str = ""                          # as written in the YAML (for messages)
    lora: Optional[str] = None              # PEFT LoRA adapter merged in on the fly (``model: base+lora``)

    @property
    def ref(self):
        """What identifies the model: (directory, adapter)."""
        return (self.path, self.lora)


@dataclass
class MergeConfig:
    method: str
    base_model: Optional[ModelEntry]
    models: List[ModelEntry]                # the merged models, base excluded for task-vector methods
    parameters: Dict[str, Any]
    dtype: Optional[torch.dtype]
    out_dtype: Optional[torch.dtype]
    tokenizer_source: Optional[str]         # absolute path of the model whose tokenizer is copied
    source: str = "<config>"
    raw: Any = None                         # the YAML as given (written to OUT_DIR/mergekit_config.yml)
    #: ``slices:`` (wweight.config_slices.SliceDef); then ``models`` lists every referenced model once,
    #: without parameters (each source carries its own), and ``base_model`` is the top-level one
    slices: Optional[List[Any]] = None

    def resolve(self, name: str, tensor_name: str, model: Optional[ModelEntry] = None, default=None, *,
                t: float = 0.0, slice: Any = None):
        """Value of parameter ``name`` for ``tensor_name`` at layer position ``t`` (and ``model`` for
        per-model ones), as mergekit's ``ConfigReader``: the model's own (slice source) parameters,
        then the slice's, then the top-level ones; the first that gives a value wins."""
        for params in ((model.parameters if model is not None else None),
                       (slice.parameters if slice is not None else None), self.parameters):
            if params and name in params:
                v = evaluate_setting(params[name], tensor_name, t)
                if v is not None:
                    return v
        return default

    @property
    def is_iso(self) -> bool:
        return self.method in ISO_METHODS


def parse_dtype(name, argname: str = "dtype") -> Optional[torch.dtype]:
    if name is None:
        return None
    if isinstance(name, str) and name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    raise ConfigError(f"{argname} must be one of float32, float16, bfloat16, float64, got {name!r}")


#: Bounds on what a config may expand to. A merge config is a few dozen nodes; YAML aliases let a
#: 1 KB file expand to 10**8 nodes (a "billion laughs" bomb) that would hang the loader and then
#: every check that walks or prints the data, so the node graph is measured before it is built.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _expanded_size(root, limit: int) -> int:
    """Nodes of the composed YAML graph once aliases are expanded (memoised per node: a bomb is
    measured in the time of its distinct nodes); stops at ``limit + 1``. A recursive alias is a
    ConfigError-worthy ValueError."""
    import yaml

    sizes: Dict[int, int] = {}
    active = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("recursive alias (a node contains itself)")
        active.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            kids = node.value
        elif isinstance(node, yaml.MappingNode):
            kids = [c for kv in node.value for c in kv]
        else:
            kids = []
        for c in kids:
            n += size(c)
            if n > limit:
                break
        active.discard(key)
        sizes[key] = n = min(n, limit + 1)
        return n

    return size(root)


def load_yaml(path: str) -> Any:
    """``yaml.safe_load`` of ``path``, bounded; any YAML problem becomes a one-line ``ConfigError``.

    The document is composed first and its alias-expanded size checked against
    :data:`MAX_CONFIG_NODES` (and the file against :data:`MAX_CONFIG_BYTES`) before any Python
    object is constructed: the safe loader refuses code, not size."""
    import yaml

    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes; a merge "
                              "config is a few hundred bytes")
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            n = _expanded_size(node, MAX_CONFIG_NODES)
        except (ValueError, RecursionError) as e:
            why = e if isinstance(e, ValueError) else "nested too deeply"
            raise ConfigError(f"{path}: YAML not allowed: {why}") from None
        if n > MAX_CONFIG_NODES:
            raise ConfigError(f"{path}: YAML expands to more than {MAX_CONFIG_NODES} nodes (aliases / "
                              "anchors multiplying the document); refusing to load it")
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as e:
        # e.g. !!python/object/apply:os.system: safe_load refuses it, and so do we, loudly.
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark is not None else ""
        raise ConfigError(f"{path}: YAML tag not allowed{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _model_ref(v, where: str, src: str, cwd: Optional[str] = None):
    """(model, lora adapter or None) of a model reference, mergekit's ``MODEL(+LORA)?`` syntax
    (``ModelReference.validate_string``: split on '+', two parts at most). A path containing '+'
    that exists is a plain path (mergekit would split it)."""
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{src}: {where} must be a path to a local model directory, got {v!r}")
    if "+" not in v or os.path.exists(os.path.join(cwd or os.getcwd(), os.path.expanduser(v))):
        return v, None
    parts = v.split("+")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{src}: {where} {v!r}: expected MODEL or MODEL+LORA_ADAPTER (one '+'), and no "
                          "such path exists")
    return parts[0], parts[1]


def _refuse_unsupported(data: dict, src: str) -> None:
    """Everything in ``data`` that mergekit accepts (or nobody does) and wweight refuses: ONE
    ConfigError naming all of it (one problem: its own message, as before)."""
    problems = []
    for k in data:
        if k in _UNSUPPORTED_TOP:
            problems.append(_UNSUPPORTED_TOP[k])
        elif k not in _TOP_KEYS:
            problems.append(f"unknown top-level key {k!r} (expected one of {', '.join(_TOP_KEYS)})")
    if data.get("tokenizer_source") == "union":
        problems.append("tokenizer_source 'union' (vocabulary merging) is not supported; use 'base' or one of "
                        "the models")
    slices = data.get("slices")
    if isinstance(slices, list):
        for i, s in enumerate(slices):
            if isinstance(s, dict) and "residual_weight" in s:
                problems.append(f"slices[{i}].residual_weight is not supported by wweight")
    method = data.get("merge_method")
    if isinstance(method, str) and method not in METHODS:
        problems.append(f"unknown merge_method {method!r} (wweight supports {', '.join(METHODS)})")
    if len(problems) == 1:
        raise ConfigError(f"{src}: {problems[0]}")
    if problems:
        raise ConfigError(f"{src}: {len(problems)} unsupported settings: " + "; ".join(problems))


def _parse_models(data, src, method, spec, base, top, entry) -> List[ModelEntry]:
    """``models: [{model, parameters}]``, checked against the method (counts, required parameters)."""
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        also = " (or slices a non-empty list of {sources: [{model, layer_range}]})" if "slices" in data else ""
        raise ConfigError(f"{src}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}{also}")
    allowed_model = spec.names(M.PER_MODEL)
    models: List[ModelEntry] = []
    for i, m in enumerate(raw_models):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{src}: {where} must be a mapping with a 'model' key, got {m!r}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{src}: {where}: unknown key {sorted(extra)[0]!r}")
        params = _params(m.get("parameters"), f"{where}.parameters", src, method, allowed_model)
        e = entry(m["model"], f"{where}.model", params)
        # mergekit lists the base among `models` in many configs: for task-vector methods it is
        # not a task (its delta is zero) and mergekit drops it from the non-base inputs too.
        if base is not None and spec.needs_base and e.ref == base.ref:
            continue
        models.append(e)
    if not spec.needs_base and base is not None and all(e.ref != base.ref for e in models):
        # mergekit's linear merge takes base_model as one more input (its weight comes from the
        # top-level parameters): same here, first in the input order.
        models.insert(0, ModelEntry(base.path, {}, base.name, base.lora))
    if not models:
        raise ConfigError(f"{src}: models must list at least one model besides base_model")
    n, lo, hi = len(models), spec.min_models, spec.max_models
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        besides = " besides base_model" if spec.needs_base and base is not None else ""
        raise ConfigError(f"{src}: merge_method {method!r} takes {want} model(s){besides}, got {n}")
    seen = set()
    for e in models:
        if e.ref in seen:
            raise ConfigError(f"{src}: model {e.name!r} is listed twice")
        seen.add(e.ref)

    for name in (p.name for p in spec.params if p.required):  # mergekit's weight / t: no default in a config
        if spec.param(name).scope == M.SHARED:
            if name not in top:
                raise ConfigError(f"{src}: merge_method {method!r} needs parameters.{name} (top-level "
                                  f"parameters; mergekit has no default {name})")
            continue
        for i, e in enumerate(models):
            if name not in e.parameters and name not in top:
                who = "base_model" if base is not None and e.ref == base.ref else f"models[{i}]"
                raise ConfigError(f"{src}: {who} ({e.name}) needs parameters.{name} "
                                  f"(merge_method {method!r} has no default {name})")

    return models


def parse_config(data: Any, source: str = "<config>", *, cwd: Optional[str] = None) -> MergeConfig:
    """Validate a mergekit-style config (already loaded from YAML) into a :class:`MergeConfig`.

    Model paths are made absolute against ``cwd`` (default: the current directory). Existence of
    the directories is checked by the engine (``wweight.checkpoint``), not here.
    """
    src = source
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the config must be a YAML mapping, got {type(data).__name__}")
    _refuse_unsupported(data, src)
    method = data.get("merge_method")
    if method is None:
        raise ConfigError(f"{src}: merge_method is required")
    # Types first, each error naming its field: a list where a name belongs otherwise surfaces as
    # "unhashable type: 'list'" from a lookup far from the field.
    if not isinstance(method, str):
        raise ConfigError(f"{src}: merge_method must be a method name (one of {', '.join(METHODS)}), "
                          f"got {type(method).__name__}")
    for k, kinds, what in (("name", (str,), "a string"), ("dtype", (str,), "a dtype name"),
                           ("out_dtype", (str,), "a dtype name"), ("base_model", (str,), "a model path"),
                           ("tokenizer_source", (str,), "'base' or a model path"),
                           ("parameters", (dict,), "a mapping"), ("models", (list,), "a list"),
                           ("slices", (list,), "a list")):
        if data.get(k) is not None and not isinstance(data[k], kinds):
            raise ConfigError(f"{src}: {k} must be {what}, got {type(data[k]).__name__}")
    if method not in METHODS:
        raise ConfigError(f"{src}: unknown merge_method {method!r} (wweight supports {', '.join(METHODS)})")
    spec = M.get(method)
    cwd = cwd or os.getcwd()

    def absolute(p):
        local = os.path.normpath(os.path.join(cwd, os.path.expanduser(p)))
        # "org/name" that is not a local directory: a Hugging Face id, resolved by the reader
        # from the local cache (wweight/_hub.py)
        return p if not os.path.isdir(local) and looks_like_hub_id(p) else local

    def entry(v, where, params):
        ref, lora = _model_ref(v, where, src, cwd)
        return ModelEntry(absolute(ref), params, v, absolute(lora) if lora else None)

    base = None
    if data.get("base_model") is not None:
        base = entry(data["base_model"], "base_model", {})
    elif spec.needs_base and not spec.base_optional and not data.get("slices"):
        raise ConfigError(f"{src}: merge_method {method!r} needs base_model")
    allowed_model = spec.names(M.PER_MODEL)
    allowed_top = spec.names(M.SHARED) + allowed_model
    top = _params(data.get("parameters"), "parameters", src, method, allowed_top)
    slices = None
    if data.get("slices"):   # an empty list is no slices, as in mergekit (then models must be given)
        from .config_slices import parse_slices

        if data.get("models"):
            raise ConfigError(f"{src}: give either models or slices, not both (as mergekit)")
        slices, models = parse_slices(data["slices"], src, method, base, top, entry)
    else:
        models = _parse_models(data, src, method, spec, base, top, entry)

    dtype = parse_dtype(data.get("dtype"), "dtype")
    out_dtype = parse_dtype(data.get("out_dtype"), "out_dtype")

    tok = data.get("tokenizer_source")
    tok_path = None
    if tok is None or tok == "base":
        tok_path = base.path if base is not None else models[0].path
    elif tok == "union":
        raise ConfigError(f"{src}: tokenizer_source 'union' (vocabulary merging) is not supported; "
                          "use 'base' or one of the models")
    elif isinstance(tok, str):
        tok_path = absolute(tok)
        referenced = {e.path for e in models} | ({base.path} if base else set())
        if tok_path not in referenced:
            raise ConfigError(f"{src}: tokenizer_source {tok!r} is not one of the config's models")
    else:
        raise ConfigError(f"{src}: tokenizer_source must be 'base' or a model path, got {tok!r}")

    return MergeConfig(method=method, base_model=base, models=models, parameters=top, dtype=dtype,
                       out_dtype=out_dtype, tokenizer_source=tok_path, source=src, raw=copy.deepcopy(data),
                       slices=slices)


def load_config(path: str) -> MergeConfig:
    """Read and validate a merge YAML file (safe loader only)."""
    return parse_config(load_yaml(path), source=path)
