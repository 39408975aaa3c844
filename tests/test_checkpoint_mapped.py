"""Issue 15: the reader maps large tensors copy-on-write instead of copying them
(``wweight/checkpoint/reader.py``). A mapped tensor must read the same values as safetensors' own
reader, be writable without ever changing the file, be unmapped when freed, never be kept by the
engine's buffer pool, and turn a shard truncated after validation into a ``CheckpointError``.
``MAP_MIN_BYTES`` is lowered here so that small test tensors take the mapped path; the engine's
output must not depend on which path read its inputs."""
import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_checkpoint_helpers import write_yaml
from wweight import _pool
from wweight.checkpoint import Checkpoint, CheckpointError, reader, run_merge
from wweight.config import load_config

ALWAYS, NEVER = 1, 1 << 62


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _mapped(t: torch.Tensor) -> bool:
    return hasattr(t, _pool._MARK)


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(os.path.realpath(path)))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w.f32": torch.randn(64, 33, generator=g), "w.bf16": torch.randn(5, 7, generator=g).bfloat16(),
            "w.f16": torch.randn(3, generator=g).half(), "i.i64": torch.arange(12).reshape(3, 4),
            "s.scalar": torch.tensor(2.5), "e.empty": torch.zeros(0, 4), "b.bool": torch.tensor([True, False])}


@pytest.mark.parametrize("threshold", [ALWAYS, NEVER])
def test_reads_match_safetensors_and_writes_never_reach_the_file(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(reader, "MAP_MIN_BYTES", threshold)
    sd = _tensors()
    fp = str(tmp_path / "model.safetensors")
    save_file(sd, fp)   # the independent writer
    before = _sha(fp)
    ck = Checkpoint(str(tmp_path))
    for k, v in sd.items():
        got = ck.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        assert _mapped(got) == (reader._CAN_MAP and threshold == ALWAYS and v.numel() > 0), k
        if got.numel():   # writable: the write lands in private memory only
            got.reshape(-1).view(torch.uint8).fill_(0xAB if got.dtype != torch.bool else 1)
    ck.close()
    assert _sha(fp) == before
    assert all(torch.equal(load_file(fp)[k], v) for k, v in sd.items())


@pytest.mark.skipif(not reader._CAN_MAP or not os.path.exists("/proc/self/maps"), reason="needs mmap and procfs")
def test_a_mapping_lives_as_long_as_its_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAP_MIN_BYTES", ALWAYS)
    fp = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(1000), "b": torch.randn(2000)}, fp)
    ck = Checkpoint(str(tmp_path))
    assert _maps_of(fp) == 0
    a, b = ck.read("a"), ck.read("b")
    view = a[10:20]
    assert _maps_of(fp) == 2
    del a
    assert _maps_of(fp) == 2          # the view still reads the mapping
    del view
    assert _maps_of(fp) == 1
    del b
    assert _maps_of(fp) == 0
    ck.close()


def test_a_misaligned_tensor_is_read_not_mapped(tmp_path, monkeypatch):
    """safetensors allows a 2-byte tensor at an odd offset (after a 3-byte one): not mappable as a
    tensor of its dtype, so it is read into a buffer."""
    monkeypatch.setattr(reader, "MAP_MIN_BYTES", ALWAYS)
    vals = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw = json.dumps({"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                      "v": {"dtype": "BF16", "shape": [3], "data_offsets": [3, 9]}}).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes([7, 8, 9]) + vals.view(torch.uint8).numpy().tobytes())
    ck = Checkpoint(str(tmp_path))
    v = ck.read("v")
    assert torch.equal(v, vals) and not _mapped(v)
    assert ck.read("u").tolist() == [7, 8, 9]


@pytest.mark.parametrize("threshold", [ALWAYS, NEVER])
def test_a_shard_truncated_after_validation_raises(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(reader, "MAP_MIN_BYTES", threshold)
    fp = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(100), "b": torch.randn(5000)}, fp)
    ck = Checkpoint(str(tmp_path))
    os.truncate(fp, os.path.getsize(fp) - 4000)
    with pytest.raises(CheckpointError, match="model.safetensors.*(shrank|truncated)"):
        ck.read("b")
    ck.close()


@pytest.mark.skipif(not reader._CAN_MAP, reason="needs mmap")
def test_the_pool_never_keeps_a_mapped_tensor(tmp_path, monkeypatch):
    fp = str(tmp_path / "model.safetensors")
    save_file({"big": torch.randn(512, 512)}, fp)   # 1 MiB: mapped at the default threshold
    ck = Checkpoint(str(tmp_path))
    pool = _pool.BufferPool(1 << 30)
    lst = [ck.read("big")]
    mapped = _mapped(lst[0])   # (not inside the assert: pytest's rewriting would keep a reference)
    kept = pool.give(lst)
    assert mapped and kept == 0 and pool.nbytes == 0
    monkeypatch.setattr(reader, "MAP_MIN_BYTES", NEVER)
    lst = [ck.read("big")]
    mapped = _mapped(lst[0])
    kept = pool.give(lst)
    assert not mapped and kept == 1   # a read buffer is recycled as before
    ck.close()


@pytest.mark.parametrize("method", ["linear", "ties", "passthrough"])
def test_engine_output_does_not_depend_on_the_read_path(tmp_path, monkeypatch, method):
    g = torch.Generator().manual_seed(1)
    shapes = {"emb": (300, 64), "l.w": (64, 64), "l.b": (64,), "n": (7,)}
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        sd = base if i == 0 else {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).bfloat16()
                                  for k, v in base.items()}
        save_file(sd, str(d / "model.safetensors"))
        dirs.append(str(d))
    sums = [_sha(os.path.join(d, "model.safetensors")) for d in dirs]
    if method == "passthrough":
        args = (None, dirs[1:2], None)
    elif method == "linear":
        args = (None, dirs[1:], [{"weight": 1.0}] * 2)
    else:
        args = (dirs[0], dirs[1:], [{"weight": 1.0, "density": 0.5}] * 2)
    outs = []
    for threshold in (NEVER, ALWAYS):
        monkeypatch.setattr(reader, "MAP_MIN_BYTES", threshold)
        out = str(tmp_path / f"out{threshold}")
        yml = write_yaml(str(tmp_path / f"{method}{threshold}.yml"), method, *args, dtype="bfloat16")
        run_merge(load_config(yml), out, progress=False, fsync=False)
        outs.append(_sha(os.path.join(out, "model.safetensors")))
    assert outs[0] == outs[1]
    assert [_sha(os.path.join(d, "model.safetensors")) for d in dirs] == sums
