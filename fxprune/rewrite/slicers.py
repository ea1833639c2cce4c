"""Module hyper-parameters after slicing: one row per module type.

Each fixer reads the sliced tensors of a module and sets its size attributes so that the
module's ``extra_repr``, ``state_dict`` and scripting agree with its new shapes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor, copy: bool = True) -> None:
    """Replace a parameter, buffer or plain tensor attribute, keeping its kind
    (``copy=False`` when ``value`` is already a fresh tensor nobody else holds).

    Example:
        >>> m = nn.Linear(4, 2)
        >>> replace_tensor(m, "weight", m.weight[:, :3])
        >>> isinstance(m.weight, nn.Parameter), tuple(m.weight.shape)
        (True, (2, 3))
    """
    old = getattr(owner, name)
    value = value.detach().clone().contiguous() if copy else value.detach().contiguous()
    if isinstance(old, nn.Parameter):
        if owner._parameters.get(name) is old:  # what setattr would do, without its checks
            owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _conv(m: nn.Module, before: dict) -> None:
    w = m.weight
    depthwise = before["groups"] > 1 and before["groups"] == before["in_channels"]
    if m.transposed:
        m.in_channels = w.shape[0]
        if depthwise:
            m.groups = m.in_channels
        m.out_channels = w.shape[1] * m.groups
    else:
        m.out_channels = w.shape[0]
        if depthwise:
            mult = before["out_channels"] // before["in_channels"]
            m.groups = m.out_channels // mult
            m.in_channels = m.groups
        else:
            m.in_channels = w.shape[1] * m.groups


def _linear(m: nn.Module, before: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


def _batch_norm(m: nn.Module, before: dict) -> None:
    ref = m.running_mean if m.running_mean is not None else m.weight
    m.num_features = ref.shape[0]


def _width(m: nn.Module, before: dict, *names: str) -> int | None:
    """The kept channel count: from the first present tensor in ``names``, else the planned width."""
    for name in names:
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return before.get("kept")


def _instance_norm(m: nn.Module, before: dict) -> None:
    width = _width(m, before, "weight", "running_mean")
    if width is not None:
        m.num_features = width


def _group_norm(m: nn.Module, before: dict) -> None:
    width = _width(m, before, "weight", "bias")
    if width is None:
        return
    if before["num_groups"] > 1:
        m.num_groups = width // (before["num_channels"] // before["num_groups"])
    m.num_channels = width


def _layer_norm(m: nn.Module, before: dict) -> None:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor):
        m.normalized_shape = tuple(w.shape)
    elif "kept" in before:
        m.normalized_shape = tuple(before["normalized_shape"][:-1]) + (before["kept"],)


def _prelu(m: nn.Module, before: dict) -> None:
    m.num_parameters = m.weight.numel()


def _multihead_attention(m: nn.Module, before: dict) -> None:
    """Whole heads removed ("kept" = kept heads): head_dim stays. Per-head dims removed: num_heads
    stays and the kept query rows are scaled by sqrt(d'/d), so q.k / sqrt(d') equals the original
    q.k / sqrt(d) over the kept dims (removing dims is then exact, see ``attention_rules``)."""
    packed = m._qkv_same_embed_dim
    q_weight = m.in_proj_weight if packed else m.q_proj_weight
    width = q_weight.shape[0] // 3 if packed else q_weight.shape[0]
    old_head_dim = before["embed_dim"] // before["num_heads"]
    m.num_heads = before.get("kept", before["num_heads"])
    m.embed_dim, m.head_dim = width, width // m.num_heads
    m.kdim, m.vdim = (width, width) if packed else (m.k_proj_weight.shape[1], m.v_proj_weight.shape[1])
    if m.head_dim != old_head_dim:
        scale = (m.head_dim / old_head_dim) ** 0.5
        with torch.no_grad():
            q_weight[:width].mul_(scale)
            if m.in_proj_bias is not None:
                m.in_proj_bias[:width].mul_(scale)


def _rnn(m: nn.Module, before: dict) -> None:
    """LSTM/GRU/RNN: ``input_size`` follows ``weight_ih_l0``'s columns, and the cached flat weight
    list (read by forward and TorchScript) is rebuilt, since a replaced parameter bypasses the
    module's ``__setattr__`` that would update it."""
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


FIXERS: dict[type, Callable[[nn.Module, dict], None]] = {
    nn.MultiheadAttention: _multihead_attention,
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv, nn.ConvTranspose2d: _conv, nn.ConvTranspose3d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.InstanceNorm1d: _instance_norm, nn.InstanceNorm2d: _instance_norm, nn.InstanceNorm3d: _instance_norm,
    nn.GroupNorm: _group_norm, nn.LayerNorm: _layer_norm, nn.RMSNorm: _layer_norm, nn.PReLU: _prelu,
    nn.ChannelShuffle: lambda m, before: setattr(m, "groups", before.get("kept", m.groups)),
    nn.Embedding: lambda m, before: setattr(m, "embedding_dim", m.weight.shape[1]),
    nn.RNNBase: _rnn,  # nn.LSTM, nn.GRU, nn.RNN (found through the type's __mro__)
}

SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "num_channels", "num_groups", "num_parameters", "normalized_shape", "embed_dim", "num_heads")


def hyper_parameters(m: nn.Module) -> dict:
    """The size attributes a fixer may read as 'before' values."""
    state = m.__dict__  # size attributes are plain instance attributes (no Module.__getattr__)
    return {a: state[a] for a in SIZE_ATTRS if a in state}


def fix_module(m: nn.Module, before: dict) -> None:
    for cls in type(m).__mro__:
        if cls in FIXERS:
            FIXERS[cls](m, before)
            return


def register_fixer(module_type: type, fixer: Callable[[nn.Module, dict], None]) -> None:
    """Declare how a module type's size attributes follow its sliced tensors.

    Example:
        >>> register_fixer(nn.PReLU, lambda m, before: setattr(m, "num_parameters", m.weight.numel()))
    """
    FIXERS[module_type] = fixer
