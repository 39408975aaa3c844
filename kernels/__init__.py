"""Triton kernels of wweight, installed as ``wweight.kernels``.

One module per op family; every kernel is tested against the reference in
``wweight.reference`` (on CPU through ``TRITON_INTERPRET=1``). Importing this package
imports triton, so wweight imports it lazily, only when the Triton backend runs.
"""
