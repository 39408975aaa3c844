"""Checkpoint engine: safetensors reader / writer, sharding, validation, atomic output, plan, ranks."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_checkpoint_helpers import files_bytes, leftovers, write_yaml
from wweight import checkpoint as ck
from wweight.checkpoint import (AtomicOutputDir, Checkpoint, CheckpointError, ShardedWriter, parse_size,
                                plan_shards, save_checkpoint, split_work)
from wweight.config import load_config


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.u8": torch.arange(10, dtype=torch.uint8),
    }


def test_reader_matches_safetensors_writer(tmp_path):
    sd = _tensors()
    save_file(sd, str(tmp_path / "model.safetensors"))  # the independent writer
    c = Checkpoint(str(tmp_path))
    assert set(c.keys) == set(sd)
    for k, v in sd.items():
        got = c.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        got.add_(1) if got.dtype.is_floating_point else None  # a fresh copy: the file is untouched
    assert all(torch.equal(load_file(str(tmp_path / "model.safetensors"))[k], v) for k, v in sd.items())


def test_writer_output_is_read_by_safetensors(tmp_path):
    sd = _tensors()
    names = save_checkpoint(str(tmp_path / "out"), sd, max_shard_size=40, config={"x": 1})
    assert len(names) > 2 and names[0] == "model-00001-of-%05d.safetensors" % len(names)
    idx = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert set(idx["weight_map"]) == set(sd)
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for k, v in sd.items():
        with safe_open(str(tmp_path / "out" / idx["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v), k
    for n in names:  # 8-byte aligned header, as the safetensors library writes
        with open(tmp_path / "out" / n, "rb") as f:
            assert struct.unpack("<Q", f.read(8))[0] % 8 == 0
    assert json.load(open(tmp_path / "out" / "config.json")) == {"x": 1}
    # and back through our reader (sharded layout with an index)
    c = Checkpoint(str(tmp_path / "out"))
    assert all(torch.equal(c.read(k), v) for k, v in sd.items())


def test_plan_shards_sizes():
    ts = [(f"k{i}", torch.float32, (10,)) for i in range(10)]  # 40 bytes each
    sh = plan_shards(ts, 100)
    assert [len(s.keys) for s in sh] == [2, 2, 2, 2, 2]
    sh = plan_shards([("big", torch.float32, (1000,))] + ts[:1], 100)
    assert [s.keys for s in sh] == [["big"], ["k0"]]
    assert plan_shards(ts, 10 ** 9)[0].filename == "model.safetensors"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 << 20 and parse_size(123) == 123
    assert parse_size("1.5k") == 1500
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad, "size")


def _save(d, sd):
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "model.safetensors"))


def test_truncated_and_corrupted_shards(tmp_path):
    sd = {"w": torch.randn(64, 64)}
    _save(tmp_path / "m", sd)
    fp = tmp_path / "m" / "model.safetensors"
    raw = fp.read_bytes()
    fp.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated.*'w'"):
        Checkpoint(str(tmp_path / "m"))
    fp.write_bytes(raw[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(str(tmp_path / "m"))
    fp.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CheckpointError, match="corrupted"):
        Checkpoint(str(tmp_path / "m"))
    fp.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    with pytest.raises(CheckpointError, match="header length"):
        Checkpoint(str(tmp_path / "m"))


def test_index_paths_and_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    _save(outside, {"w": torch.ones(2)})
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside/model.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a .safetensors file in the model directory"):
        Checkpoint(str(m))
    (m / "model.safetensors.index.json").unlink()
    os.symlink(outside / "model.safetensors", m / "model.safetensors")
    with pytest.raises(CheckpointError, match="symlink.*--allow-symlinks"):
        Checkpoint(str(m))
    assert torch.equal(Checkpoint(str(m), allow_symlinks=True).read("w"), torch.ones(2))


def test_pickle_only_and_missing_dirs(tmp_path):
    (tmp_path / "p").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(str(tmp_path / "p"))
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(str(tmp_path / "nope"))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(str(tmp_path / "s"))


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        AtomicOutputDir(str(out))
    with pytest.raises(CheckpointError, match="overlaps"):
        AtomicOutputDir(str(tmp_path), overwrite=True, inputs=[str(out)])
    a = AtomicOutputDir(str(out), overwrite=True)
    tmp = a.create()
    open(os.path.join(tmp, "f"), "w").write("new")
    assert (out / "keep.txt").exists()  # nothing changes until commit
    a.commit()
    assert sorted(os.listdir(out)) == ["f"] and not leftovers(tmp_path, "out")
    # an error while writing removes the temporary dir and leaves no OUT_DIR
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path / "o2"), {"w": torch.ones(2), "bad": [1]})
    assert not (tmp_path / "o2").exists() and not leftovers(tmp_path, "o2")


def test_full_disk_is_detected_before_writing(tmp_path, monkeypatch):
    import collections

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(ck.atomic.shutil, "disk_usage", lambda p: Usage(10 ** 6, 10 ** 6, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        save_checkpoint(str(tmp_path / "o"), {"w": torch.ones(10)})
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")
    monkeypatch.undo()

    def enospc(fd, off, n):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.writer.os, "posix_fallocate", enospc)
    with pytest.raises(CheckpointError, match="no space left"):
        save_checkpoint(str(tmp_path / "o"), {"w": torch.ones(10)})
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")


def test_split_work_is_balanced_and_deterministic():
    costs = [10, 1, 7, 3, 3, 9, 2]
    parts = split_work(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)
    assert parts == split_work(costs, 3)
    assert split_work(costs, 1) == [list(range(len(costs)))]


def test_writer_any_order_is_byte_identical(tmp_path):
    sd = _tensors()
    shards = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], 64)
    for name, order in (("fwd", list(sd)), ("rev", list(sd)[::-1])):
        (tmp_path / name).mkdir()
        w = ShardedWriter(str(tmp_path / name), shards)
        for k in order:
            w.write(k, sd[k])
        w.close()
        w.write_index()
    assert files_bytes(tmp_path / "fwd") == files_bytes(tmp_path / "rev")


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 ranks on CPU (gloo) produce the single-process bytes


def _rank_main(rank, world, port, cfg_path, out_dir):
    # what torchrun sets per rank; here torch.multiprocessing.spawn plays torchrun (2 ranks, gloo, CPU)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from wweight.checkpoint import run_merge
    from wweight.config import load_config as _load

    res = run_merge(_load(cfg_path), out_dir, progress=False, max_shard_size="40KB")
    assert res["world_size"] == world and res["rank"] == rank
    assert 0 < res["tensors_this_rank"] < res["tensors"]  # the work really was split


def test_torch_distributed_two_ranks_byte_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from wweight.examples.zoo import make_llama_zoo

    z = make_llama_zoo(str(tmp_path / "zoo"), "tiny", n_models=2, dtype=torch.float32, max_shard_size="40KB")
    cfg = write_yaml(tmp_path / "ties.yaml", "ties", z["base"], z["models"],
                     [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}])
    ck.run_merge(load_config(cfg), str(tmp_path / "single"), progress=False, max_shard_size="40KB")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, cfg, str(tmp_path / "multi")), nprocs=2, join=True)
    assert len(os.listdir(tmp_path / "single")) > 3  # several shards + index + config
    assert files_bytes(tmp_path / "single") == files_bytes(tmp_path / "multi")
    assert not leftovers(tmp_path, "multi")


def test_required_weight_missing_for_a_tensor_is_refused_before_compute(tmp_path):
    # a {filter, value} weight that matches only some tensors: mergekit refuses the others (weight has
    # no default); wweight says which tensor at plan time, before reading any tensor data
    from wweight.checkpoint import plan_merge
    from wweight.examples.zoo import make_llama_zoo

    z = make_llama_zoo(str(tmp_path / "zoo"), "tiny", n_models=2, dtype=torch.float32)
    params = [{"weight": [{"filter": "mlp", "value": 0.5}], "density": 0.5}] * 2
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "ties", z["base"], z["models"], params))
    with pytest.raises(CheckpointError, match=r"parameters.weight gives no value for tensor 'model.embed_tokens"):
        plan_merge(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")
    params = [{"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "density": 0.5}] * 2
    cfg = load_config(write_yaml(tmp_path / "d.yaml", "ties", z["base"], z["models"], params))
    assert plan_merge(cfg, str(tmp_path / "out")).items
