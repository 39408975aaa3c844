"""mergekit 0.1.5's other merge methods: slerp, nuslerp, multislerp, karcher, model_stock, sce, ram,
ramplus_tl, nearswap, arcee_fusion, passthrough (the ``interp`` family of :mod:`wweight.methods`).

:mod:`.ops` validates and routes (``backend="reference"`` runs :mod:`wweight.reference.interp`, a
line-by-line transcription of mergekit; every other backend runs :mod:`.fast`, the vectorised torch
path with the same numbers on CPU and GPU tensors). Use them through :func:`wweight.merge_tensors`
/ :func:`wweight.merge_state_dicts` or ``wweight merge``.
"""
from .ops import interp_merge_state_dicts, interp_merge_tensors

__all__ = ["interp_merge_tensors", "interp_merge_state_dicts"]
