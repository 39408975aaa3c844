"""Planning for the sparse family, shared by every backend.

A backend provides four primitives over "the delta of model t", ``d_t = round(x_t - base)``
(or ``x_t`` itself with no base): ``digit_hist``, ``tie_counts``, ``rescale_stats`` and
``merge`` (``wweight/backends/<backend>/sparse.py``; the contract is in
``wweight/backends/__init__.py``). This module turns method parameters into a :class:`MaskPlan`
using those primitives:

* exact k-th largest ``|d|`` by radix select on the magnitude bits of ``d`` (31 bits for fp32,
  15 bits for fp16/bf16; digits of 11/11/9 bits -> 3 passes for fp32, 11/4 -> 2 passes for 16-bit;
  the CPU backend uses 16/15 -> 2 passes and 15 -> 1 pass),
  all queries (models, lower/upper cut) answered in the same passes;
* keep windows on the tie group at each cut, so that ties are broken by flat index exactly
  like a stable sort (see ``wweight/reference/sparse.py``); per-block tie counts are only
  computed when a cut falls inside a group of equal, non-zero magnitudes;
* rescale factors (``l1``, ``l2``, ``linf``, ``density``) rounded in mergekit's work dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .._ext import device_tensor

# The kernels read these: wweight/kernels/sparse.py imports them, csrc/sparse_elem.h mirrors them
# (kBlock, Mode) and tests/test_layout.py checks the compiled values.
BLOCK = 1024              # elements per block of the merge / tie kernels (tie offsets are per block)
BIG = 1 << 62             # "no limit" for keys and tie windows
MODE_NONE, MODE_WINDOW, MODE_RANDOM = 0, 1, 2
EPS = 1e-7
NORM_CODES = {"l1": 1, "l2": 2, "linf": 3}   # the rescale_stats kernels' NORM argument


def reduce_norm_partials(part: torch.Tensor, norm: str) -> torch.Tensor:
    """(K, nblocks, 2) per-block float32 (before, after) partials -> (K, 2) float64 (max for linf)."""
    part = part.double()
    return part.amax(dim=1) if norm == "linf" else part.sum(dim=1)


def key_bits(dtype: torch.dtype) -> int:
    return 15 if dtype in (torch.float16, torch.bfloat16) else 31


def digits_for(bits: int) -> List[Tuple[int, int]]:
    """(shift, nbits) of each radix pass, most significant first (a backend may pick its own: a
    ``digits_for`` function in its primitives module, e.g. wider digits on CPU, where a histogram
    of 2^16 counters per thread is cheap and every pass saved is one read of all inputs)."""
    return [(20, 11), (9, 11), (0, 9)] if bits == 31 else [(4, 11), (0, 4)]


def key_to_value(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.float16, torch.bfloat16):
        return keys.to(torch.int16).view(dtype)
    return keys.to(torch.int32).view(torch.float32)


def radix_select(prims, xs, base, qmodel: torch.Tensor, ks: torch.Tensor, dtype: torch.dtype):
    """Exact k-th largest magnitude key per query (all on device, no host sync).

    Returns ``(key, count_gt, count_eq)``: int64 tensors of shape (Q,).
    """
    Q = qmodel.numel()
    dev = qmodel.device
    prefix = torch.zeros(Q, dtype=torch.int64, device=dev)
    k_rem = ks.clone()
    count_eq = torch.zeros(Q, dtype=torch.int64, device=dev)
    rows = torch.arange(Q, device=dev)
    for i, (shift, nbits) in enumerate(getattr(prims, "digits_for", digits_for)(key_bits(dtype))):
        hist = prims.digit_hist(xs, base, qmodel, prefix, shift, nbits, shift + nbits, i > 0)
        nb = 1 << nbits
        cum = hist.flip(-1).cumsum(-1)                       # cum[:, j]: count in bins >= nb-1-j
        j = torch.searchsorted(cum, k_rem.unsqueeze(1)).squeeze(1).clamp_(max=nb - 1)
        b = nb - 1 - j
        in_bin = hist[rows, b]
        k_rem = k_rem - (cum[rows, j] - in_bin)
        prefix = prefix | (b << shift)
        count_eq = in_bin
    return prefix, ks - k_rem, count_eq


def first(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor]) -> torch.Tensor:
    """The tensor that fixes n, dtype and device of a primitive call: base, else the first input."""
    return base if base is not None else xs[0]


def round16(dtype: torch.dtype, override: Optional[bool] = None) -> bool:
    """Whether the merge rounds every step to the 16-bit input dtype (as mergekit's torch code)."""
    return dtype in (torch.float16, torch.bfloat16) if override is None else bool(override)


@dataclass
class MaskPlan:
    mode: int
    kp: torch.Tensor            # (K, 6) int64: key_lo, key_hi, lo window [a, b), hi window [c, e)
    tie_offsets: torch.Tensor   # (K, 2, nblocks) int64 exclusive prefix counts, or a dummy
    has_ties: bool
    density: torch.Tensor       # (K,) float32 (random mode)
    seed_lo: int = 0
    seed_hi: int = 0
    stream0: int = 0            # model t draws Philox stream stream0 + t
    # random mode, CPU backend: (K, ceil(n / 32)) int32 keep masks that its statistics pass drew, which
    # its merge then reads instead of drawing them again (wweight/backends/cpu/sparse.py); else None
    keep_bits: Optional[torch.Tensor] = None

    @property
    def seed(self) -> int:
        return (self.seed_hi << 32) | self.seed_lo

    def raw_args(self, density) -> tuple:
        """The plan as the compiled kernels take it: (mode, kp*, ties* or 0, density, seed, stream0);
        ``density`` is passed as the extension wants it (a device pointer or a list)."""
        ties = self.tie_offsets.data_ptr() if self.has_ties else 0
        return self.mode, self.kp.data_ptr(), ties, density, self.seed, self.stream0


def _window(a: int, b: int, eq: int, key: int) -> Tuple[int, int, bool]:
    """Clip a rank window to the tie group [0, eq); returns (a, b, needs_ranks)."""
    a, b = max(a, 0), min(b, eq)
    if b <= a or key == 0:
        return 0, 0, False            # nothing kept (zeros never change a merge)
    if a == 0 and b >= eq:
        return 0, BIG, False          # the whole group kept
    return a, b, True


def build_plan(prims, xs: Sequence[torch.Tensor], base: Optional[torch.Tensor], method: Optional[str],
               density: Sequence[float], gamma: Sequence[float], seed: int, stream0: int = 0) -> MaskPlan:
    ref = first(xs, base)
    dev, dtype, n, K = ref.device, ref.dtype, ref.numel(), len(xs)
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    seed &= (1 << 64) - 1
    slo, shi = seed & 0xFFFFFFFF, seed >> 32
    # every small table below is built on the host and copied without a sync (device_tensor)
    if method == "random":
        # mergekit's keep probability is density rounded to the work dtype
        dens_t = device_tensor([float(d) for d in density], work_dtype(dtype, "random"), dev).float()
        return MaskPlan(MODE_RANDOM, torch.zeros((K, 6), dtype=torch.int64, device=dev), dummy, False,
                        dens_t, slo, shi, stream0)
    dens_t = device_tensor([float(d) for d in density], torch.float32, dev)
    if method is None:
        return MaskPlan(MODE_NONE, torch.zeros((K, 6), dtype=torch.int64, device=dev), dummy, False, dens_t)
    if method not in ("magnitude", "magnitude_outliers"):
        raise ValueError(f"method {method!r} has no fused plan")

    kp = [[-1, BIG, 0, 0, 0, 0] for _ in range(K)]        # default: keep everything
    queries = []                                          # (t, which_cut, k)
    spec = []                                             # per model: None | ("mag", k) | ("out", n_bot, target)
    for t in range(K):
        d = float(density[t])
        if d >= 1:
            spec.append(None)
            continue
        if method == "magnitude":
            if d <= 0 or n == 0:
                kp[t] = [BIG, BIG, 0, 0, 0, 0]
                spec.append(None)
                continue
            k = max(1, int(d * n))
            spec.append(("mag", k))
            queries.append((t, 0, k))
        else:
            target = int(d * n)
            n_top = int(float(gamma[t]) * n)
            n_bot = max(0, n - target - n_top)
            if target <= 0:
                kp[t] = [BIG, BIG, 0, 0, 0, 0]
                spec.append(None)
                continue
            spec.append(("out", n_bot, target))
            queries.append((t, 0, n - n_bot))                 # value at ascending position n_bot
            queries.append((t, 1, n - n_bot - target + 1))    # value at ascending position n_bot+target-1
    need = []                                             # (t, cut, key, query) needing tie ranks
    known_ties = None                                     # (Q, nblocks) tie counts a fast select gave
    if queries:
        keys, gts, eqs, known_ties = _select(prims, xs, base, queries, dtype, dev)
        for qi, ((t, cut, k), key, gt, eq) in enumerate(zip(queries, keys, gts, eqs)):
            s = spec[t]
            if s[0] == "mag":
                a, b, r = _window(0, k - gt, eq, key)
                kp[t] = [key, BIG, a, b, 0, 0]
            else:
                _, n_bot, target = s
                lt = n - gt - eq
                a, b, r = _window(n_bot - lt, n_bot + target - lt, eq, key)
                kp[t][cut] = key
                kp[t][2 + 2 * cut: 4 + 2 * cut] = [a, b]
            if r:
                need.append((t, cut, key, qi))
    kp_t = device_tensor(kp, torch.int64, dev)
    if not need:
        return MaskPlan(MODE_WINDOW, kp_t, dummy, False, dens_t)
    nblocks = (n + BLOCK - 1) // BLOCK
    rows = {}                                             # need index -> its (nblocks,) counts
    if known_ties is not None:
        rows = {i: known_ties[0][qi] for i, (_, _, _, qi) in enumerate(need) if known_ties[1][qi]}
    rest = [i for i in range(len(need)) if i not in rows]
    if rest:
        qm = device_tensor([need[i][0] for i in rest], torch.int64, dev)
        qk = device_tensor([need[i][2] for i in rest], torch.int64, dev)
        counts = prims.tie_counts(xs, base, qm, qk)                   # (Q', nblocks)
        rows.update({i: counts[j] for j, i in enumerate(rest)})
    counts = torch.stack([rows[i] for i in range(len(need))])
    excl = torch.cumsum(counts, dim=1) - counts
    offs = torch.zeros((K, 2, nblocks), dtype=torch.int64, device=dev)
    for i, (t, cut, _, _) in enumerate(need):
        offs[t, cut] = excl[i]
    return MaskPlan(MODE_WINDOW, kp_t, offs, True, dens_t)


def _select(prims, xs, base, queries, dtype, dev):
    """(keys, count_gt, count_eq) host lists of every query, and ``(ties, resolved)`` from a backend's
    one-pass ``select`` (its per-block tie counts, and which rows it answered) or None. The backend's
    select answers most queries in one pass; the radix passes answer the rest (and every query of a
    backend without one). Either way the answers are exact: the same numbers."""
    Q = len(queries)
    keys, gts, eqs = [0] * Q, [0] * Q, [0] * Q
    rest = list(range(Q))
    known = None
    if hasattr(prims, "select"):
        res, ties = prims.select(xs, base, [q[0] for q in queries], [q[2] for q in queries])
        res_l = res.tolist()
        resolved = [bool(r[3]) for r in res_l]
        for i, r in enumerate(res_l):
            if resolved[i]:
                keys[i], gts[i], eqs[i] = r[0], r[1], r[2]
        rest = [i for i in range(Q) if not resolved[i]]
        known = (ties, resolved)
    if rest:
        qm = device_tensor([queries[i][0] for i in rest], torch.int64, dev)
        ks = device_tensor([queries[i][2] for i in rest], torch.int64, dev)
        k2, g2, e2 = torch.stack(radix_select(prims, xs, base, qm, ks, dtype)).tolist()  # the plan's one sync
        for j, i in enumerate(rest):
            keys[i], gts[i], eqs[i] = k2[j], g2[j], e2[j]
    return keys, gts, eqs, known


def work_dtype(dtype: torch.dtype, sparsification: str) -> torch.dtype:
    """mergekit's dtype for the rescale arithmetic (random/DELLA upcast fp16 to fp32)."""
    if sparsification in ("random", "della_magprune") and dtype == torch.float16:
        return torch.float32
    return dtype


def rescale_factors(prims, xs, base, plan: MaskPlan, norm: Optional[str], density: Sequence[float],
                    dtype: torch.dtype, wdtype: torch.dtype) -> torch.Tensor:
    """(K,) float32 multipliers applied to the masked delta (1.0 = mergekit's "no rescale")."""
    K = len(xs)
    dev = first(xs, base).device
    if norm is None:
        return torch.ones(K, dtype=torch.float32, device=dev)
    if norm == "density":
        return device_tensor([1.0 / float(d) if d < 1 else 1.0 for d in density], wdtype, dev).float()
    st = prims.rescale_stats(xs, base, plan, norm)                   # (K, 2) float64
    if norm == "l2":
        st = st.sqrt()
    st = st.to(wdtype)                                               # mergekit reduces in the work dtype
    before, after = st[:, 0], st[:, 1]
    ratio = (before / after).float()
    ok = (before.float() >= EPS) & (after.float() >= EPS)
    # density >= 1 returns the tensor untouched in mergekit (no rescale at all)
    full = device_tensor([float(d) >= 1 for d in density], torch.bool, dev)
    return torch.where(ok & ~full, ratio, torch.ones_like(ratio))
