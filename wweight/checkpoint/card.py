"""Hub-ready merge outputs, as ``mergekit-yaml`` writes them: ``mergekit_config.yml`` and a card.

A merged directory is uploaded as it is; mergekit puts the config that produced it
(``mergekit_config.yml``) and a short model card (``README.md``) beside the weights so the merge
can be reproduced and is described on the Hub. wweight writes the same two files (the YAML as the
user gave it, else the equivalent of the :class:`~wweight.config.MergeConfig`) and warns once when
the output has no tokenizer: a model without one cannot be used from the Hub as it is.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, List, Optional

import torch

from ..config import MergeConfig
from .format import TOKENIZER_FILES

CONFIG_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"
#: files that make a tokenizer (generation_config.json alone does not)
_TOKENIZER_ONLY = tuple(n for n in TOKENIZER_FILES if n != "generation_config.json")


def _version() -> str:
    # read from the loaded package, not imported: wweight/__init__ imports this package
    return str(getattr(sys.modules.get("wweight"), "__version__", "unknown"))


def _dt(d: Optional[torch.dtype]) -> Optional[str]:
    return None if d is None else str(d).replace("torch.", "")


def equivalent_config(cfg: MergeConfig) -> Dict[str, Any]:
    """The YAML mapping of ``cfg``: what the user gave when known, else rebuilt from its fields."""
    if isinstance(cfg.raw, dict):
        return cfg.raw
    out: Dict[str, Any] = {"merge_method": cfg.method}
    if cfg.base_model is not None:
        out["base_model"] = cfg.base_model.name or cfg.base_model.path
    if cfg.slices:
        out["slices"] = [{"sources": [{"model": x.model.name or x.model.path, "layer_range": list(x.layer_range),
                                       **({"parameters": dict(x.model.parameters)} if x.model.parameters else {})}
                                      for x in sl.sources],
                          **({"base_model": sl.base_model.name} if sl.base_model is not None
                             and sl.base_model is not cfg.base_model else {}),
                          **({"parameters": dict(sl.parameters)} if sl.parameters else {})}
                         for sl in cfg.slices]
    else:
        out["models"] = [{"model": e.name or e.path, **({"parameters": dict(e.parameters)} if e.parameters else {})}
                         for e in cfg.models]
    if cfg.parameters:
        out["parameters"] = dict(cfg.parameters)
    for k, v in (("dtype", _dt(cfg.dtype)), ("out_dtype", _dt(cfg.out_dtype)),
                 ("tokenizer_source", cfg.tokenizer_source)):
        if v is not None:
            out[k] = v
    return out


def config_yaml(cfg: MergeConfig) -> str:
    import yaml

    return yaml.safe_dump(equivalent_config(cfg), sort_keys=False, default_flow_style=False)


def model_card(cfg: MergeConfig, yaml_text: Optional[str] = None) -> str:
    """A mergekit-style model card: method, input models, parameters, wweight version, the config.
    Nothing in it depends on OUT_DIR's name, so the same merge written twice is byte-identical."""
    yaml_text = yaml_text if yaml_text is not None else config_yaml(cfg)
    base = cfg.base_model
    how = f"the `{cfg.method}` merge method"
    if base is not None:
        how += f" with `{base.name or base.path}` as a base"
    lines: List[str] = [
        "---", "library_name: transformers", "tags:", "- mergekit", "- merge", "- wweight", "---",
        f"# A {cfg.method} merge", "",
        f"This is a merge of pre-trained language models created with wweight {_version()} "
        "from a mergekit YAML configuration.", "",
        "## Merge Details", "### Merge Method", "", f"This model was merged using {how}.", "",
        "### Models Merged", "", "The following models were included in the merge:",
    ]
    lines += [f"* `{e.name or e.path}`" for e in cfg.models if base is None or e.path != base.path]
    lines += ["", "### Parameters", ""]
    if cfg.parameters:
        lines += [f"* `{k}`: `{v}`" for k, v in cfg.parameters.items()]
    for e in cfg.models:
        if e.parameters:
            lines.append(f"* `{e.name or e.path}`: " + ", ".join(f"`{k}` = `{v}`" for k, v in e.parameters.items()))
    if not cfg.parameters and not any(e.parameters for e in cfg.models):
        lines.append("The method's defaults.")
    lines += ["", "### Configuration", "", "The following YAML configuration was used to produce this model:",
              "", "```yaml", yaml_text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def write_hub_files(cfg: MergeConfig, directory: str) -> List[str]:
    """Write ``mergekit_config.yml`` and ``README.md`` into ``directory`` (the output being built)."""
    text = config_yaml(cfg)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(directory, CARD_NAME), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, text))
    return [CONFIG_NAME, CARD_NAME]


def warn_if_no_tokenizer(copied: Iterable[str], source: Optional[str], out_dir: str) -> bool:
    """One line on stderr when none of the copied side files is a tokenizer file; True if warned."""
    if any(n in _TOKENIZER_ONLY for n in copied):
        return False
    where = f" ({source} has none)" if source else ""
    print(f"wweight: warning: {out_dir} has no tokenizer files{where}; set tokenizer_source to a model "
          "with a tokenizer, or add one before using or uploading the merge", file=sys.stderr)
    return True
