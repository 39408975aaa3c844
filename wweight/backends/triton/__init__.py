"""Backend ``triton``: launchers of the Triton kernels in ``wweight/kernels/`` (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``). Importing a module here imports triton."""
