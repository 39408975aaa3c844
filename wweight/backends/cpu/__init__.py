"""Backend ``cpu``: the C++/OpenMP extension ``wweight._cpu`` (``csrc/cpu/``), CPU tensors only."""
