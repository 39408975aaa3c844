"""Checkpoint inputs: models named by Hugging Face id resolve from the local cache (``wweight/_hub.py``);
errors name the tensor and the model."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from wweight import _hub
from wweight.checkpoint import Checkpoint, CheckpointError
from wweight.config import load_config, parse_config

hf = pytest.importorskip("huggingface_hub")


def _cache_model(cache, repo, tensors):
    """A model in the Hub cache layout (models--org--name/{blobs,refs,snapshots}), the layout that
    huggingface_hub writes; checked below with huggingface_hub's own cache scanner."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    tmp = cache / "tmp.safetensors"
    save_file(tensors, str(tmp))
    for name, data in (("model.safetensors", tmp.read_bytes()), ("config.json", b'{"torch_dtype": "float32"}')):
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    tmp.unlink()
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WWEIGHT_ALLOW_DOWNLOAD", raising=False)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_resolves_from_the_local_cache(hub_cache):
    w = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    snap = _cache_model(hub_cache, "acme/tiny-model", w)
    repos = {r.repo_id for r in hf.scan_cache_dir(hub_cache).repos}
    assert repos == {"acme/tiny-model"}        # huggingface_hub recognises the layout
    with Checkpoint("acme/tiny-model", what="base_model") as ck:
        assert os.path.realpath(ck.path) == os.path.realpath(snap)
        assert torch.equal(ck.read("w"), w["w"])


def test_missing_hub_id_says_how_to_get_it(hub_cache):
    with pytest.raises(CheckpointError, match=r"acme/absent.*not found as a Hugging Face model in the local "
                                              r"cache.*huggingface-cli download acme/absent.*WWEIGHT_ALLOW_DOWNLOAD"):
        Checkpoint("acme/absent", what="base_model")


def test_config_keeps_hub_ids_and_local_paths(hub_cache, tmp_path):
    (tmp_path / "local").mkdir()
    data = {"merge_method": "linear", "models": [{"model": "acme/tiny-model", "parameters": {"weight": 1.0}},
                                                 {"model": "local", "parameters": {"weight": 1.0}}]}
    c = parse_config(data, cwd=str(tmp_path))
    assert [m.path for m in c.models] == ["acme/tiny-model", str(tmp_path / "local")]


def test_what_is_not_a_hub_id():
    for ref in ("./a/b", "/abs/path", "a/../b", "just-a-dir", "a/b/c"):
        assert not _hub.looks_like_hub_id(ref), ref
    for ref in ("mistralai/Mistral-7B-v0.1", "org/name@main"):
        assert _hub.looks_like_hub_id(ref), ref


def test_nan_in_a_model_names_the_tensor_and_the_model(tmp_path):
    from safetensors.torch import load_file

    from test_checkpoint_helpers import leftovers, write_yaml
    from wweight.checkpoint import run_merge
    from wweight.examples.zoo import make_llama_zoo

    z = make_llama_zoo(str(tmp_path / "zoo"), "tiny", n_models=2, dtype=torch.float32)
    bad = os.path.join(z["models"][1], "model.safetensors")
    sd = load_file(bad)
    key = sorted(sd)[0]
    sd[key].view(-1)[3] = float("nan")
    save_file(sd, bad)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "ties", z["base"], z["models"],
                                 [{"weight": 1.0, "density": 0.5}] * 2))
    with pytest.raises((ValueError, CheckpointError), match=rf"'{key}' of {z['models'][1]}.*NaN or Inf"):
        run_merge(cfg, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")
