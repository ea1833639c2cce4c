"""Two CPU processes (gloo) train under DistributedDataParallel with different data: masks,
gates and the pruned model must come out identical on both ranks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxprune
from fxprune.training import C2S2Pruner, DynamicPruner
from training_nets import batch, tiny_resnet

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_resnet(seed=rank)           # different initialisations: DDP syncs them
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        example = (batch(0, n=2)[0],)
        pruner = DynamicPruner(ddp, fxprune.Policy(flops=0.6, scope="global"), example, every=2,
                               freeze_at=6, decorrelation=0.01)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for step in range(8):
            x, y = batch(100 * rank + step)      # each rank sees its own data
            loss = F.cross_entropy(ddp(x), y) + pruner.regularizer()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
        # a data-dependent criterion gives each rank different scores: they are averaged
        scores = pruner.score(lambda g, ctx: torch.full((g.size,), float(rank)))
        averaged = all(torch.allclose(s, torch.full_like(s, 0.5)) for s in scores.values())
        pruned = pruner.finalize()
        with torch.no_grad():
            out = pruned.eval()(batch(7)[0])

        c2s2_model = tiny_resnet(seed=10 + rank)
        c2s2_ddp = torch.nn.parallel.DistributedDataParallel(c2s2_model)
        c2s2 = C2S2Pruner(c2s2_ddp, fxprune.Policy(flops=0.7, scope="global", normalize="none"), example,
                          lam=0.5, adjust_every=2, search_steps=4, finetune_steps=1)
        opt = torch.optim.SGD([*c2s2_ddp.parameters(), *c2s2.parameters()], lr=0.1)
        for step in range(5):
            x, y = batch(200 * rank + step)
            task = F.cross_entropy(c2s2_ddp(x), y)
            opt.zero_grad()
            (task + c2s2.regularizer()).backward()
            opt.step()
            c2s2.step(loss=task)
        c2s2_pruned = c2s2.finalize()
        torch.save({"keep": pruner.keep, "state": pruned.state_dict(), "out": out, "averaged": averaged,
                    "verify": fxprune.verify(pruned).ok, "c2s2_keep": c2s2.keep, "c2s2_lam": c2s2.lam,
                    "c2s2_state": c2s2_pruned.state_dict(), "c2s2_verify": fxprune.verify(c2s2_pruned).ok},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_end_with_the_same_masks_and_model(tmp_path):
    # torch.multiprocessing.spawn's machinery with a fork server that imports fxprune once, so two
    # fresh workers do not import torch and fxprune each (about 10 s on a busy machine); plain
    # "fork" is not allowed once this process has run autograd
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.set_forkserver_preload(["fxprune.training", "training_nets"])
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=method)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    first, second = results
    for r in results:
        assert r["averaged"] and r["verify"] and r["c2s2_verify"]
    assert first["keep"].keys() == second["keep"].keys()
    assert all(torch.equal(first["keep"][g], second["keep"][g]) for g in first["keep"])
    assert any(not bool(k.all()) for k in first["keep"].values())
    assert first["state"].keys() == second["state"].keys()
    assert all(torch.equal(first["state"][k], second["state"][k]) for k in first["state"])
    assert torch.equal(first["out"], second["out"])
    assert all(torch.equal(first["c2s2_keep"][g], second["c2s2_keep"][g]) for g in first["c2s2_keep"])
    assert first["c2s2_lam"] == second["c2s2_lam"]
    assert all(torch.equal(first["c2s2_state"][k], second["c2s2_state"][k]) for k in first["c2s2_state"])
