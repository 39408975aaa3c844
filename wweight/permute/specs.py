"""PermutationSpec builders for common architectures (PyTorch layouts, state-dict key names).

Every builder is tested for function preservation (tests/test_permute_specs.py): a random
permutation applied with :func:`wweight.apply_permutation` leaves the model's outputs unchanged.

* :func:`mlp_spec`: a stack of Linear layers (Git Re-Basin's ``mlp_permutation_spec``).
* :func:`cnn_spec`: VGG-style conv stack (+ optional BatchNorm) followed by Linear layers.
* :func:`resnet_spec`: CIFAR ResNet (BasicBlock, e.g. ResNet-20 of Git Re-Basin): one permutation
  per residual stream (shared by every block of a stage, changed by the shortcut convolutions), one
  per block interior; BatchNorm weight/bias/running stats follow their conv.
* :func:`gpt2_spec`: Hugging Face GPT-2 (``Conv1D`` weights are (in, out)): residual stream through
  wte/wpe, LayerNorms and every block; MLP hidden units; attention heads as whole heads (fused
  ``c_attn`` Q|K|V); inside a head the Q/K dims share one permutation and the V/proj dims another
  (no positional rotation, so q.k is invariant under a common permutation of the head dims).
* :func:`llama_spec`: Hugging Face LLaMA (RMSNorm, SwiGLU, RoPE, GQA): residual stream; MLP hidden
  units (gate/up rows, down columns); key/value heads as whole heads, query heads moving with their
  group, query heads permuted inside their group; no permutation inside Q/K head dims (RoPE ties
  each dim to a frequency); V/o_proj head dims permuted only without GQA (with GQA one V head
  feeds several o_proj blocks, which the nested-perm format cannot tie; documented limitation).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .grammar import PermutationSpec

#: Hugging Face ``architectures`` names (config.json) -> the built-in builder family ``wweight align
#: auto`` uses for them. ``auto`` reads the name from a downloaded file, so it only ever selects from
#: this table: a config.json must never choose code to import (a ``module:function`` spec is loaded
#: only when typed on the command line).
ARCHITECTURES: Dict[str, str] = {
    "WWeightDigitsMLP": "mlp",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "LlamaModel": "llama", "MistralModel": "llama",
}


def _names(x, arg: str) -> List[str]:
    """``x`` as a list of module names, or a TypeError naming ``arg`` (a bare str is one name per
    character otherwise: refused)."""
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{arg} must be a sequence of module names (str), got {type(x).__name__}")
    x = list(x)
    bad = sorted({type(v).__name__ for v in x if not isinstance(v, str)})
    if bad:
        raise TypeError(f"{arg} must be module names (str), got {', '.join(bad)}")
    return x


def mlp_spec(layers: Sequence[str], *, bias: bool = True) -> PermutationSpec:
    """Linear layers ``layers`` (module names, input to output): perms ``P0 .. P{L-2}`` on the hidden units.

    E.g. ``mlp_spec(["0", "2", "4"])`` for ``wweight.examples.digits.make_mlp((128, 128))``.
    """
    layers = _names(layers, "layers")
    if len(layers) < 1:
        raise ValueError("layers must name at least one Linear layer")
    axes: Dict[str, tuple] = {}
    for i, name in enumerate(layers):
        p_out = f"P{i}" if i < len(layers) - 1 else None
        p_in = f"P{i - 1}" if i > 0 else None
        axes[f"{name}.weight"] = (p_out, p_in)
        if bias:
            axes[f"{name}.bias"] = (p_out,)
    return PermutationSpec(axes)


def _norm(axes: Dict[str, tuple], name: Optional[str], p: str, running: bool = True) -> None:
    if name is None:
        return
    axes[f"{name}.weight"] = (p,)
    axes[f"{name}.bias"] = (p,)
    if running:
        axes[f"{name}.running_mean"] = (p,)
        axes[f"{name}.running_var"] = (p,)


def cnn_spec(convs: Sequence[str], linears: Sequence[str], *, norms: Optional[Sequence[Optional[str]]] = None,
             conv_bias: bool = True, linear_bias: bool = True) -> PermutationSpec:
    """VGG-style: conv layers ``convs`` (each optionally followed by the BatchNorm ``norms[i]``), a
    flatten, then Linear layers ``linears``. Perms ``P_conv{i}`` (channels) and ``P_fc{j}``.

    The first Linear's input axis is (channels x spatial) in flatten order, so it is nested:
    ``("P_conv{last}", None)`` moves whole spatial blocks with their channel.
    """
    convs, linears = _names(convs, "convs"), _names(linears, "linears")
    if norms is not None and len(norms) != len(convs):
        raise ValueError(f"norms must have one entry per conv ({len(convs)}), got {len(norms)}")
    if not convs or not linears:
        raise ValueError("cnn_spec needs at least one conv and one linear layer")
    axes: Dict[str, tuple] = {}
    prev = None
    for i, c in enumerate(convs):
        p = f"P_conv{i}"
        axes[f"{c}.weight"] = (p, prev, None, None)
        if conv_bias:
            axes[f"{c}.bias"] = (p,)
        _norm(axes, norms[i] if norms else None, p)
        prev = p
    for j, l in enumerate(linears):
        p_out = f"P_fc{j}" if j < len(linears) - 1 else None
        p_in = (prev, None) if j == 0 else prev
        axes[f"{l}.weight"] = (p_out, p_in)
        if linear_bias:
            axes[f"{l}.bias"] = (p_out,)
        prev = p_out
    return PermutationSpec(axes)


def resnet_spec(blocks_per_stage: Sequence[int], *, stem: str = "conv1", stem_norm: Optional[str] = "bn1",
                stage_fmt: str = "layer{s}", head: str = "linear", shortcut: Sequence[str] = ("shortcut.0", "shortcut.1"),
                shortcut_blocks: Optional[Sequence[str]] = None, first_stage_shortcut: bool = False,
                head_bias: bool = True) -> PermutationSpec:
    """CIFAR-style ResNet of BasicBlocks (``conv1/bn1/conv2/bn2`` + optional ``shortcut`` conv/bn).

    Args:
        blocks_per_stage: e.g. ``(3, 3, 3)`` for ResNet-20. Stages are ``stage_fmt.format(s=1..)``
            and blocks ``"{stage}.{b}"``; convolutions have no bias (BatchNorm follows).
        shortcut: names (inside a block) of the projection conv and its BatchNorm, present in the
            first block of every stage after the first (and of the first if ``first_stage_shortcut``).
        shortcut_blocks: explicit list of block prefixes that have a projection shortcut (overrides
            the rule above).

    Perms: ``P_res{s}`` per residual stream (shared by the stem when s = 1 and by every block of the
    stage), ``P_{s}_{b}`` inside each block.
    """
    if isinstance(blocks_per_stage, (str, bytes)) or not hasattr(blocks_per_stage, "__iter__"):
        raise TypeError(f"blocks_per_stage must be a sequence of block counts, got {type(blocks_per_stage).__name__}")
    blocks_per_stage = list(blocks_per_stage)
    if not blocks_per_stage or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                       for v in blocks_per_stage):
        raise ValueError(f"blocks_per_stage must be positive ints, one per stage, got {blocks_per_stage}")
    axes: Dict[str, tuple] = {}
    blocks: List[tuple] = []
    for s, nb in enumerate(blocks_per_stage, start=1):
        for b in range(nb):
            blocks.append((s, b, f"{stage_fmt.format(s=s)}.{b}"))
    if shortcut_blocks is None:
        shortcut_blocks = [pre for s, b, pre in blocks if b == 0 and (s > 1 or first_stage_shortcut)]
    shortcut_blocks = set(shortcut_blocks)
    # the stem writes the first residual stream unless the first block projects it
    first_res = "P_res1"
    stem_p = "P_stem" if blocks and blocks[0][2] in shortcut_blocks else first_res
    axes[f"{stem}.weight"] = (stem_p, None, None, None)
    _norm(axes, stem_norm, stem_p)
    prev_res = stem_p
    for s, b, pre in blocks:
        res = f"P_res{s}"
        inner = f"P_{s}_{b}"
        axes[f"{pre}.conv1.weight"] = (inner, prev_res, None, None)
        _norm(axes, f"{pre}.bn1", inner)
        axes[f"{pre}.conv2.weight"] = (res, inner, None, None)
        _norm(axes, f"{pre}.bn2", res)
        if pre in shortcut_blocks:
            axes[f"{pre}.{shortcut[0]}.weight"] = (res, prev_res, None, None)
            _norm(axes, f"{pre}.{shortcut[1]}", res)
        elif prev_res != res:
            raise ValueError(f"block {pre!r} changes the residual stream but has no projection shortcut")
        prev_res = res
    axes[f"{head}.weight"] = (None, prev_res)
    if head_bias:
        axes[f"{head}.bias"] = (None,)
    return PermutationSpec(axes)


def gpt2_spec(n_layer: int, n_head: int, head_dim: int, *, prefix: str = "transformer.",
              lm_head: Optional[str] = "lm_head.weight", permute_heads: bool = True) -> PermutationSpec:
    """Hugging Face GPT-2 (``GPT2LMHeadModel`` keys; ``prefix=""`` and ``lm_head=None`` for ``GPT2Model``).

    Perms: ``P_res`` (residual stream, d_model), ``P_mlp{i}`` (4*d_model), ``P_head{i}`` (n_head,
    whole heads), ``P_qk{i}`` (n_head, head_dim: Q and K dims inside each head), ``P_v{i}`` (n_head,
    head_dim: V dims, i.e. c_proj input dims inside each head). ``permute_heads=False`` leaves the
    attention inputs/outputs alone (residual and MLP perms only).
    """
    for nm, v in (("n_layer", n_layer), ("n_head", n_head), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    axes: Dict[str, tuple] = {}
    sizes: Dict[str, int] = {}
    t = prefix
    axes[f"{t}wte.weight"] = (None, "P_res")
    axes[f"{t}wpe.weight"] = (None, "P_res")
    for i in range(n_layer):
        h = f"{t}h.{i}."
        for ln in ("ln_1", "ln_2"):
            axes[f"{h}{ln}.weight"] = ("P_res",)
            axes[f"{h}{ln}.bias"] = ("P_res",)
        if permute_heads:
            ph, pqk, pv = f"P_head{i}", f"P_qk{i}", f"P_v{i}"
            sizes[ph], sizes[pqk], sizes[pv] = n_head, head_dim, head_dim
            qkv = [(ph, pqk), (ph, pqk), (ph, pv)]
            proj_in = (ph, pv)
        else:
            qkv = proj_in = None
        axes[f"{h}attn.c_attn.weight"] = ("P_res", qkv)
        axes[f"{h}attn.c_attn.bias"] = (qkv,)
        axes[f"{h}attn.c_proj.weight"] = (proj_in, "P_res")
        axes[f"{h}attn.c_proj.bias"] = ("P_res",)
        axes[f"{h}mlp.c_fc.weight"] = ("P_res", f"P_mlp{i}")
        axes[f"{h}mlp.c_fc.bias"] = (f"P_mlp{i}",)
        axes[f"{h}mlp.c_proj.weight"] = (f"P_mlp{i}", "P_res")
        axes[f"{h}mlp.c_proj.bias"] = ("P_res",)
    axes[f"{t}ln_f.weight"] = ("P_res",)
    axes[f"{t}ln_f.bias"] = ("P_res",)
    if lm_head:
        axes[lm_head] = (None, "P_res")
    return PermutationSpec(axes, sizes=sizes)


def llama_spec(n_layer: int, n_head: int, n_kv_head: int, head_dim: int, *, prefix: str = "model.",
               lm_head: Optional[str] = "lm_head.weight", attention_bias: bool = False,
               mlp_bias: bool = False, permute_heads: bool = True) -> PermutationSpec:
    """Hugging Face LLaMA / Mistral / Qwen2-style (``LlamaForCausalLM`` keys).

    Perms: ``P_res`` (residual stream through embed_tokens, every RMSNorm, lm_head), ``P_mlp{i}``
    (SwiGLU hidden: gate/up rows, down_proj columns), ``P_kv{i}`` (n_kv_head: whole key/value
    heads; each query group moves with its key/value head), ``P_q{i}`` (n_kv_head, n_head/n_kv_head:
    query heads inside their group, only when the group has more than one) and, without GQA,
    ``P_v{i}`` (n_head, head_dim: V dims = o_proj input dims inside each head). Q/K head dims are
    never permuted (RoPE).
    """
    for nm, v in (("n_layer", n_layer), ("n_head", n_head), ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    r = n_head // n_kv_head
    axes: Dict[str, tuple] = {}
    sizes: Dict[str, int] = {}
    t = prefix
    axes[f"{t}embed_tokens.weight"] = (None, "P_res")
    for i in range(n_layer):
        h = f"{t}layers.{i}."
        axes[f"{h}input_layernorm.weight"] = ("P_res",)
        axes[f"{h}post_attention_layernorm.weight"] = ("P_res",)
        if permute_heads:
            pkv = f"P_kv{i}"
            sizes[pkv] = n_kv_head
            if r > 1:
                pq = f"P_q{i}"
                sizes[pq] = r
                q_ax = (pkv, pq, None)
                o_in = (pkv, pq, None)
                v_ax = (pkv, None)
            else:
                pv = f"P_v{i}"
                sizes[pv] = head_dim
                q_ax = (pkv, None)
                o_in = (pkv, pv)
                v_ax = (pkv, pv)
            k_ax = (pkv, None)
        else:
            q_ax = k_ax = v_ax = o_in = None
        axes[f"{h}self_attn.q_proj.weight"] = (q_ax, "P_res")
        axes[f"{h}self_attn.k_proj.weight"] = (k_ax, "P_res")
        axes[f"{h}self_attn.v_proj.weight"] = (v_ax, "P_res")
        axes[f"{h}self_attn.o_proj.weight"] = ("P_res", o_in)
        if attention_bias:
            axes[f"{h}self_attn.q_proj.bias"] = (q_ax,)
            axes[f"{h}self_attn.k_proj.bias"] = (k_ax,)
            axes[f"{h}self_attn.v_proj.bias"] = (v_ax,)
            axes[f"{h}self_attn.o_proj.bias"] = ("P_res",)
        pm = f"P_mlp{i}"
        axes[f"{h}mlp.gate_proj.weight"] = (pm, "P_res")
        axes[f"{h}mlp.up_proj.weight"] = (pm, "P_res")
        axes[f"{h}mlp.down_proj.weight"] = ("P_res", pm)
        if mlp_bias:
            axes[f"{h}mlp.gate_proj.bias"] = (pm,)
            axes[f"{h}mlp.up_proj.bias"] = (pm,)
            axes[f"{h}mlp.down_proj.bias"] = ("P_res",)
    axes[f"{t}norm.weight"] = ("P_res",)
    if lm_head:
        axes[lm_head] = (None, "P_res")
    return PermutationSpec(axes, sizes=sizes)
