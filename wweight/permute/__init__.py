"""Permutation weight matching (Git Re-Basin).

Papers: Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries"
(ICLR 2023; code github.com/samuela/git-re-basin, ``weight_matching.py``), and Ito, Yamada & Kumagai,
"Analysis of Linear Mode Connectivity via Permutation-Based Weight Matching" (2024).

Model B's hidden units are permuted to line up with model A's so the two can be interpolated or
merged with a low loss barrier. Weight matching is coordinate descent: for each permutation in turn
(random order every round) the cost ``sum_w  W_a(axis -> rows) @ W_b(other axes permuted).T`` over
every parameter that touches it is maximised by an exact linear assignment; it stops when a whole
round improves no permutation.

Spec format (PyTorch layout)
----------------------------
``PermutationSpec({param_name: axes})`` with one entry per axis of the parameter:

* ``None``: the axis is not permuted;
* ``"P"``: the axis is permuted by the permutation ``P`` (a LongTensor ``perm`` of its size:
  ``new = old.index_select(axis, perm)``, i.e. ``perm[new_position] = old_position``);
* a tuple ``("Ph", "Pd")`` (any depth): the axis is a nested block structure, e.g. attention heads
  of ``head_dim`` each. Level 0 permutes whole blocks (``Ph``, shape (H,)); a deeper level permutes
  inside every block separately and is a 2-D LongTensor of shape (number of parent blocks, block
  size) whose row ``b`` is the permutation inside the block that was at position ``b`` in the
  *original* (un-permuted) order. The last level may be ``None`` (not permuted; its size is
  inferred), e.g. ``("Pkv", None)`` moves GQA key/value heads as whole heads. The sizes of perms
  that only appear inside tuples are given with ``sizes={"Ph": 12, "Pd": 64}``.
* a list of the above (no ``None``): the axis is a concatenation of segments, e.g. GPT-2's fused
  ``c_attn`` output ``[("Ph", "Pqk"), ("Ph", "Pqk"), ("Ph", "Pv")]`` for Q | K | V.

Parameters not named in the spec are left unpermuted (e.g. ``num_batches_tracked``).

Nested perms (e.g. heads x head dims) are matched jointly by default (``joint_blocks=True``): each
(head of A, head of B) pair gets its optimal inner assignment (a batch of H*H assignments), then the
heads are assigned on those scores. Git Re-Basin has no nested perms; on plain specs the algorithm
is exactly its coordinate descent (tested equal to the reference port, same seed -> same perms).

Modules: :mod:`.grammar` (:class:`PermutationSpec`), :mod:`.apply` (``apply_permutation``,
``random_permutation``), :mod:`.matching` (``weight_matching``), :mod:`.lap` (the exact assignment
solver, scipy's contract), :mod:`.specs` (builders for MLPs, CNNs, ResNets, GPT-2, LLaMA).
Backend: ``wweight/backends/torch/permute.py`` (the batched auction); reference:
``wweight/reference/permute.py``.
"""
from .apply import apply_permutation, random_permutation
from .grammar import PermutationSpec
from .lap import linear_sum_assignment
from .matching import permutation_objective, weight_matching
from .specs import cnn_spec, gpt2_spec, llama_spec, mlp_spec, resnet_spec

__all__ = ["PermutationSpec", "weight_matching", "apply_permutation", "linear_sum_assignment",
           "random_permutation", "permutation_objective", "mlp_spec", "cnn_spec", "resnet_spec", "gpt2_spec",
           "llama_spec"]
