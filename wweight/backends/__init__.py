"""Per-backend glue: ``wweight/backends/<backend>/<family>.py``, one module per (backend, family).

Data flows one way: public op (``wweight/<family>/``) -> ``wweight._dispatch.resolve`` picks a
backend name -> :func:`wweight._dispatch.backend_module` imports the glue here -> the glue runs
the kernel (``wweight/kernels/<family>.py`` for Triton, ``csrc/<family>.cu`` through ``wweight._cuda``
for CUDA, ``csrc/cpu/<family>_cpu.cpp`` through ``wweight._cpu`` for the C++ CPU build) or is the
vectorised-torch implementation itself. Glue calls no public op: it uses only the family's shared
algorithm (``wweight/sparse/plan.py`` and ``fused.py``, ``wweight/quant/scales.py`` and ``outliers.py``,
...). Importing those runs the family package's ``__init__`` (which registers the ops) but makes no
import cycle: the op layer reaches the glue only through :func:`wweight._dispatch.backend_module`.

Every module of a family has the same functions (the family's backend contract):

``sparse`` (torch, cpu, cuda, triton) - over "the delta of model t", ``d_t = round(x_t - base)``
(``x_t`` itself when ``base`` is None); ``xs`` are the K contiguous inputs:

* ``digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix)`` -> (Q, 2**nbits)
  int64 histogram of one radix digit of the magnitude keys, per query;
* ``tie_counts(xs, base, qmodel, qkey)`` -> (Q, nblocks) int64: per ``BLOCK``, keys equal to the query's;
* ``rescale_stats(xs, base, plan, norm)`` -> (K, 2) float64 (before, after) norms under the masks;
* ``merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize,
  sparsify_only=False, round16=None)`` -> (K+1,) int32 NaN/Inf flags; writes ``out`` (the torch
  module needs a ``base``: its ``linear`` merge is the reference, mergekit's fp32 ``addcmul``).
* cpu only: ``della_available()``; ``della_merge(xs, base, weights, density, epsilon, lambda_,
  normalize, rescale, seed, consensus)`` -> the merged tensor, or None where the sums over the models
  cannot follow torch's order (the caller runs the reference); ``della_sparsify(x, density, epsilon,
  rescale_norm, seed, stream)`` -> the sparsified tensor (``csrc/cpu/della_cpu.cpp``).

``quant`` (torch, cpu, cuda, triton):

* ``quantize(x, mask, thr, bits, bs, symmetric, clip, scale_dtype, one_pass=None)`` -> (codes, scale,
  zero or None, sorted outlier flat indices int64) of the flat contiguous ``x`` (``one_pass=False``
  forces the statistics + pack kernels where a one-pass kernel exists; the self-test runs both);
* ``dequantize(codes, scale, zero, n, dtype, bits, bs)`` -> flat tensor (outliers restored above);
* triton only: ``dequant_matmul(x, codes, scale, zero, N, K, bits, bs)`` -> float32 ``x @ W_hat^T``.

``iso`` (torch, triton): ``task_vectors(base, finetuned, each, total, bad, dtype)`` fills the task
vectors, their sum and a per-task NaN/Inf count.

``interp`` (triton): ``nearswap(base, other, t)``, ``ram(base, tensors, epsilon)``,
``ramplus_tl(base, tensors, r, alpha, epsilon)``, ``slerp(t, v0, v1, dot_threshold, eps)`` -> a new
tensor with mergekit 0.1.5's bits (fp32/bf16/fp16, K <= 4 for RAM; the caller routes float64, empty
tensors and K >= 5 to ``wweight.interp.fast``); slerp's norms and dot stay torch reductions.

``permute``:

* torch: ``solve_square_max(benefit)`` -> (col, certified) for (B, n, n) benefits (the auction);
* cpu, cuda: ``lap_solve(cost)`` -> (col, u, v, status), exact shortest augmenting paths (cpu:
  LAPJV, ``csrc/cpu/lap_cpu.cpp``; cuda: one thread block per problem, ``csrc/lap.cu``). ``cost`` is a
  (B, n, m) contiguous float64 tensor on the backend's device with n <= m (the caller transposes),
  minimised; +inf entries are forbidden pairs; no NaN / -inf (the caller checks). col (B, n) int64
  is the column of each row; u (B, n) and v (B, m) float64 are duals with ``u_i + v_j <= c_ij`` on
  every finite entry (to float64 rounding), equality on the assignment, ``v <= 0`` and ``v == 0`` on
  unassigned columns (the rectangular LP dual), so one O(nm) pass certifies optimality; status (B,)
  int32: 0 solved, 1 infeasible (no assignment of finite total), 2 gave up (the caller falls back to
  scipy). CUDA: everything stays on the device (no host sync; the caller reads status). The cpu
  module also has ``available()`` (False: ``lap_solve`` raises RuntimeError) and
  ``lap_solve_block_model(cost, threads)``, the CUDA kernel's algorithm run serially (CI tests it);

each module's ``stats`` dict counts its work (problems, augmentations, fallbacks, ...).

A CUDA glue module also exports ``SELFTESTS = {kernel set: fn(device) -> bool}``: run the first time
the kernel set is picked on a device, against the reference; a failure disables those kernels.
"""
