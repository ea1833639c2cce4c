"""Small nets for the training-time pruning tests (fast on one CPU thread)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """stem 8 -> block 8 (identity shortcut) -> block 16 (projection) -> pool -> fc."""

    def __init__(self, classes: int = 4, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


def batch(seed: int = 0, n: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_steps(model, pruner, steps: int, lr: float = 0.05, seed: int = 0, extra_params=(), task_loss=False):
    """A plain loop: CE + pruner.regularizer(), optimizer step, pruner.step()."""
    opt = torch.optim.SGD([*model.parameters(), *extra_params], lr=lr, momentum=0.9)
    for i in range(steps):
        x, y = batch(seed + i)
        task = F.cross_entropy(model(x), y)
        loss = task + pruner.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if task_loss:
            pruner.step(loss=task)
        else:
            pruner.step()
    return opt


def hook_count(model: nn.Module) -> int:
    """Forward hooks, pre-hooks and parametrizations left on a model."""
    from torch.nn.utils import parametrize
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += int(parametrize.is_parametrized(m))
    return n
