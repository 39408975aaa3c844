"""Parameter settings of a merge config: validation and mergekit's ``evaluate_setting``.

A setting is a scalar, a *gradient* (a list of scalars interpolated over the layer position ``t``)
or a list of ``{filter, value}`` whose values are scalars or gradients (mergekit 0.1.5,
``mergekit/config.py``). :func:`check_param` validates one against the method registry
(:mod:`wweight.methods`); :func:`evaluate_setting` gives its value for one tensor at one ``t``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from . import methods as M


class ConfigError(ValueError):
    """A bad merge configuration; the message names the file and the offending field."""


def evaluate_setting(setting, tensor_name: str, t: float = 0.0):
    """mergekit 0.1.5's ``evaluate_setting`` (``mergekit/config.py``) on a validated setting.

    ``setting``: a scalar; a gradient (a list of scalars); a ``{filter, value}`` mapping or a list of
    them whose ``value`` is a scalar or a gradient. ``t`` in [0, 1] is the layer's position (see
    :func:`wweight.checkpoint.slices.layer_t`). A gradient of numbers is interpolated linearly:
    ``scaled = t (n - 1)``, ``i0 = int(scaled)``, ``i1 = min(n - 1, i0 + 1)``,
    ``(1 - frac) values[i0] + frac values[i1]`` in Python floats, the same expression as mergekit, so
    the same float64 result; a list holding a bool or string picks ``values[int(t (n - 1))]``. A filter
    matches when it is None, ``"*"`` or a substring of ``tensor_name`` (not a glob, as in mergekit).
    ``None`` when nothing matches (the next scope, or the default, decides)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, (dict, list)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def check_param(name: str, value, where: str, src: str, method: str):
    spec = M.get(method).param(name)

    def bad(expected):
        raise ConfigError(f"{src}: {where}.{name} must be {expected}, got {value!r}")

    def one(v):
        if spec.kind is bool:
            if not isinstance(v, bool):
                bad("true or false")
            return v
        if isinstance(v, str):
            # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; mergekit's pydantic validation makes
            # a float of a numeric string, so does this
            try:
                v = float(v.strip())
            except ValueError:
                bad("a finite number")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            bad("a finite number")
        if spec.kind is int and float(v) != int(v):
            bad("an integer")
        v = float(v)
        if v not in spec.config_range:
            bad(f"in {spec.config_range}")
        return v

    def scalar_or_gradient(v, at: str):
        # a gradient: a list of scalars, interpolated over the layer position (evaluate_setting);
        # every value is checked, so every interpolated value lies in the (interval) range too
        if not isinstance(v, list):
            return one(v)
        if not v:
            raise ConfigError(f"{src}: {at}: an empty list (a gradient needs at least one value)")
        if any(isinstance(e, (dict, list)) for e in v):
            raise ConfigError(f"{src}: {at} must be a number, a gradient (a list of numbers) or a list of "
                              f"{{filter, value}}, got {v!r}")
        if spec.kind is int and len(v) > 1:
            raise ConfigError(f"{src}: {at}: gradients of the integer parameter {name!r} are not supported")
        return [one(e) for e in v]

    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out = []
        for i, cond in enumerate(value):
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise ConfigError(f"{src}: {where}.{name}[{i}] must be {{filter, value}}, got {cond!r}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ConfigError(f"{src}: {where}.{name}[{i}].filter must be a string")
            out.append({"filter": cond.get("filter"),
                        "value": scalar_or_gradient(cond["value"], f"{where}.{name}[{i}].value")})
        return out
    if isinstance(value, dict) and "value" in value:
        return check_param(name, [value], where, src, method)
    return scalar_or_gradient(value, f"{where}.{name}")


def parse_params(raw, where: str, src: str, method: str, allowed: Sequence[str]) -> Dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where} must be a mapping, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in allowed:
            raise ConfigError(f"{src}: {where}.{k} is not a parameter of merge_method {method!r} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
        out[k] = check_param(k, v, where, src, method)
    return out
