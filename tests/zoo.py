"""Small hand-written nets, one per coupling kind, with example inputs (float64 in tests)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin: int, cout: int, k: int = 3, bias: bool = False, dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(cin, cout, k, padding=k // 2, bias=bias), bn(cout), nn.ReLU())


class ConvChain(nn.Module):
    def __init__(self, dims: int = 2):
        super().__init__()
        self.a = cbr(3, 8, bias=True, dims=dims)
        self.b = cbr(8, 12, bias=False, dims=dims)
        self.head = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](12, 4, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class TransposeDecoder(nn.Module):
    def __init__(self, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        self.enc = conv(3, 10, 3, stride=2, padding=1)
        self.up = convt(10, 8, 2, stride=2)
        self.up2 = convt(8, 6, 3, padding=1, bias=False)
        self.out = conv(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up2(F.relu(self.up(torch.tanh(self.enc(x)))))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


class Activations(nn.Module):
    """Every activation and elementwise arithmetic form, in-place ones included."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.acts = nn.ModuleList([nn.ReLU6(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.Tanh()])
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.c1(x)
        for act in self.acts:
            a = act(a)
        b = F.relu6(self.c2(a)) + F.silu(a) - torch.sigmoid(a) * torch.tanh(a)
        b = F.hardswish(b) / 2.0 + F.hardsigmoid(b) + F.gelu(b) - F.relu(b, inplace=False)
        c = self.c3(b)
        c += b
        c = c.add_(a)
        c = torch.add(c, b, alpha=0.5)
        c = torch.sub(c, a) * torch.mul(b, 0.5)
        c = torch.div(c, 3.0).relu_()
        c = c.sigmoid() * c.tanh()
        c = c.relu()
        return self.head(c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.l1, self.l2, self.l3 = BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.l3(self.l2(self.l1(self.stem(x))))), 1))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.lin1, self.lin2 = nn.Linear(16, 6), nn.Linear(6, 16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        t = torch.sigmoid(self.lin2(F.relu(self.lin1(x.mean((2, 3))))))
        x = x * t[:, :, None, None]
        return self.head(x)


class PoolingResize(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.mp, self.ap, self.drop, self.idn = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Dropout(0.3), nn.Identity()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.idn(self.drop(self.mp(self.c1(x))))
        x = F.interpolate(self.c2(x), scale_factor=2, mode="bilinear", align_corners=False)
        x = self.up(self.ap(F.max_pool2d(x, 2)))
        x = F.avg_pool2d(self.c3(x), 2)
        x = F.adaptive_max_pool2d(x, 3) + F.adaptive_avg_pool2d(x, 3)
        return self.head(F.dropout(x, 0.1, training=self.training))


class Concat(nn.Module):
    """Channel concat (dense-style, offset map) and concat along a spatial dim (identity)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(11, 7, 3, padding=1)
        self.d, self.e = nn.Conv2d(18, 8, 1), nn.Conv2d(18, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        ab = torch.cat([a, b], dim=1)
        c = self.c(F.relu(ab))
        abc = torch.cat((ab, c), 1)
        spatial = torch.cat([self.d(abc), self.e(abc)], dim=2)
        return self.head(F.relu(self.bn(spatial)))


class FlattenHeads(nn.Module):
    """flatten -> Linear in every spelling; the stride map keeps H*W columns per channel."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Conv2d(6, 4, 1)
        self.c4 = nn.Conv2d(6, 3, 1)
        self.fc1, self.fc2 = nn.Linear(5 * 4 * 4, 7), nn.Linear(4 * 8 * 8, 7)
        self.fc3, self.fc4 = nn.Linear(6 * 8 * 8, 7), nn.Linear(3 * 8 * 8, 7)
        self.flat = nn.Flatten()

    def forward(self, x):
        h = F.relu(self.c1(x))
        a = self.fc1(torch.flatten(F.relu(self.c2(h)), 1))
        b = self.fc2(self.c3(h).flatten(1))
        c = self.fc3(h.view(h.size(0), -1))
        d = self.fc4(self.c4(h).reshape(x.shape[0], -1))
        e = self.fc4(self.flat(self.c4(h)))
        return a + b + c + d + e


class LiteralView(nn.Module):
    """A view with the literal flattened width, rewritten by the pass."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).view(-1, 128))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.pw2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu6(self.bn1(self.pw1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.pw2(F.relu(self.dw2(x)))


class Functional(nn.Module):
    """F.conv2d / F.linear on parameters fetched with get_attr, plus a per-channel parameter."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1) * 0.3)
        self.lw = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.lb = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)) * self.scale
        x = F.conv2d(x, self.w2)
        return F.linear(x.mean((2, 3)), self.lw, self.lb)


class Shared(nn.Module):
    """One module called at several places: its channel spaces merge."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.shared(F.relu(self.a(x)))) + F.relu(self.shared(torch.tanh(self.b(x)))))


class MultiOutput(nn.Module):
    """Tuple and dict outputs: channels that reach an output are kept."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return {"feat": b, "logits": (self.c(b), torch.flatten(F.adaptive_avg_pool2d(a, 1), 1).sum(1))}


class SplitChunk(nn.Module):
    """split/chunk on the channel dim, pieces concatenated in another order."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(12, 10, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [6, 6], dim=1)
        y = torch.cat([self.b(q), p], 1)
        u, v = self.c(y).chunk(2, dim=1)
        return self.head(F.relu(u) * torch.sigmoid(v))


def _img(c=3, s=8):
    return (torch.randn(2, c, s, s),)


ZOO = {
    "conv_chain_2d": (lambda: ConvChain(2), _img),
    "conv_chain_1d": (lambda: ConvChain(1), lambda: (torch.randn(2, 3, 16),)),
    "conv_chain_3d": (lambda: ConvChain(3), lambda: (torch.randn(2, 3, 6, 6, 6),)),
    "transpose_1d": (lambda: TransposeDecoder(1), lambda: (torch.randn(2, 3, 16),)),
    "transpose_2d": (lambda: TransposeDecoder(2), _img),
    "transpose_3d": (lambda: TransposeDecoder(3), lambda: (torch.randn(2, 3, 4, 4, 4),)),
    "mlp": (MLP, lambda: (torch.randn(4, 10),)),
    "activations": (Activations, _img),
    "residual": (ResidualNet, _img),
    "squeeze_excite": (SqueezeExcite, _img),
    "pooling_resize": (PoolingResize, _img),
    "concat": (Concat, _img),
    "flatten_heads": (FlattenHeads, _img),
    "literal_view": (LiteralView, lambda: _img(s=4)),
    "depthwise": (Depthwise, _img),
    "functional": (Functional, _img),
    "shared": (Shared, _img),
    "multi_output": (MultiOutput, _img),
    "split_chunk": (SplitChunk, _img),
}


def build(name: str, dtype=torch.float64, seed: int = 0):
    """A zoo model with randomised BN statistics (so norms are not identities) and its inputs."""
    torch.manual_seed(seed)
    make, inputs = ZOO[name]
    model = make()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = model.to(dtype).eval()
    return model, tuple(t.to(dtype) for t in inputs())
