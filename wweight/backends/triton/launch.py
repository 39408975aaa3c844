"""Every Triton launch of the package goes through :func:`launch`.

One place for what each launch must get right and the interpreter does not check:

* the grid is within the hardware limits (grid.x < 2**31, grid.y and grid.z <= 65,535): a launch
  past them fails on the GPU only, so :func:`check_grid` refuses it with the numbers instead;
* the launch runs under the device of its tensors (Triton launches on the *current* device; a
  tensor on ``cuda:1`` would otherwise be read through ``cuda:0``'s context);
* recording: :func:`recording` captures each launch (kernel, grid, arguments, options) without
  changing it, which is how ``wweight/backends/triton/aot.py`` compiles every kernel for sm_90
  with the exact arguments the launchers pass, on machines without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Sequence

import torch

from ..._ext import device_guard

#: CUDA's launch limits (every architecture since sm_30)
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)

_recorders: List[Callable] = []


def check_grid(grid: Sequence[int], name: str = "kernel") -> tuple:
    """The grid as a 3-tuple of ints; ``ValueError`` when an axis is empty-negative or past its limit."""
    g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
    if len(g) != 3:
        raise ValueError(f"{name}: a grid has at most 3 axes, got {tuple(grid)}")
    for axis, (v, lim) in enumerate(zip(g, GRID_LIMITS)):
        if v < 0 or v > lim:
            raise ValueError(f"{name}: grid axis {'xyz'[axis]} = {v} is outside [0, {lim}] "
                             "(CUDA launch limit); this is a bug in the launcher's grid")
    return g


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect ``(kernel, grid, args, kwargs)`` of every launch in the block (the launches still run)."""
    launches: list = []
    rec = lambda kernel, grid, args, kwargs: launches.append((kernel, grid, args, kwargs))  # noqa: E731
    _recorders.append(rec)
    try:
        yield launches
    finally:
        _recorders.remove(rec)


def launch(kernel, grid: Sequence[int], *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` after the grid check, under the tensors' CUDA device."""
    g = check_grid(grid, getattr(getattr(kernel, "fn", None), "__name__", "kernel"))
    # every kernel here is bit-exact against a reference that rounds each product and sum
    # (mergekit, torch): FMA contraction is off unless a launcher asks for it
    kwargs.setdefault("enable_fp_fusion", False)
    for rec in _recorders:
        rec(kernel, g, args, kwargs)
    if 0 in g:
        return None
    with device_guard(args):
        return kernel[g](*args, **kwargs)


def program_target(device: torch.device) -> int:
    """How many programs a grid-stride kernel should launch on ``device``: 8 per streaming
    multiprocessor on a GPU, 4 under the CPU interpreter (few, fat programs run fastest there)."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
