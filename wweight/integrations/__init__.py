"""Drop-in adapters: wweight's ops inside other libraries.

* :mod:`wweight.integrations.mergekit` -- ``install()`` registers wweight-backed merge methods in
  mergekit's own registry (Iso-C / Iso-CTS / TSV-M become mergekit methods; the methods both libraries
  have run on wweight's kernels); ``python -m wweight.integrations.mergekit CONFIG OUT`` is
  ``mergekit-yaml`` with them installed.
* :mod:`wweight.integrations.peft` -- ``install()`` / ``uninstall()`` for PEFT's ``merge_utils`` (and so
  ``LoraModel.add_weighted_adapter``).
* :mod:`wweight.integrations.fusion_bench` -- Iso-C / Iso-CTS / TSV-M / TIES as FusionBench algorithms.

Each adapter imports its host library only when the adapter module itself is imported: importing
``wweight`` or ``wweight.integrations`` never imports mergekit (or any other host), and wweight does
not depend on them.
"""
from __future__ import annotations

import importlib

__all__ = ["mergekit", "peft", "fusion_bench"]


def __getattr__(name):
    # ``wweight.integrations.mergekit`` as an attribute imports the adapter (and so its host) on
    # first use only, which keeps ``import wweight.integrations`` free of host imports.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
