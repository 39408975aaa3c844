"""Triton kernels of wweight (``@triton.jit`` functions only), one module per op family.

Launched by ``wweight/backends/triton/<family>.py``; every kernel is tested against the reference in
``wweight.reference`` (on CPU through ``TRITON_INTERPRET=1``). Importing a kernel module imports
triton, so wweight imports them lazily, only when the Triton backend runs.

Why here and not in a top-level ``kernels/`` folder (the design card's name): the kernels are
Python modules the package imports at run time, so they belong to the package; a top-level folder
reached ``wweight.kernels`` only through ``package_dir`` at install time, which left the source tree
without the module and hid from it that the kernels are part of wweight.
"""
