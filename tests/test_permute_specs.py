"""Spec builders: a random permutation must leave every model's function unchanged.

The transformer forwards below are written here from the architectures' definitions (GPT-2:
pre-LN, fused Conv1D QKV, GELU MLP; LLaMA: RMSNorm, RoPE with rotate_half, GQA, SwiGLU), independent
of wweight; Hugging Face models from a tiny random config are checked too when transformers imports.
"""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from wweight.permute import apply_permutation, random_permutation, weight_matching
from wweight.permute.specs import cnn_spec, gpt2_spec, llama_spec, mlp_spec, resnet_spec


def _assert_preserved(spec, model, inputs, seed=0, atol=1e-5):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = random_permutation(spec, sd, seed=seed)
    assert any(not torch.equal(p.reshape(-1, p.shape[-1]), torch.arange(p.shape[-1]).expand(p.numel() // p.shape[-1], -1))
               for p in perms.values())
    out = apply_permutation(spec, perms, sd)
    assert any(not torch.equal(out[k], sd[k]) for k in spec.axes_to_perm)
    with torch.no_grad():
        y0 = model(*inputs)
        model.load_state_dict(out)
        y1 = model(*inputs)
        model.load_state_dict(sd)
    y0 = getattr(y0, "logits", y0)
    y1 = getattr(y1, "logits", y1)
    torch.testing.assert_close(y1, y0, atol=atol, rtol=1e-4)
    return sd, out, perms


def _randomize_norm_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))


# --------------------------------------------------------------------------- MLP / CNN / ResNet


def test_mlp_spec():
    from wweight.examples.digits import make_mlp

    m = make_mlp((16, 12, 8), seed=0).eval()
    _assert_preserved(mlp_spec(["0", "2", "4", "6"]), m, (torch.randn(4, 64),))


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc0, self.fc1 = nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.fc0(x.flatten(1)))
        return self.fc1(x)


def test_cnn_spec_with_batchnorm_and_flatten():
    m = _VGG()
    _randomize_norm_stats(m)
    m.eval()
    spec = cnn_spec(["conv0", "conv1"], ["fc0", "fc1"], norms=["bn0", "bn1"])
    _assert_preserved(spec, m, (torch.randn(2, 3, 8, 8),))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, option B shortcuts), as in Git Re-Basin's ResNet-20."""

    def __init__(self, blocks=(2, 1, 2), width=2):
        super().__init__()
        w = [4 * width, 8 * width, 16 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        cin = w[0]
        for s, nb in enumerate(blocks):
            layers = []
            for b in range(nb):
                layers.append(_Block(cin, w[s], 2 if (b == 0 and s > 0) else 1))
                cin = w[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.n_stages = len(blocks)
        self.linear = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.n_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_resnet_spec():
    m = _ResNet((2, 1, 2))
    _randomize_norm_stats(m)
    m.eval()
    spec = resnet_spec((2, 1, 2))
    assert "layer1.0.shortcut.0.weight" not in spec.axes_to_perm
    assert spec.axes_to_perm["layer1.1.conv2.weight"][0] == spec.axes_to_perm["conv1.weight"][0] == "P_res1"
    sd, _, _ = _assert_preserved(spec, m, (torch.randn(2, 3, 8, 8),), atol=1e-4)
    # num_batches_tracked is not permuted and passes through
    assert any(k.endswith("num_batches_tracked") for k in sd)


# --------------------------------------------------------------------------- mini GPT-2


class _MiniGPT2(nn.Module):
    def __init__(self, n_layer=2, n_head=3, d=12, vocab=20, n_pos=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g) * 0.3)
        self.n_layer, self.n_head = n_layer, n_head
        P = {"transformer.wte.weight": r(vocab, d), "transformer.wpe.weight": r(n_pos, d)}
        for i in range(n_layer):
            h = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                P[h + ln + ".weight"], P[h + ln + ".bias"] = nn.Parameter(1 + r(d).data), r(d)
            P[h + "attn.c_attn.weight"], P[h + "attn.c_attn.bias"] = r(d, 3 * d), r(3 * d)
            P[h + "attn.c_proj.weight"], P[h + "attn.c_proj.bias"] = r(d, d), r(d)
            P[h + "mlp.c_fc.weight"], P[h + "mlp.c_fc.bias"] = r(d, 4 * d), r(4 * d)
            P[h + "mlp.c_proj.weight"], P[h + "mlp.c_proj.bias"] = r(4 * d, d), r(d)
        P["transformer.ln_f.weight"], P["transformer.ln_f.bias"] = nn.Parameter(1 + r(d).data), r(d)
        P["lm_head.weight"] = r(vocab, d)
        self.p = nn.ParameterDict({k.replace(".", "__"): v for k, v in P.items()})

    def state_dict(self, *a, **k):
        return {kk.replace("__", "."): v for kk, v in self.p.items()}

    def load_state_dict(self, sd, *a, **k):
        for kk, v in sd.items():
            self.p[kk.replace(".", "__")].data.copy_(v)

    def forward(self, ids):
        P = self.state_dict()
        B, T = ids.shape
        D = P["transformer.wte.weight"].shape[1]
        H, hd = self.n_head, D // self.n_head
        x = P["transformer.wte.weight"][ids] + P["transformer.wpe.weight"][:T]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(self.n_layer):
            h = f"transformer.h.{i}."
            y = F.layer_norm(x, (D,), P[h + "ln_1.weight"], P[h + "ln_1.bias"])
            q, k, v = (y @ P[h + "attn.c_attn.weight"] + P[h + "attn.c_attn.bias"]).split(D, dim=-1)
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
            a = (att @ v).transpose(1, 2).reshape(B, T, D)
            x = x + a @ P[h + "attn.c_proj.weight"] + P[h + "attn.c_proj.bias"]
            y = F.layer_norm(x, (D,), P[h + "ln_2.weight"], P[h + "ln_2.bias"])
            y = F.gelu(y @ P[h + "mlp.c_fc.weight"] + P[h + "mlp.c_fc.bias"], approximate="tanh")
            x = x + y @ P[h + "mlp.c_proj.weight"] + P[h + "mlp.c_proj.bias"]
        x = F.layer_norm(x, (D,), P["transformer.ln_f.weight"], P["transformer.ln_f.bias"])
        return x @ P["lm_head.weight"].T


def test_gpt2_spec_mini():
    m = _MiniGPT2()
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    spec = gpt2_spec(2, 3, 4)
    _, _, perms = _assert_preserved(spec, m, (ids,))
    assert perms["P_qk0"].shape == (3, 4) and perms["P_head1"].shape == (3,)
    _assert_preserved(gpt2_spec(2, 3, 4, permute_heads=False), m, (ids,), seed=1)


def test_gpt2_mini_planted_permutation_recovered():
    """Weight matching of a model with a permuted copy of itself finds the planted permutation."""
    m = _MiniGPT2(seed=3)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    spec = gpt2_spec(2, 3, 4)
    planted = random_permutation(spec, sd, seed=7)
    b = apply_permutation(spec, planted, sd)
    perms = weight_matching(spec, sd, b)
    back = apply_permutation(spec, perms, b)
    for k in spec.axes_to_perm:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


# --------------------------------------------------------------------------- mini LLaMA


def _rope(x, base=10000.0):
    """x (B, H, T, d): rotate_half RoPE as in Hugging Face LLaMA."""
    d, T = x.shape[-1], x.shape[-2]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    fr = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    emb = torch.cat([fr, fr], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


class _MiniLlama(_MiniGPT2):
    def __init__(self, n_layer=2, n_head=4, n_kv=2, hd=4, d=10, ffn=14, vocab=20, seed=0):
        nn.Module.__init__(self)
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g) * 0.3)
        self.n_layer, self.n_head, self.n_kv, self.hd = n_layer, n_head, n_kv, hd
        P = {"model.embed_tokens.weight": r(vocab, d)}
        for i in range(n_layer):
            h = f"model.layers.{i}."
            P[h + "input_layernorm.weight"] = nn.Parameter(1 + r(d).data)
            P[h + "post_attention_layernorm.weight"] = nn.Parameter(1 + r(d).data)
            P[h + "self_attn.q_proj.weight"] = r(n_head * hd, d)
            P[h + "self_attn.k_proj.weight"] = r(n_kv * hd, d)
            P[h + "self_attn.v_proj.weight"] = r(n_kv * hd, d)
            P[h + "self_attn.o_proj.weight"] = r(d, n_head * hd)
            P[h + "mlp.gate_proj.weight"], P[h + "mlp.up_proj.weight"] = r(ffn, d), r(ffn, d)
            P[h + "mlp.down_proj.weight"] = r(d, ffn)
        P["model.norm.weight"] = nn.Parameter(1 + r(d).data)
        P["lm_head.weight"] = r(vocab, d)
        self.p = nn.ParameterDict({k.replace(".", "__"): v for k, v in P.items()})

    def forward(self, ids):
        P = self.state_dict()
        B, T = ids.shape
        H, G, hd = self.n_head, self.n_kv, self.hd
        rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        x = P["model.embed_tokens.weight"][ids]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(self.n_layer):
            h = f"model.layers.{i}."
            y = rms(x, P[h + "input_layernorm.weight"])
            q = (y @ P[h + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
            k = (y @ P[h + "self_attn.k_proj.weight"].T).view(B, T, G, hd).transpose(1, 2)
            v = (y @ P[h + "self_attn.v_proj.weight"].T).view(B, T, G, hd).transpose(1, 2)
            q, k = _rope(q), _rope(k)
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # head j -> group j // r
            att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + (att @ v).transpose(1, 2).reshape(B, T, H * hd) @ P[h + "self_attn.o_proj.weight"].T
            y = rms(x, P[h + "post_attention_layernorm.weight"])
            y = F.silu(y @ P[h + "mlp.gate_proj.weight"].T) * (y @ P[h + "mlp.up_proj.weight"].T)
            x = x + y @ P[h + "mlp.down_proj.weight"].T
        return rms(x, P["model.norm.weight"]) @ P["lm_head.weight"].T


@pytest.mark.parametrize("n_head,n_kv", [(4, 2), (3, 3), (6, 1)])
def test_llama_spec_mini(n_head, n_kv):
    m = _MiniLlama(n_head=n_head, n_kv=n_kv)
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    spec = llama_spec(2, n_head, n_kv, 4)
    _, _, perms = _assert_preserved(spec, m, (ids,))
    if n_kv == n_head:
        assert perms["P_v0"].shape == (n_kv, 4)
    else:
        assert perms["P_q0"].shape == (n_kv, n_head // n_kv)


def test_llama_within_head_qk_permutation_breaks_rope():
    """Why the spec has no Q/K head-dim perm: under RoPE a common permutation of q and k dims
    changes the scores (it would be harmless without RoPE)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    p = torch.randperm(8, generator=g)
    plain = torch.allclose(q @ k.transpose(-1, -2), q[..., p] @ k[..., p].transpose(-1, -2), atol=1e-5)
    roped = torch.allclose(_rope(q) @ _rope(k).transpose(-1, -2),
                           _rope(q[..., p]) @ _rope(k[..., p]).transpose(-1, -2), atol=1e-3)
    assert plain and not roped


@pytest.mark.parametrize("n_head,n_kv,lap_method", [(4, 2, "auto"), (3, 3, "auction")])
def test_llama_mini_planted_permutation_recovered(n_head, n_kv, lap_method):
    m = _MiniLlama(n_head=n_head, n_kv=n_kv, seed=5)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    spec = llama_spec(2, n_head, n_kv, 4)
    planted = random_permutation(spec, sd, seed=9)
    b = apply_permutation(spec, planted, sd)
    back = apply_permutation(spec, weight_matching(spec, sd, b, lap_method=lap_method), b)
    for k in spec.axes_to_perm:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


# --------------------------------------------------------------------------- Hugging Face models


def test_hf_gpt2_spec():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (2, 9))
    _assert_preserved(gpt2_spec(2, 2, 8), m, (ids,), atol=1e-4)


def test_hf_llama_spec_gqa():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                   max_position_embeddings=32)
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (2, 9))
    _assert_preserved(llama_spec(2, 4, 2, 8), m, (ids,), atol=1e-4)


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_conv_planted_permutation_recovered(arch):
    if arch == "cnn":
        m, spec = _VGG(), cnn_spec(["conv0", "conv1"], ["fc0", "fc1"], norms=["bn0", "bn1"])
    else:
        m, spec = _ResNet((2, 1, 2)), resnet_spec((2, 1, 2))
    _randomize_norm_stats(m, seed=1)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    b = apply_permutation(spec, random_permutation(spec, sd, seed=4), sd)
    back = apply_permutation(spec, weight_matching(spec, sd, b), b)
    for k in spec.axes_to_perm:
        assert torch.equal(back[k], sd[k]), k
