"""Issue 14: the command line's options match the API and say what they do.

``--block-size row|tensor`` as ``wweight.quantize``; no ``--outliers super`` offered and then refused;
every option has help and shows its default; ``merge --help`` lists the registry's methods;
``merge --backend cpu``; the quantize summary says how to use its output."""
import re

import pytest
import torch

from wweight import cli, dequantize, quantize
from wweight import methods as M
from wweight.checkpoint import load_checkpoint
from wweight.examples.zoo import build_zoo

from test_checkpoint_helpers import run_main


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(str(tmp_path_factory.mktemp("zoo")), n_tasks=2, hidden=(16, 16), ft_epochs=1)


_run = run_main


def _help(capsys, *cmd):
    code, out, err = _run(capsys, *cmd, "--help")
    assert code == 0, err
    return out


def _options(parser):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.option_strings and a.dest != "help":
                yield name, a


def test_every_option_has_help_and_shows_its_default(capsys):
    for name, a in _options(cli.build_parser()):
        assert a.help, f"wweight {name} {a.option_strings[0]} has no help text"
    for cmd, opts in {"quantize": ["--bits", "--block-size", "--outliers"], "align": ["--max-iter", "--seed"],
                      "dequantize": ["--dtype"], "merge": ["--memory-budget"]}.items():
        text = re.sub(r"\s+", " ", _help(capsys, cmd))
        assert "(default:" in text, cmd
        for o in opts:
            assert o in text, (cmd, o)
    q = re.sub(r"\s+", " ", _help(capsys, "quantize"))
    assert "(default: 4)" in q and "(default: 64)" in q and "'row'" in q and "'tensor'" in q
    assert "super," not in q and "wweight dequantize" in q


def test_merge_help_lists_every_registered_method(capsys):
    out = _help(capsys, "merge")
    for name in M.registered():
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_merge_backend_accepts_cpu(tmp_path, capsys, zoo):
    cfg = tmp_path / "c.yaml"
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for p in zoo["finetuned_paths"])
    cfg.write_text(f"merge_method: ties\nbase_model: {zoo['base_path']}\nmodels:\n{models}dtype: float32\n")
    code, out, err = _run(capsys, "merge", cfg, tmp_path / "cpu", "--backend", "cpu", "-q")
    assert code == 0, err
    code, out, err = _run(capsys, "merge", cfg, tmp_path / "torch", "--backend", "torch", "-q")
    assert code == 0, err
    a, b = load_checkpoint(str(tmp_path / "cpu")), load_checkpoint(str(tmp_path / "torch"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("block", ["row", "tensor"])
def test_quantize_block_size_row_and_tensor(tmp_path, capsys, zoo, block):
    code, out, err = _run(capsys, "quantize", zoo["base_path"], tmp_path / "q", "--bits", "4",
                          "--block-size", block)
    assert code == 0, err
    assert "wweight dequantize" in out and "load_quantized" in out  # the summary says how to use it
    code, out, err = _run(capsys, "dequantize", tmp_path / "q", tmp_path / "dq", "-q")
    assert code == 0, err
    base, got = load_checkpoint(zoo["base_path"]), load_checkpoint(str(tmp_path / "dq"))
    for k, v in base.items():
        want = dequantize(quantize(v, 4, block)) if v.dim() >= 2 else v
        assert torch.equal(got[k], want), k


@pytest.mark.parametrize("argv, pattern, code", [
    (["--block-size", "rows"], r"--block-size: must be a positive integer, 'row' or 'tensor'", 2),
    (["--block-size", "0"], r"--block-size: must be a positive integer", 2),
    (["--outliers", "super"], r"--outliers super is not available on the command line.*known_super_weights", 1),
])
def test_quantize_bad_options_one_line(tmp_path, capsys, zoo, argv, pattern, code):
    got, out, err = _run(capsys, "quantize", zoo["base_path"], tmp_path / "q", *argv)
    assert got == code
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert not (tmp_path / "q").exists()


def test_readme_quantize_section_says_how_to_use_the_output():
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    sec = text[text.index("## Whole checkpoints"):text.index("## Benchmarks")]
    assert "--block-size 64|row|tensor" in sec and "load_quantized" in sec and "wweight dequantize Q_DIR" in sec


def test_merge_command_is_recognised_for_its_openmp_policy(monkeypatch):
    """``wweight merge`` (console script or ``python -m wweight``) gets OpenMP's passive wait policy
    (wweight/_startup.py); other commands and library use do not."""
    import sys

    from wweight import _startup

    cases = [(["python", "-m", "wweight", "merge", "c.yaml", "out"], ["-m"], True),
             (["python", "-m", "wweight", "quantize", "m", "out"], ["-m"], False),
             (["python", "/venv/bin/wweight", "merge", "c.yaml", "out"], ["/venv/bin/wweight", "merge", "c.yaml"], True),
             (["python", "/venv/bin/wweight", "align", "a", "b"], ["/venv/bin/wweight", "align"], False),
             (["python", "script.py", "merge"], ["script.py", "merge"], False),
             (["python", "-m", "pytest", "merge"], ["-m"], False)]
    for orig, argv, want in cases:
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        monkeypatch.setattr(sys, "argv", argv)
        assert _startup._merge_command() is want, orig
