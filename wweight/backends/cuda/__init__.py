"""Backend ``cuda``: the pybind11 CUDA extension ``wweight._cuda`` (``csrc/*.cu``), CUDA tensors only."""
