"""What a merge leaves on disk (issue 14): config.json's dtype keys, one file mode, the Hub files
(mergekit_config.yml, README.md, the no-tokenizer warning), what SIGKILL leaves behind and an
``--overwrite`` that never loses the old output."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from test_checkpoint_helpers import leftovers, start_slow_merge, write_yaml
from wweight import cli
from wweight.checkpoint import AtomicOutputDir, save_checkpoint
from wweight.checkpoint import atomic as A
from wweight.checkpoint import stale
from wweight.examples.zoo import make_llama_zoo


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    z = make_llama_zoo(str(tmp_path_factory.mktemp("llama")), "tiny", n_models=2, dtype=torch.float32)
    for p in [z["base"]] + z["models"]:  # transformers 5 writes both keys
        fp = os.path.join(p, "config.json")
        cfg = json.load(open(fp))
        cfg["dtype"] = "float32"
        cfg["text_config"] = {"dtype": "float32", "hidden_size": 64}
        json.dump(cfg, open(fp, "w"))
    with open(os.path.join(z["base"], "tokenizer_config.json"), "w") as f:
        f.write("{}\n")
    return z


def _merge(capsys, cfg, out, *extra):
    code = cli.main(["merge", str(cfg), str(out), "-q", *map(str, extra)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return cap.err


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_config_dtype_keys_follow_the_output_dtype(tmp_path, capsys, llama, dtype):
    cfg = write_yaml(tmp_path / "c.yaml", "task_arithmetic", llama["base"], llama["models"],
                     [{"weight": 0.5}] * 2, out_dtype=dtype)
    _merge(capsys, cfg, tmp_path / "out")
    got = json.load(open(tmp_path / "out" / "config.json"))
    assert got["dtype"] == got["torch_dtype"] == dtype
    assert got["text_config"]["dtype"] == dtype
    try:
        from transformers import AutoConfig
    except Exception:  # noqa: BLE001 - transformers is optional
        return
    ac = AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert getattr(ac, "dtype", None) in (getattr(torch, dtype), dtype) or ac.torch_dtype in (getattr(torch, dtype), dtype)


def test_every_output_file_is_0644(tmp_path):
    old = os.umask(0o077)  # even a strict umask: the output is meant to be shared
    try:
        save_checkpoint(str(tmp_path / "out"), {"w": torch.ones(3)}, config={"a": 1},
                        extra_files={"permutations.safetensors": {"p": torch.arange(3)}})
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["config.json", "model.safetensors", "permutations.safetensors"]
    for n in names:
        assert os.stat(tmp_path / "out" / n).st_mode & 0o777 == 0o644, n


def test_hub_files_and_tokenizer_warning(tmp_path, capsys, llama):
    cfg = write_yaml(tmp_path / "c.yaml", "ties", llama["base"], llama["models"],
                     [{"weight": 1.0, "density": 0.5}, {"weight": 0.7}], top={"lambda": 0.9})
    err = _merge(capsys, cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert "tokenizer" not in err  # the base has a tokenizer file
    assert yaml.safe_load(open(out / "mergekit_config.yml")) == yaml.safe_load(open(cfg))
    card = open(out / "README.md").read()
    assert card.startswith("---\n") and "mergekit" in card and "`ties`" in card
    import wweight

    assert f"wweight {wweight.__version__}" in card
    for m in llama["models"]:
        assert m in card
    assert "`lambda`: `0.9`" in card and "`density` = `0.5`" in card
    assert "```yaml\nmerge_method: ties" in card
    # the mergekit reader accepts the written config
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(yaml.safe_load(open(out / "mergekit_config.yml")))
    # no tokenizer in tokenizer_source: exactly one warning line
    cfg2 = write_yaml(tmp_path / "c2.yaml", "ties", llama["base"], llama["models"],
                      [{"weight": 1.0, "density": 0.5}, {"weight": 0.7}], tokenizer_source=llama["models"][0])
    err = _merge(capsys, cfg2, tmp_path / "out2")
    lines = [ln for ln in err.splitlines() if "tokenizer" in ln]
    assert len(lines) == 1 and lines[0].startswith("wweight: warning:") and "no tokenizer files" in lines[0]


def test_equivalent_config_without_yaml(tmp_path, llama):
    from wweight.checkpoint.card import config_yaml
    from wweight.config import load_config

    cfg = load_config(write_yaml(tmp_path / "c.yaml", "ties", llama["base"], llama["models"],
                                 [{"weight": 1.0, "density": 0.5}, {"weight": 0.7}]))
    cfg.raw = None  # a MergeConfig built in Python: the file is rebuilt from its fields
    data = yaml.safe_load(config_yaml(cfg))
    assert data["merge_method"] == "ties" and data["base_model"] == llama["base"]
    assert [m["model"] for m in data["models"]] == llama["models"]


# ---------------------------------------------------------------------------------------------
# SIGKILL leftovers


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_tmp(parent, name, token, pid, host=None):
    d = parent / f".{name}.wweight-tmp-{token}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"partial")
    (d / stale.OWNER_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                  "start": None}))
    return d


def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path, capsys):
    dead = _fake_tmp(tmp_path, "out", "dead0000", _dead_pid())
    live = _fake_tmp(tmp_path, "out", "live0000", os.getpid())
    other = _fake_tmp(tmp_path, "out", "othr0000", 1, host="another-host.invalid")
    unrelated = _fake_tmp(tmp_path, "other", "dead1111", _dead_pid())
    save_checkpoint(str(tmp_path / "out"), {"w": torch.ones(2)})
    err = capsys.readouterr().err
    assert not dead.exists() and live.exists() and other.exists() and unrelated.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]  # no owner file in the output
    lines = err.splitlines()
    assert sum(str(dead) in ln and "removed" in ln for ln in lines) == 1
    assert not any(str(live) in ln for ln in lines)
    assert any(str(other) in ln and "rm -rf" in ln and "another-host.invalid" in ln for ln in lines)


def test_owner_file_is_written_and_a_reused_pid_is_dead(tmp_path):
    a = AtomicOutputDir(str(tmp_path / "out"))
    tmp = a.create()
    info = json.load(open(os.path.join(tmp, stale.OWNER_FILE)))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert stale.pid_alive(os.getpid(), info["start"])
    if info["start"] is not None:
        assert not stale.pid_alive(os.getpid(), "0")  # same pid, another process start time
    a.abort()
    assert not leftovers(tmp_path, "out")


# ---------------------------------------------------------------------------------------------
# --overwrite: the old output or the complete new one, at every instant


def _old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return out


def test_overwrite_uses_one_exchange(tmp_path, monkeypatch):
    out = _old_output(tmp_path)
    a = AtomicOutputDir(str(out), overwrite=True)
    tmp = a.create()
    open(os.path.join(tmp, "new.txt"), "w").write("new")
    swapped = []
    real = A._exchange

    def exchange(x, y):
        ok = real(x, y)
        swapped.append(ok)
        if ok:  # at this instant OUT_DIR already holds the complete new output
            assert sorted(os.listdir(out)) == ["new.txt"]
        return ok

    monkeypatch.setattr(A, "_exchange", exchange)
    a.commit()
    assert sorted(os.listdir(out)) == ["new.txt"] and not leftovers(tmp_path, "out")
    if sys.platform.startswith("linux"):
        assert swapped == [True]


def test_overwrite_fallback_killed_between_renames_is_recovered(tmp_path, capsys, monkeypatch):
    out = _old_output(tmp_path)
    a = AtomicOutputDir(str(out), overwrite=True)
    tmp = a.create()
    open(os.path.join(tmp, "new.txt"), "w").write("new")
    monkeypatch.setattr(A, "_exchange", lambda x, y: False)  # no renameat2
    stale.remove_owner(tmp)  # what commit() does first
    a._move_old_aside()  # step 1 of the fallback, then "SIGKILL": step 2 never runs
    assert not out.exists()
    b = AtomicOutputDir(str(out), overwrite=True)  # the next run
    err = capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["old.txt"] and "restored the previous" in err
    tmp2 = b.create()
    open(os.path.join(tmp2, "newer.txt"), "w").write("n")
    b.commit()  # the fallback path end to end
    assert sorted(os.listdir(out)) == ["newer.txt"]
    # the killed run's finished-but-uncommitted directory (no owner file left) is reported, not removed
    assert os.path.isdir(tmp)
    assert "rm -rf" in capsys.readouterr().err


def test_sigkill_mid_merge_then_rerun_cleans_up(tmp_path, capsys, llama):
    """A real SIGKILL during a merge leaves the temporary directory; the next run removes it."""
    import signal
    import time

    cfg = write_yaml(tmp_path / "c.yaml", "task_arithmetic", llama["base"], llama["models"], [{"weight": 0.3}] * 2)
    proc = start_slow_merge(cfg, tmp_path / "out", tmp_path, stderr=subprocess.DEVNULL)
    left = leftovers(tmp_path, "out")
    assert left, "the merge never started writing"
    time.sleep(0.2)  # the owner file is written right after the directory
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert leftovers(tmp_path, "out") == left and not (tmp_path / "out").exists()
    err = _merge(capsys, cfg, tmp_path / "out")
    assert not leftovers(tmp_path, "out")
    assert sum("removed" in ln and left[0] in ln for ln in err.splitlines()) == 1


def test_progress_counts_bytes_read_and_written_and_tensors(tmp_path, monkeypatch):
    # the bar's total is the summary's bytes read + written; reads count when they arrive (not at
    # the write of the same tensor), and the postfix counts tensors out of the total
    import tqdm as tqdm_mod

    from test_checkpoint_helpers import write_yaml
    from wweight.checkpoint import run_merge
    from wweight.config import load_config
    from wweight.examples.zoo import make_llama_zoo

    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n, self.events, self.postfix = total, 0, [], ""
            bars.append(self)

        def update(self, k):
            self.n += k
            self.events.append(k)

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            pass

    monkeypatch.setattr(tqdm_mod, "tqdm", Bar)
    z = make_llama_zoo(str(tmp_path / "zoo"), "tiny", n_models=2, dtype=torch.float32)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", "ties", z["base"], z["models"],
                                 [{"weight": 1.0, "density": 0.5}] * 2))
    res = run_merge(cfg, str(tmp_path / "out"), progress=True)
    (bar,) = bars
    assert bar.total == bar.n == res["bytes_read"] + res["bytes_written"]
    assert bar.events[0] > 0 and len(bar.events) >= 2 * res["tensors"] - 1
    assert bar.postfix.startswith(f"{res['tensors']}/{res['tensors']} tensors")
