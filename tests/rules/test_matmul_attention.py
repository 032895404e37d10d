"""Matmuls between activations (matmul / bmm / mm / mv / @, 1-D operands, batch broadcasting, a shared operand),
torch.einsum, nn.MultiheadAttention (layouts, weights, masks, kdim/vdim, bias, bias_kv), F.scaled_dot_product_attention,
and a tiny ViT (class token and position embedding parameters used directly in forward).

Inputs are per model ``[B=2, T=5, 7]`` (``[N, 2, 5, 7]`` fused, or ``[2, 5, 7]`` shared); projections come from
per-model Linears, so operands have real fused layouts (stacked, or folded last dim for a shared input).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import assert_models_independent, check_fused, make_models

B, T, K = 2, 5, 7
MODES = [pytest.param(False, id="per-model"), pytest.param(True, id="shared")]
NS = [1, 3]


def seq_input(n: int, shared: bool) -> torch.Tensor:
    return torch.randn(B, T, K) if shared else torch.randn(n, B, T, K)


def const_like(shape, lo=-1.0, hi=1.0):
    """Deterministic: equal in every model, so the fused module treats it as shared."""
    return torch.linspace(lo, hi, torch.Size(shape).numel()).view(shape)


def fused_ok(models, x, shared, **counts):
    fused = check_fused(models, (x,), shared=shared)
    rep = fused.fusion_report
    assert not rep.fallbacks, rep.fallbacks
    assert rep.count("fallback") == 0
    for kind, c in counts.items():
        assert rep.count(kind) == c, f"expected {c} x {kind}:\n{fused}"
    return fused


# ------------------------------------------------------------------------------------------------ matmul


class MatmulNet(nn.Module):
    """Two per-model projections q, k [B, 5, 6] and one op between them (or with a parameter / constant)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lq, self.lk = nn.Linear(K, 6), nn.Linear(K, 6)
        self.lx = nn.Linear(K, K)
        self.v = nn.Parameter(torch.randn(6))  # per-model vector
        self.W = nn.Parameter(torch.randn(3, 4))  # per-model matrix
        self.W3 = nn.Parameter(torch.randn(2, 6, 4))  # per-model batched matrix
        self.P = const_like((6, 4))  # shared matrix
        self.Pt = self.P.t().contiguous()
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        q, k = self.lq(x), self.lk(x)  # [B, 5, 6]
        h = self.how
        if h == "at_transpose":
            return q @ k.transpose(-1, -2)
        if h == "torch_matmul_mT":
            return torch.matmul(q, k.mT)
        if h == "bmm":
            return torch.bmm(q, k.transpose(1, 2)), q.bmm(k.transpose(1, 2))
        if h == "method_matmul":
            return q.matmul(k.transpose(1, 2))
        if h == "mm_mv_2d":
            return torch.mm(q[0], k[0].t()), torch.mv(q[1], self.v), q[0].mm(k[1].T)
        if h == "vector_right":  # [B, 5, 6] @ [6] -> [B, 5]
            return q @ self.v, torch.matmul(k, self.v)
        if h == "vector_left":  # [6] @ [B, 6, 5] -> [B, 5]
            return self.v @ k.transpose(1, 2)
        if h == "vector_vector":  # per-model dot product -> one scalar per model
            return q.mean((0, 1)) @ self.v, torch.matmul(self.v, k.sum((0, 1)))
        if h == "activation_vector":  # a 1-D activation on both sides
            a = q.mean((0, 1))  # [6]
            return a @ k.transpose(1, 2), q @ a, a @ a
        if h == "batch_broadcast_4d":  # [B, 2, 5, 3] @ [B, 2, 3, 5] and @ a 2-D per-model parameter
            q4 = q.view(B, T, 2, 3).transpose(1, 2)
            k4 = k.view(B, T, 2, 3).transpose(1, 2)
            return q4 @ k4.mT, q4 @ self.W
        if h == "batch_broadcast_param3d":  # [B, 1, 5, 6] @ [2, 6, 4] -> [B, 2, 5, 4]
            return q[:, None] @ self.W3
        if h == "batch_broadcast_size1":  # [B, 5, 6] @ [1, 6, 5]
            return q @ k[:1].mT, k[1:] @ q.mT
        if h == "shared_constant_operand":
            return q @ self.P, self.Pt @ q.mT, torch.matmul(k, self.P)
        if h == "shared_input_operand":  # x is shared in the shared mode
            return x @ self.lx(x).mT, self.lx(x).mT @ x, torch.bmm(x, self.lx(x).transpose(1, 2))
        if h == "addmm_baddbmm":
            return torch.baddbmm(self.bias, q, k.mT), torch.addmm(self.bias[:4], q[0], self.W3[0]), \
                torch.baddbmm(q[:, :, :5], q, k.mT, beta=0.5, alpha=2.0)
        if h == "dot":
            return torch.dot(q.mean((0, 1)), self.v)
        raise AssertionError(h)


# how -> number of matmul nodes the report must count
MATMULS = {
    "at_transpose": 1, "torch_matmul_mT": 1, "bmm": 2, "method_matmul": 1, "mm_mv_2d": 3, "vector_right": 2,
    "vector_left": 1, "vector_vector": 2, "activation_vector": 3, "batch_broadcast_4d": 2,
    "batch_broadcast_param3d": 1, "batch_broadcast_size1": 2, "shared_constant_operand": 3,
    "shared_input_operand": 3, "addmm_baddbmm": 3, "dot": 1,
}


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("how", list(MATMULS))
def test_matmul(how, n, shared):
    models = make_models(lambda: MatmulNet(how), n)
    fused_ok(models, seq_input(n, shared), shared, matmul=MATMULS[how])


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("how", ["at_transpose", "vector_left", "batch_broadcast_4d", "shared_input_operand"])
def test_matmul_n8(how, shared):
    models = make_models(lambda: MatmulNet(how), 8)
    fused_ok(models, seq_input(8, shared), shared, matmul=MATMULS[how])


class ConvMatmul(nn.Module):
    """matmul on a conv output (channels folded with the model dim): a Gram matrix and its transpose."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        c = self.conv(x)  # [B, 4, 5, 7]
        f = c.flatten(2)  # [B, 4, 35]
        return c @ c.mT, c.mT @ c, torch.bmm(f, f.transpose(1, 2)) / f.size(-1)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_matmul_on_conv_output(n, shared):
    models = make_models(ConvMatmul, n)
    x = torch.randn(B, 3, 5, 7) if shared else torch.randn(n, B, 3, 5, 7)
    fused_ok(models, x, shared, matmul=3, conv2d=1)


# ------------------------------------------------------------------------------------------------ einsum


class EinsumNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lq, self.lk = nn.Linear(K, 6), nn.Linear(K, 6)
        self.lx = nn.Linear(K, K)
        self.W = nn.Parameter(torch.randn(6, 4))
        self.P = const_like((6, 4))

    def forward(self, x):
        q, k = self.lq(x), self.lk(x)  # [B, 5, 6]
        h = self.how
        if h == "bte_bse_bts":
            return torch.einsum("bte,bse->bts", q, k)
        if h == "implicit_output":
            return torch.einsum("bij,bjk", q, k.transpose(1, 2))
        if h == "ellipsis":
            return torch.einsum("...ij,...kj->...ik", q, k)
        if h == "per_model_param":
            return torch.einsum("bte,ef->btf", q, self.W)
        if h == "shared_constant":
            return torch.einsum("bte,ef->btf", q, self.P), torch.einsum("ef,bte->bft", self.P, k)
        if h == "list_operands":
            return torch.einsum("bte,bse->bts", [q, k])
        if h == "diagonal":
            return torch.einsum("bii->bi", q @ k.transpose(1, 2))
        if h == "full_reduction":  # one scalar per model
            return torch.einsum("bte,bte->", q, k)
        if h == "outer":
            return torch.einsum("bi,bj->bij", q.mean(1), k.mean(1))
        if h == "spaces_uppercase":
            return torch.einsum("B T E, B S E -> B T S", q, k)
        if h == "three_operands":
            return torch.einsum("bte,ef,bsf->bts", q, self.W, self.lk(x)[..., :4])
        if h == "shared_input_operand":
            return torch.einsum("bte,bse->bts", x, self.lx(x))
        raise AssertionError(h)


EINSUMS = {"bte_bse_bts": 1, "implicit_output": 1, "ellipsis": 1, "per_model_param": 1, "shared_constant": 2,
           "list_operands": 1, "diagonal": 1, "full_reduction": 1, "outer": 1, "spaces_uppercase": 1,
           "three_operands": 1, "shared_input_operand": 1}


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("how", list(EINSUMS))
def test_einsum(how, n, shared):
    models = make_models(lambda: EinsumNet(how), n)
    fused_ok(models, seq_input(n, shared), shared, einsum=EINSUMS[how])


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("how", ["bte_bse_bts", "ellipsis", "shared_input_operand"])
def test_einsum_n8(how, shared):
    models = make_models(lambda: EinsumNet(how), 8)
    fused_ok(models, seq_input(8, shared), shared, einsum=EINSUMS[how])


# ------------------------------------------------------------------------------------------------ MultiheadAttention

E, H, S = 8, 2, 4  # embed dim, heads, key length (keys are x[:, 1:])


class MHANet(nn.Module):
    """Per-model q/k/v projections, then nn.MultiheadAttention; masks are constants (shared by all models)."""

    def __init__(self, batch_first=True, weights="avg", mask="none", kdim=None, vdim=None, bias=True,
                 add_bias_kv=False, add_zero_attn=False, kv_input=False):
        super().__init__()
        self.batch_first, self.weights, self.mask, self.kv_input = batch_first, weights, mask, kv_input
        if kv_input:  # keys and values are the input itself (shared in the shared mode)
            kdim = vdim = K
        self.lq = nn.Linear(K, E)
        self.lk = nn.Linear(K, kdim or E)
        self.lv = nn.Linear(K, vdim or E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias,
                                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        self.float_mask = const_like((T, S), -2.0, 1.0)
        # True = not allowed; with the key padding mask every query still sees at least one key
        self.bool_mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]]).bool()
        self.kpm = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]]).bool()
        self.mask3d = const_like((B * H, T, S), -3.0, 1.0)

    def forward(self, x):
        q, k, v = self.lq(x), self.lk(x[:, 1:]), self.lv(x[:, 1:])
        if self.kv_input:
            k = v = x[:, 1:]
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        attn_mask = {"none": None, "float": self.float_mask, "bool": self.bool_mask, "kpm": None,
                     "both": self.bool_mask, "mask3d": self.mask3d}[self.mask]
        kpm = self.kpm if self.mask in ("kpm", "both") else None
        out, w = self.mha(q, k, v, key_padding_mask=kpm, need_weights=self.weights != "none", attn_mask=attn_mask,
                          average_attn_weights=self.weights == "avg")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, w


MHA_CONFIGS = (
    [dict(batch_first=bf, weights=w, mask=m) for bf in (True, False) for w in ("none", "avg", "per_head")
     for m in ("none", "both")]
    + [dict(batch_first=True, weights="avg", mask=m) for m in ("float", "bool", "kpm", "mask3d")]
    + [dict(batch_first=False, weights="none", mask=m) for m in ("float", "kpm", "mask3d")]
    + [dict(batch_first=True, weights="per_head", mask="float")]
    + [dict(kdim=5, vdim=3), dict(kdim=5, vdim=3, batch_first=False, weights="none", mask="both"),
       dict(bias=False), dict(bias=False, mask="both", weights="none"),
       dict(add_bias_kv=True), dict(add_bias_kv=True, mask="both"), dict(add_bias_kv=True, weights="none", mask="kpm"),
       dict(add_zero_attn=True, mask="both"), dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=3),
       dict(kv_input=True, mask="both"), dict(kv_input=True, batch_first=False, weights="none")]
)


def _cfg_id(c):
    parts = ["bf" if c.get("batch_first", True) else "seq_first", f"w_{c.get('weights', 'avg')}",
             f"mask_{c.get('mask', 'none')}"]
    parts += [f"{k}{'' if v is True else '_' + str(v)}" for k, v in c.items()
              if k not in ("batch_first", "weights", "mask")]
    return "-".join(parts)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=_cfg_id)
def test_multihead_attention(cfg, n, shared):
    models = make_models(lambda: MHANet(**cfg), n)
    fused_ok(models, seq_input(n, shared), shared, multihead_attention=1, linear=3)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("cfg", [dict(), dict(batch_first=False, weights="per_head", mask="both"),
                                 dict(kdim=5, vdim=3, add_bias_kv=True)], ids=_cfg_id)
def test_multihead_attention_n8(cfg, shared):
    models = make_models(lambda: MHANet(**cfg), 8)
    fused_ok(models, seq_input(8, shared), shared, multihead_attention=1, linear=3)


class PaddingMaskInput(nn.Module):
    """The key padding mask is a forward argument: one mask per model (per-model mode) or one for all (shared)."""

    def __init__(self):
        super().__init__()
        self.lq = nn.Linear(K, E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, pad):
        q = self.lq(x)
        return self.mha(q, q, q, key_padding_mask=pad)[0]


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
def test_multihead_attention_padding_mask_input(n, shared):
    models = make_models(PaddingMaskInput, n)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 3:] = True
    pad[1, :1] = True
    if not shared:
        pad = torch.stack([pad.roll(i, 1) for i in range(n)])  # a different mask for each model
    fused = check_fused(models, (seq_input(n, shared), pad), shared=shared)
    assert not fused.fusion_report.fallbacks
    assert fused.fusion_report.count("multihead_attention") == 1


class SelfAttentionOnInput(nn.Module):
    """MHA straight on the input (q = k = v = x; shared in the shared mode), 7 heads of size 1, eval mode."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(K, 7, batch_first=batch_first)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, w = self.mha(x, x, x)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, w


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seq_first"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_self_attention_on_input(train, batch_first, n, shared):
    models = [m.train(train) for m in make_models(lambda: SelfAttentionOnInput(batch_first), n)]
    fused_ok(models, seq_input(n, shared), shared, multihead_attention=1)


# ------------------------------------------------------------------------------------------------ SDPA


class SDPANet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lq, self.lk, self.lv = nn.Linear(K, E), nn.Linear(K, E), nn.Linear(K, E)
        self.float_mask = const_like((T, S), -2.0, 1.0)
        # True = allowed (SDPA's convention, the opposite of MultiheadAttention's)
        self.bool_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]).bool()
        self.rel_bias = nn.Parameter(torch.randn(H, T, S))  # a per-model attention bias
        self.mask4d = const_like((B, 1, T, S), -2.0, 2.0)  # per batch element, broadcast over heads
        self.lq7 = nn.Linear(K, K)

    def heads(self, t):
        return t.view(t.size(0), t.size(1), H, E // H).transpose(1, 2)  # [B, H, L, E/H]

    def forward(self, x):
        full = self.how == "causal"
        kv = x if full else x[:, 1:]
        q3, k3, v3 = self.lq(x), self.lk(kv), self.lv(kv)
        if self.how == "unbatched_3d":  # [B, L, E]: no head dim
            return F.scaled_dot_product_attention(q3, k3, v3)
        if self.how == "shared_kv":  # per-model queries, keys = values = the input (shared in the shared mode)
            return F.scaled_dot_product_attention(self.lq7(x), kv, kv)
        q, k, v = self.heads(q3), self.heads(k3), self.heads(v3)
        h = self.how
        if h == "plain":
            y = F.scaled_dot_product_attention(q, k, v)
        elif h == "float_mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.float_mask)
        elif h == "bool_mask":
            y = F.scaled_dot_product_attention(q, k, v, self.bool_mask)
        elif h == "per_model_mask":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_bias)
        elif h == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif h == "mask_4d_broadcast":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask4d)
        elif h == "scale":
            y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        else:
            raise AssertionError(h)
        return y.transpose(1, 2).reshape(y.size(0), -1, E)


SDPAS = ["plain", "float_mask", "bool_mask", "per_model_mask", "mask_4d_broadcast", "causal", "scale",
         "unbatched_3d", "shared_kv"]


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("how", SDPAS)
def test_sdpa(how, n, shared):
    models = make_models(lambda: SDPANet(how), n)
    fused_ok(models, seq_input(n, shared), shared, scaled_dot_product_attention=1,
             linear=4 if how == "shared_kv" else 3)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("how", ["plain", "per_model_mask", "causal"])
def test_sdpa_n8(how, shared):
    models = make_models(lambda: SDPANet(how), 8)
    fused_ok(models, seq_input(8, shared), shared, scaled_dot_product_attention=1, linear=3)


# ------------------------------------------------------------------------------------------------ tiny ViT


class TimmAttention(nn.Module):
    """timm's Attention: one qkv Linear, reshape/permute/unbind into heads, then matmul+softmax or SDPA."""

    def __init__(self, dim, heads, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class MHAWrap(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, dim, heads, attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MHAWrap(dim, heads) if attn == "mha" else TimmAttention(dim, heads, attn == "sdpa")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding conv, class token and position embedding (parameters used directly), 2 blocks, head."""

    def __init__(self, attn="mha", dim=8, heads=2, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)  # 8x12 image -> 2x3 = 6 patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 7, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads, attn) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, 6, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0]), x[:, 1:].mean(1)


VIT_COUNTS = {
    "mha": dict(multihead_attention=2, linear=2 * 2 + 1),
    "matmul": dict(matmul=2 * 2, linear=2 * 4 + 1),
    "sdpa": dict(scaled_dot_product_attention=2, linear=2 * 4 + 1),
}


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("attn", list(VIT_COUNTS))
def test_tiny_vit(attn, n, shared):
    models = make_models(lambda: TinyViT(attn), n)
    x = torch.randn(B, 3, 8, 12) if shared else torch.randn(n, B, 3, 8, 12)
    fused_ok(models, x, shared, conv2d=1, cat=1, layer_norm=5, **VIT_COUNTS[attn])


# ------------------------------------------------------------------------------------------------ independence


@pytest.mark.parametrize("attn", list(VIT_COUNTS))
def test_models_are_independent(attn):
    """Changing model j's weights (incl. its class token), or making its input NaN, leaves every other model's
    output bit-identical (attention over the wrong batch would mix models)."""
    n = 4
    models = make_models(lambda: TinyViT(attn), n)
    x = torch.randn(n, B, 3, 8, 12)
    fused = check_fused(models, (x,))

    def perturb(j):
        fused.cls_token[j].normal_()
        fused.pos_embed[j].mul_(-1)
        fused.head.bias[j].add_(1.0)

    assert_models_independent(fused, (x,), perturb, j=2)


# nn.TransformerEncoder / nn.TransformerEncoderLayer: traced through their slow path (fusecc/trace.py), so attention,
# linears, norms and dropout fuse by their rules; no fallback loop

def _encoder(norm_first=False, activation="relu", final_norm=False, batch_first=True):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if final_norm else None,
                                 enable_nested_tensor=False)


@pytest.mark.parametrize("norm_first,activation,final_norm", [(False, "relu", False), (True, "gelu", True)])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("n", [1, 3])
def test_transformer_encoder(norm_first, activation, final_norm, train, n):
    models = [m.train(train) for m in make_models(lambda: _encoder(norm_first, activation, final_norm), n)]
    fused = check_fused(models, (torch.randn(n, 2, 5, 16),))
    rep = fused.fusion_report
    assert not rep.fallbacks
    assert rep.count("multihead_attention") == 2 and rep.count("linear") == 4 and rep.count("layer_norm") >= 4


@pytest.mark.parametrize("shared", [False, True])
def test_transformer_encoder_layer_alone_with_padding_mask(shared):
    """The layer as the root module, not batch-first, with a key padding mask shared by the models."""
    n = 3
    models = make_models(lambda: nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0), n)
    x = torch.randn(5, 2, 16) if shared else torch.randn(n, 5, 2, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    fused = fusecc.fuse(models, shared_inputs=["src_key_padding_mask"] + (["src"] if shared else []))
    y = fused(x, src_key_padding_mask=kpm)
    ref = torch.stack([m(x if shared else x[i], src_key_padding_mask=kpm) for i, m in enumerate(models)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not fused.fusion_report.fallbacks
