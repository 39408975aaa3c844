"""The large-n LAP solver on the CUDA extension (``csrc/lap_auction.cu``): one cooperative launch per problem.

``auction_lap_solve(cost)`` has the contract of :func:`wweight.backends.torch.permute.lap_solve` on CUDA
tensors: (B, n, m) contiguous float64 costs, n <= m, minimised, ``+inf`` forbidden. It makes no host
sync: the schedule, the precheck, the kernel's whole eps-scaled auction and the dual certificate are
queued on torch's current stream and ``status`` stays on the device. The kernel's rounds are those of
the torch model (``lap_solve`` on CPU tensors, tested against scipy) up to its first certificate; a
problem whose first certificate fails gets status 2 here (the torch model would go on to smaller eps),
and a price past the infeasibility bound is status 2 too (the model proves infeasibility with a host
matching; the caller's scipy fallback reports it). Meant for large single problems (n >= ~1024); one
launch per problem of a batch.
"""
from __future__ import annotations

import torch

from ..._ext import cpu_extension, cuda_extension, on_tensor_device, stream
from ..torch import permute as model

# int32 word offsets of the counters in the kernel's Ctl struct (csrc/lap_auction.cu)
CTL_PHASES, CTL_ROUNDS, CTL_REVERSE_ROUNDS, CTL_STATUS = 8, 9, 10, 11
# device (B, 4) int32 (phases, rounds, reverse_rounds, kernel status) of the last call: read it
# (a host sync) only when you want the counters
last_counters = None


@on_tensor_device
def auction_lap_solve(cost: torch.Tensor, *, max_rounds: int = 0, certify_iter: int = 64):
    """(col (B, n) int64, u (B, n), v (B, m) float64, status (B,) int32) of (B, n, m) CUDA costs."""
    if cost.device.type != "cuda":
        raise ValueError(f"cost must be a CUDA tensor, got one on {cost.device}")
    ext = cuda_extension()
    st = stream(cost)
    return _solve(cost, lambda *p: ext.lap_auction(*p, st), ext.LAP_AUCTION_CTL_BYTES, max_rounds, certify_iter)


def cpu_model_solve(cost: torch.Tensor, *, max_rounds: int = 0, certify_iter: int = 64):
    """The same solve on CPU tensors through the kernel's serial C++ model (``wweight._cpu.lap_auction_cpu``,
    the kernel's own ``wweight::lap::solve``): what the tests run in place of the GPU."""
    if cost.device.type != "cpu":
        raise ValueError(f"cost must be a CPU tensor, got one on {cost.device}")
    ext = cpu_extension()
    return _solve(cost, ext.lap_auction_cpu, ext.LAP_AUCTION_CTL_BYTES, max_rounds, certify_iter)


def _solve(cost, launch, ctl_bytes, max_rounds, certify_iter):
    global last_counters
    if cost.dim() != 3 or cost.dtype != torch.float64 or not cost.is_contiguous():
        raise ValueError(f"cost must be a contiguous (B, n, m) float64 tensor, got {tuple(cost.shape)} {cost.dtype}")
    B, n, m = cost.shape
    if n > m:
        raise ValueError(f"cost must have n <= m (transpose first), got n={n}, m={m}")
    if m > model.MAX_N:
        raise ValueError(f"cost: m must be <= {model.MAX_N} (key index bits), got {m}")
    dev = cost.device
    if B == 0 or n == 0:
        z = torch.zeros(B, dtype=torch.int32, device=dev)
        return (torch.zeros(B, n, dtype=torch.long, device=dev), torch.zeros(B, n, dtype=torch.float64, device=dev),
                torch.zeros(B, m, dtype=torch.float64, device=dev), z)
    if max_rounds <= 0:
        max_rounds = 50 * n + 2000
    a, bad = model.prepare(cost)
    eps0, eps_try, _, cap, _ = model.schedule(a)
    sched = torch.stack([eps0, eps_try, cap], dim=1).contiguous()
    # rows without a finite entry would bid on column 0 until the price bound: give the solver a
    # harmless problem instead (its status is overwritten below)
    a = torch.where(bad.view(B, 1, 1), torch.zeros_like(a), a)
    at = a.transpose(1, 2).contiguous() if n < m else a
    f64 = dict(dtype=torch.float64, device=dev)
    price, pnew, pi = torch.zeros(B, m, **f64), torch.zeros(B, m, **f64), torch.zeros(B, n, **f64)
    col = torch.zeros(B, n, dtype=torch.int32, device=dev)
    owner = torch.zeros(B, m, dtype=torch.int32, device=dev)
    key = torch.zeros(B, m, dtype=torch.int64, device=dev)
    rkey = torch.zeros(B, n, dtype=torch.int64, device=dev)
    ctl = torch.zeros(B, ctl_bytes // 4, dtype=torch.int32, device=dev)
    for b in range(B):
        launch(a[b].data_ptr(), at[b].data_ptr(), sched[b].data_ptr(), price[b].data_ptr(), pnew[b].data_ptr(),
               pi[b].data_ptr(), col[b].data_ptr(), owner[b].data_ptr(), key[b].data_ptr(), rkey[b].data_ptr(),
               ctl[b].data_ptr(), n, m, max_rounds)
    last_counters = ctl[:, [CTL_PHASES, CTL_ROUNDS, CTL_REVERSE_ROUNDS, CTL_STATUS]]
    kst = ctl[:, CTL_STATUS]
    col64 = col.to(torch.long).clamp_(0, m - 1)
    ok, p_opt = model.certify(a, col64, price, owner.to(torch.long), torch.minimum(eps0, eps_try), certify_iter,
                              sync=False)
    u, v = model.duals(cost, col64, p_opt)
    status = torch.where(bad, 1, torch.where((kst == 0) & ok, 0, 2)).to(torch.int32)
    return col64, u, v, status
