"""What fxprune promises not to change about a model, as a snapshot to compare."""
import torch


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a model that fxprune promises not to change."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "modules": [(n, type(m), repr(m)) for n, m in model.named_modules()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"


def output_shapes(out):
    """The structure of a model output with every tensor replaced by its shape."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: output_shapes(v) for k, v in out.items()}
    return tuple(output_shapes(v) for v in out) if isinstance(out, (tuple, list)) else out
