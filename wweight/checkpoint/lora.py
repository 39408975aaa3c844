"""``model+lora`` references: a model directory with a PEFT LoRA adapter merged in on the fly.

mergekit 0.1.5 accepts ``model: path/to/base+path/to/adapter`` (``mergekit/common.py``
``ModelReference``): it loads the base with transformers, applies the adapter with
``peft.PeftModel.from_pretrained(...).merge_and_unload()`` and saves the merged model to a cache
directory. :class:`LoraCheckpoint` gives the same tensors without that copy: :meth:`~LoraCheckpoint.read`
reads one base tensor and adds the adapter's delta to it, so at most one merged tensor (plus its
float32 delta) exists at a time.

The arithmetic is PEFT 0.21's (``peft/tuners/lora/layer.py``, ``Linear`` / ``Embedding``
``get_delta_weight`` and the default, unsafe ``merge``), op for op, so the result is bit-identical
to ``merge_and_unload`` on CPU (tests/test_lora.py):

* ``PeftModel.from_pretrained`` casts 16-bit adapter weights to float32 (``autocast_adapter_dtype``),
  so ``A`` (``[r, in]``) and ``B`` (``[out, r]``) are float32 (float64 for a float64 base);
* ``delta = transpose(B @ A, fan_in_fan_out) * scaling`` in that dtype, ``scaling = alpha / r``
  (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` per module from ``rank_pattern`` /
  ``alpha_pattern`` (PEFT's ``get_pattern_key`` regex match on the module name);
* ``W += delta`` in place: float32 arithmetic, rounded once to ``W``'s dtype;
* embeddings (``lora_embedding_A`` ``[r, num_embeddings]``, ``lora_embedding_B`` ``[dim, r]``):
  ``delta = (B @ A).T * scaling``, rounded to ``W``'s dtype before the add (PEFT's ``Embedding.merge``
  adds ``delta.to(W.dtype)``; ``Linear.merge`` adds the float32 delta); ``lora_bias``: ``bias += B.bias * scaling``;
* other saved tensors (``modules_to_save``, an embedding's ``base_layer.weight``) replace the
  model's tensor (cast to its dtype, as ``load_state_dict`` copies).

``fan_in_fan_out``: PEFT ignores the flag for ``nn.Linear`` (forced off) and GPT-2's ``Conv1D``
(forced on, its weight is ``[in, out]``), deciding by module type. Here the tensor's shape decides
when it is not square; a square one is transposed only for the Conv1D modules of the transformers
models built on Conv1D (:data:`CONV1D_MODULES`).

Refused with a ``CheckpointError`` naming the adapter file and key: ``adapter_model.bin`` (pickle),
DoRA and the other LoRA variants PEFT merges differently, non-LoRA adapters, ``layer_replication``,
``target_parameters``, ``trainable_token_indices``, conv LoRA, adapter keys that match no model
tensor, and shape or rank mismatches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .. import _hub as hub
from .format import CheckpointError, TensorInfo, inside, read_header
from .reader import Checkpoint, TensorSource, _pread_into

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

#: LoraConfig fields that select a LoRA variant PEFT merges with its own code (``resolve_lora_variant``)
#: or that change which tensors exist: refused when set.
_REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora: true) is not supported: its merge rescales by a magnitude vector; merge "
                "it with peft (merge_and_unload) first",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "use_bdlora is not supported",
    "velora_config": "VeLoRA is not supported", "monteclora_config": "MonteCLoRA is not supported",
    "arrow_config": "Arrow is not supported", "kasa_config": "KaSA is not supported",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) cannot be merged",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "megatron_config": "megatron_config is not supported",
}
#: transformers models whose projections are ``Conv1D`` (weight ``[in, out]``), and those modules
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
#: elements per block of the merged add (its float32 temporaries: 2 x 4 bytes per element of a block)
ADD_BLOCK = 1 << 18


@dataclass
class LoraModule:
    """One adapted module: float32 (or base-dtype) ``delta = transpose(B @ A) * scaling`` for ``target``."""
    module: str
    target: str                     # model key of the weight the delta is added to
    a_key: str                      # adapter keys
    b_key: str
    bias_key: Optional[str]         # lora_B.bias (lora_bias: true), added to ``module.bias``
    scaling: float
    transpose: bool
    rank: int
    embedding: bool = False


def pattern_key(patterns, key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` after a dot."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _read_config(path: str, where: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise CheckpointError(f"{path}: peft_type {ptype!r} is not supported ({where} must be a LoRA adapter, "
                              "peft_type LORA)")
    for k, why in _REFUSED_FIELDS.items():
        if cfg.get(k):
            raise CheckpointError(f"{path}: {why} ({k}: {cfg[k]!r})")
    if cfg.get("init_lora_weights") == "mica":
        raise CheckpointError(f"{path}: init_lora_weights 'mica' (a LoRA variant) is not supported")
    cfg.setdefault("r", 8)             # LoraConfig's defaults, as PEFT fills in a config without them
    cfg.setdefault("lora_alpha", 8)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for name, v in (("r", r), ("lora_alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointError(f"{path}: {name} must be a number, got {v!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise CheckpointError(f"{path}: {name} must be a mapping, got {cfg[name]!r}")
    return cfg


class LoraCheckpoint(TensorSource):
    """A :class:`Checkpoint` with a PEFT LoRA adapter merged into its tensors as they are read.

    Same interface as :class:`Checkpoint` for the merge engine: ``keys``, ``tensors`` (the base's:
    merged tensors keep the base's dtype and shape), ``read(key, pin=)``, ``path`` (the base
    directory: its config.json and tokenizer are the merged model's), ``adapter`` (the adapter
    directory), ``input_paths``, ``nbytes``, ``architecture``, ``config``, ``what``, ``close``.
    Everything is validated here, before any compute: adapter files, config, every key, shape and rank.
    """

    def __init__(self, base: Checkpoint, adapter: str, *, what: str = "model", allow_symlinks: bool = False):
        self.base = base
        self.what = what
        try:
            local, from_hub = hub.resolve(adapter, f"{what} LoRA adapter")
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        self.adapter = os.path.abspath(local)
        if not os.path.isdir(self.adapter):
            raise CheckpointError(f"{what}: LoRA adapter {adapter}: directory not found")
        self.path, self.config, self.tensors, self.keys = base.path, base.config, base.tensors, base.keys
        self.allow_symlinks = base.allow_symlinks
        self.input_paths = [base.path, self.adapter]
        links_ok = allow_symlinks or from_hub
        cfg_path = os.path.join(self.adapter, ADAPTER_CONFIG)
        self.file = os.path.join(self.adapter, ADAPTER_WEIGHTS)
        for fp in (cfg_path, self.file):
            if not os.path.exists(fp):
                if fp == self.file and os.path.exists(os.path.join(self.adapter, "adapter_model.bin")):
                    raise CheckpointError(f"{what}: LoRA adapter {self.adapter}: only adapter_model.bin (pickle, "
                                          "can run code); wweight reads adapter_model.safetensors only (save the "
                                          "adapter with safe_serialization=True)")
                raise CheckpointError(f"{what}: LoRA adapter {self.adapter}: {os.path.basename(fp)} is missing")
            if not links_ok and not inside(fp, self.adapter):
                raise CheckpointError(f"{fp}: is a symlink resolving outside {self.adapter}; refusing to follow "
                                      "it (pass --allow-symlinks, e.g. for Hugging Face cache snapshots)")
            if not os.path.isfile(fp):
                raise CheckpointError(f"{fp}: not a regular file")
        self.lora_config = _read_config(cfg_path, f"{what} LoRA adapter")
        self.adapter_tensors, _ = read_header(self.file)
        self.modules: Dict[str, LoraModule] = {}       # by target key
        self.bias_of: Dict[str, LoraModule] = {}       # by bias key
        self.replaced: Dict[str, str] = {}             # model key -> adapter key (modules_to_save, base_layer)
        self._plan()
        self._fd: Optional[int] = os.open(self.file, os.O_RDONLY)

    # ----- validation: every adapter key maps to a model tensor, shapes and ranks agree -----

    def _err(self, key: str, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: key {key!r}: {msg} ({self.what} {self.path})")

    def _plan(self) -> None:
        at = self.adapter_tensors
        model_type = (self.config or {}).get("model_type")
        seen = set()
        for key in sorted(at):
            if not key.startswith(PEFT_PREFIX):
                raise self._err(key, f"does not start with {PEFT_PREFIX!r} (not a PEFT adapter key)")
        for key in sorted(at):
            name = key[len(PEFT_PREFIX):]
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)",
                             name)
            if m is None:
                if "lora_magnitude_vector" in name:
                    raise self._err(key, "DoRA magnitude vector: DoRA is not supported")
                if re.search(r"(^|\.)lora_|\.trainable_tokens_", name):
                    raise self._err(key, "unsupported LoRA tensor")
                # modules_to_save copies and embedding base layers: they replace the model's tensor
                target = name.replace(".base_layer.", ".")
                info = self.tensors.get(target)
                if info is None:
                    raise self._err(key, f"matches no tensor of the model (looked for {target!r})")
                if tuple(at[key].shape) != tuple(info.shape):
                    raise self._err(key, f"shape {list(at[key].shape)} does not match the model's {target!r} "
                                         f"{list(info.shape)}")
                self.replaced[target] = key
                continue
            mod, part = m.group(1), m.group(2)
            if mod in seen:
                continue
            seen.add(mod)
            self._add_module(mod, "embedding" in part, model_type)

    def _add_module(self, mod: str, embedding: bool, model_type) -> None:
        cfg, at = self.lora_config, self.adapter_tensors
        p = PEFT_PREFIX + mod
        a_key, b_key = ((p + ".lora_embedding_A", p + ".lora_embedding_B") if embedding
                        else (p + ".lora_A.weight", p + ".lora_B.weight"))
        for k in (a_key, b_key):
            if k not in at:
                raise self._err(k, "is missing (a LoRA module needs both A and B)")
        a, b = at[a_key], at[b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise self._err(a_key, f"A {list(a.shape)} and B {list(b.shape)} are not matrices (conv LoRA is "
                                   "not supported)")
        rpat, apat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r = rpat.get(pattern_key(rpat.keys(), mod), cfg["r"])
        alpha = apat.get(pattern_key(apat.keys(), mod), cfg["lora_alpha"])
        if a.shape[0] != r or b.shape[1] != r:
            raise self._err(a_key, f"rank mismatch: A {list(a.shape)}, B {list(b.shape)}, adapter_config r = {r}")
        if r <= 0:
            raise self._err(a_key, f"r must be positive, got {r}")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        target = mod + ".weight"
        info = self.tensors.get(target)
        if info is None:
            raise self._err(a_key, f"matches no tensor of the model (looked for {target!r})")
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            raise self._err(a_key, f"the model's {target!r} is {list(info.shape)} {info.dtype}, not a float matrix")
        out_in = (b.shape[0], a.shape[1])
        if embedding:
            transpose = True
        elif out_in[0] != out_in[1]:
            transpose = tuple(info.shape) != out_in     # PEFT decides by module type; the shape tells it here
        else:
            transpose = model_type in CONV1D_MODEL_TYPES and mod.rsplit(".", 1)[-1] in CONV1D_MODULES
        want = out_in[::-1] if transpose else out_in
        if tuple(info.shape) != want:
            raise self._err(a_key, f"B @ A has shape {list(out_in)}, the model's {target!r} has "
                                   f"{list(info.shape)}")
        bias_key = p + ".lora_B.bias"
        if bias_key not in at:
            bias_key = None
        else:
            bt = self.tensors.get(mod + ".bias")
            if bt is None:
                raise self._err(bias_key, f"lora_bias, but the model has no {mod + '.bias'!r}")
            if tuple(at[bias_key].shape) != tuple(bt.shape):
                raise self._err(bias_key, f"shape {list(at[bias_key].shape)} does not match the model's "
                                          f"{mod + '.bias'!r} {list(bt.shape)}")
        lm = LoraModule(mod, target, a_key, b_key, bias_key, float(scaling), transpose, int(r), embedding)
        if target in self.modules:
            raise self._err(a_key, f"{target!r} is adapted twice")
        self.modules[target] = lm
        if bias_key:
            self.bias_of[mod + ".bias"] = lm

    # ----- the Checkpoint interface -----

    @property
    def architecture(self) -> Optional[str]:
        return self.base.architecture

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + sum(t.nbytes for t in self.adapter_tensors.values())

    def _adapter(self, key: str, *, pin: bool = False) -> torch.Tensor:
        info: TensorInfo = self.adapter_tensors[key]
        if self._fd is None:
            raise CheckpointError(f"{self.file}: read after close")
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
        if info.nbytes:
            _pread_into(self._fd, memoryview(buf.numpy()), info.start, info.file)
        return buf.view(info.dtype).reshape(info.shape)

    @staticmethod
    def _lora_dtype(dt: torch.dtype) -> torch.dtype:
        # PEFT's autocast_adapter_dtype: adapters of 16-bit (and float32) models are float32
        return dt if dt == torch.float64 else torch.float32

    def delta_bytes(self, key: str) -> int:
        """Host bytes :meth:`read` allocates for ``key`` beyond the returned tensor (the plan's item cost):
        A and B as read and in the compute dtype, ``B @ A`` (scaled in place; an embedding's also in the
        weight's dtype), a replaced tensor's read, ``lora_B.bias * scaling``."""
        lm = self.modules.get(key)
        n = 0
        if lm is not None:
            a, b = self.adapter_tensors[lm.a_key], self.adapter_tensors[lm.b_key]
            s = 8 if self._lora_dtype(self.tensors[key].dtype) == torch.float64 else 4
            numel = math.prod(self.tensors[key].shape)
            n += (a.nbytes + b.nbytes) + s * (a.numel + b.numel + numel)
            if lm.embedding:   # the delta rounded to the weight's dtype, beside the float32 one
                n += self.tensors[key].nbytes
            elif self.tensors[key].dtype != self._lora_dtype(self.tensors[key].dtype):
                cols = max(1, self.tensors[key].shape[1])
                n += 2 * s * min(numel, max(1, ADD_BLOCK // cols) * cols)  # the add's block temporaries
        if key in self.replaced:
            n += self.adapter_tensors[self.replaced[key]].nbytes
        if key in self.bias_of:
            bt = self.adapter_tensors[self.bias_of[key].bias_key]
            n += bt.nbytes + 8 * bt.numel
        return n

    def read(self, key: str, *, pin: bool = False) -> torch.Tensor:
        """The merged tensor ``key`` (a new CPU tensor, page-locked when ``pin``; base dtype and shape)."""
        if key in self.replaced:
            src = self._adapter(self.replaced[key])
            w = torch.empty(src.shape, dtype=self.tensors[key].dtype, pin_memory=pin)
            w.copy_(src)                                 # load_state_dict's copy: one rounding
            del src
        else:   # a tensor the adapter adds to is written in place below: a buffer, not a mapping
            w = self.base.read(key, pin=pin, mapped=key not in self.modules and key not in self.bias_of)
        lm = self.modules.get(key)
        if lm is not None:
            cd = self._lora_dtype(w.dtype)
            a, b = self._adapter(lm.a_key).to(cd), self._adapter(lm.b_key).to(cd)
            delta = b @ a
            del a, b
            if lm.transpose:
                delta = delta.T
            delta.mul_(lm.scaling)
            if lm.embedding:   # PEFT's Embedding.merge rounds the delta to the weight's dtype first
                delta = delta.to(w.dtype)
            # PEFT's Linear.merge: base_layer.weight.data += delta_weight (float32 sum, one rounding). On CPU a
            # mixed-dtype in-place add casts w to float32 and computes into a float32 temporary: two more
            # full-size copies; row blocks give the same elements with block-sized temporaries.
            rows = max(1, ADD_BLOCK // max(1, w.shape[1]))
            for i in range(0, w.shape[0], rows):
                w[i:i + rows] += delta[i:i + rows]
        blm = self.bias_of.get(key)
        if blm is not None:
            lb = self._adapter(blm.bias_key).to(self._lora_dtype(w.dtype))
            w += lb * blm.scaling                        # PEFT: bias.data += lora_B.bias * scaling
        return w

    def close(self) -> None:
        self.base.close()
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_model(entry_or_path, lora: Optional[str] = None, *, what: str = "model",
               allow_symlinks: bool = False):
    """A :class:`Checkpoint` for a model directory, or a :class:`LoraCheckpoint` when a LoRA adapter is
    given (``lora``, or the ``lora`` of a :class:`wweight.config.ModelEntry` passed as ``entry_or_path``)."""
    path = entry_or_path
    if not isinstance(entry_or_path, str):
        path, lora = entry_or_path.path, lora or getattr(entry_or_path, "lora", None)
    base = Checkpoint(path, what=what, allow_symlinks=allow_symlinks)
    if not lora:
        return base
    try:
        return LoraCheckpoint(base, lora, what=what, allow_symlinks=allow_symlinks)
    except BaseException:
        base.close()
        raise

