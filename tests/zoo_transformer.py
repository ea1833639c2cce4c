"""Small transformer nets, one per attention pattern, with example inputs (float64 in tests)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MHANet(nn.Module):
    """Linear -> nn.MultiheadAttention (leaf) -> Linear: heads tied to the embedding it reads."""

    def __init__(self, batch_first: bool = True, add_bias_kv: bool = False, need_weights: bool = False):
        super().__init__()
        self.need_weights = need_weights
        self.inp = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, add_bias_kv=add_bias_kv)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.mha(h, h, h, need_weights=self.need_weights)
        return self.out(a + h)


class CrossAttention(nn.Module):
    """Separate key/value widths (kdim, vdim): their input spaces stay apart from the heads."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 7)
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x, y):
        a, _ = self.mha(self.q(x), F.gelu(self.k(y)), torch.tanh(self.v(y)), need_weights=False)
        return self.out(a)


class WeightsUsed(MHANet):
    """The averaged attention weights are an output: heads cannot go."""

    def forward(self, x):
        h = self.inp(x)
        a, w = self.mha(h, h, h)
        return self.out(a), w


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm -> attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 24):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """torchvision ViT in miniature: patch conv, class token (expand + cat on the sequence dim),
    position embedding, pre-norm blocks, ``x[:, 0]`` into the head."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.conv_proj = nn.Conv2d(3, dim, 4, 4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embedding = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.blocks(x + self.pos_embedding))
        return self.head(x[:, 0])


class WindowAttention(nn.Module):
    """MaxViT-style attention: one qkv Linear, chunk, heads split by reshape, einsum, a relative
    position bias gathered from a per-head table, and an output reshape whose width is read off
    the input (``D = x.shape[-1]``)."""

    def __init__(self, dim: int = 12, head_dim: int = 3, tokens: int = 4):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.to_qkv, self.merge = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(7, self.heads) * 0.1)
        self.register_buffer("index", torch.randint(0, 7, (tokens * tokens,)))
        self.tokens = tokens

    def forward(self, x):
        B, G, P, D = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(B, G, P, self.heads, self.head_dim).permute(0, 1, 3, 2, 4)
        k = k.reshape(B, G, P, self.heads, self.head_dim).permute(0, 1, 3, 2, 4)
        v = v.reshape(B, G, P, self.heads, self.head_dim).permute(0, 1, 3, 2, 4)
        k = k * self.head_dim ** -0.5
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        bias = self.table[self.index.view(-1)].view(self.tokens, self.tokens, -1).permute(2, 0, 1).unsqueeze(0)
        attn = F.softmax(dot + bias, dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", attn, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, D))


class WindowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(5, 12), WindowAttention(), nn.Linear(12, 2)

    def forward(self, x):
        return self.out(F.gelu(self.attn(self.inp(x))))


class TimmAttention(nn.Module):
    """timm-style attention: ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``,
    ``q @ k.transpose(-2, -1)`` or ``F.scaled_dot_product_attention``, output ``reshape(B, N, C)``."""

    def __init__(self, dim: int = 12, heads: int = 3, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.inp, self.qkv, self.proj = nn.Linear(4, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 2)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) * 0.5).softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


def _seq(n: int = 5, c: int = 6):
    return (torch.randn(2, n, c),)


ZOO = {
    "mha": (MHANet, _seq),
    "mha_seq_first": (lambda: MHANet(batch_first=False), lambda: (torch.randn(5, 2, 6),)),
    "mha_bias_kv": (lambda: MHANet(add_bias_kv=True), _seq),
    "mha_weights_unused": (lambda: MHANet(need_weights=True), _seq),
    "cross_attention": (CrossAttention, lambda: (torch.randn(2, 4, 5), torch.randn(2, 6, 5))),
    "window_attention": (WindowNet, lambda: (torch.randn(2, 3, 4, 5),)),
    "timm_attention": (TimmAttention, lambda: _seq(c=4)),
    "timm_sdpa": (lambda: TimmAttention(fused=True), lambda: _seq(c=4)),
}


def build(name: str, dtype=torch.float64, seed: int = 0):
    """A net of this zoo (or TinyViT / WeightsUsed by name) and its inputs, in ``dtype``."""
    torch.manual_seed(seed)
    extra = {"tiny_vit": (TinyViT, lambda: (torch.randn(2, 3, 8, 8),)), "weights_used": (WeightsUsed, _seq)}
    make, inputs = {**ZOO, **extra}[name]
    model = make().to(dtype).eval()
    return model, tuple(t.to(dtype) for t in inputs())
