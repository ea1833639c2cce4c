"""Dynamic filter pruning under DistributedDataParallel, end to end, on synthetic data.

Launch with torchrun (CPU processes use gloo, GPUs nccl)::

    torchrun --nproc_per_node=2 -m fxprune.training.ddp_demo --steps 40 --out pruned.pt

Every rank trains its own shard of the data; DDP averages the gradients, the pruner keeps the
masks identical on every rank (computed from the synchronised weights, broadcast from rank 0),
and ``finalize()`` returns the same pruned GraphModule everywhere; rank 0 saves it. Without
torchrun it runs as a single process.

Example:
    >>> _ = main(["--steps", "4", "--every", "2"])  # doctest: +ELLIPSIS
    rank 0/1: pruned model ..., masks ..., MACs kept ..., verify True
"""
from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.training.dynamic import DynamicPruner


def small_cnn(classes: int = 4) -> nn.Module:
    """conv-bn-relu x2 with a residual add, pooled, then a linear head."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.c3, self.b3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, classes)

        def forward(self, x):
            x = F.relu(self.b1(self.c1(x)))
            x = F.relu(x + self.b2(self.c2(x)))
            x = F.relu(self.b3(self.c3(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return Net()


def _digest(pruned: torch.fx.GraphModule) -> str:
    h = hashlib.sha256()
    for name, t in sorted(pruned.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description="dynamic filter pruning under DDP (synthetic data)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--flops", type=float, default=0.5, help="fraction of MACs kept")
    ap.add_argument("--out", default=None, help="where rank 0 saves the pruned GraphModule")
    args = ap.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if distributed and torch.cuda.is_available()
                          else "cpu")
    torch.manual_seed(0)
    model = small_cnn().to(device)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    example = (torch.randn(2, 3, 16, 16, device=device),)
    pruner = DynamicPruner(trained, fxprune.Policy(flops=args.flops, scope="global"), example,
                           every=args.every, freeze_at=int(0.75 * args.steps), decorrelation=0.05)
    opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1000 + rank)          # each rank its own shard
    for _ in range(args.steps):
        x = torch.randn(16, 3, 16, 16, generator=data).to(device)
        y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(trained(x), y) + pruner.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    pruned = pruner.finalize()
    digest = _digest(pruned)
    masks = hashlib.sha256(b"".join(k.numpy().tobytes() for _, k in sorted(pruner.keep.items()))).hexdigest()[:12]
    print(f"rank {rank}/{world}: pruned model {digest}, masks {masks}, MACs kept {pruner.macs_kept():.3f}, "
          f"verify {fxprune.verify(pruned).ok}")
    if rank == 0 and args.out:
        torch.save(pruned, args.out)
    if distributed:
        dist.destroy_process_group()
    return digest


if __name__ == "__main__":
    main()
