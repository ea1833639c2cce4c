"""Real models from other libraries, built from their own configs with random weights.

Nothing is downloaded: timm models come from ``timm.create_model(pretrained=False)``, Hugging Face
models from small configs, Ultralytics YOLO from the YAMLs inside the package, and
segmentation_models_pytorch with ``encoder_weights=None``. The libraries are the ``zoo`` extra
(``pip install fxprune[zoo]``). Each builder returns ``(model, example_inputs)`` with the model in
eval mode.

Example:
    >>> model, inputs = build("timm", "resnet18")  # doctest: +SKIP
    >>> model(*inputs).shape  # doctest: +SKIP
    torch.Size([1, 1000])
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch

LIBRARIES = ("timm", "transformers", "ultralytics", "smp")


# --- Hugging Face transformers: the twelve families, tiny configs -------------------------------

def _tiny_text(cfg_cls, **over):
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)
    base.update(over)
    return cfg_cls(**base)


def _hf_configs() -> dict[str, Callable]:
    import transformers as tr
    return {
        "bert": lambda: (tr.BertModel, _tiny_text(tr.BertConfig), "text"),
        "distilbert": lambda: (tr.DistilBertModel, tr.DistilBertConfig(
            vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64), "text"),
        "roberta": lambda: (tr.RobertaModel, _tiny_text(tr.RobertaConfig, pad_token_id=1), "text"),
        "gpt2": lambda: (tr.GPT2LMHeadModel, tr.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False), "text"),
        "t5": lambda: (tr.T5Model, tr.T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False), "seq2seq"),
        "vit": lambda: (tr.ViTModel, tr.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8), "image32"),
        "swin": lambda: (tr.SwinModel, tr.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4), "image32"),
        "convnext": lambda: (tr.ConvNextModel, tr.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "image32"),
        "whisper": lambda: (tr.WhisperModel, tr.WhisperConfig(
            vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=16, max_target_positions=16, use_cache=False, pad_token_id=1, bos_token_id=2,
            eos_token_id=2, decoder_start_token_id=2, suppress_tokens=None, begin_suppress_tokens=None), "audio"),
        "llama": lambda: (tr.LlamaForCausalLM, _tiny_text(
            tr.LlamaConfig, num_key_value_heads=2, use_cache=False), "text"),
        "mistral": lambda: (tr.MistralForCausalLM, _tiny_text(
            tr.MistralConfig, num_key_value_heads=2, use_cache=False, sliding_window=None), "text"),
        "qwen2": lambda: (tr.Qwen2ForCausalLM, _tiny_text(
            tr.Qwen2Config, num_key_value_heads=2, use_cache=False), "text"),
    }


TRANSFORMERS = ("bert", "distilbert", "roberta", "gpt2", "t5", "vit", "swin", "convnext", "whisper",
                "llama", "mistral", "qwen2")


def _hf_inputs(kind: str, config) -> tuple:
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        return (torch.randint(3, config.vocab_size, (2, 8), generator=g),)
    if kind == "seq2seq":
        ids = torch.randint(3, config.vocab_size, (2, 8), generator=g)
        return (ids, torch.ones_like(ids), ids[:, :4].contiguous())  # input_ids, attention_mask, decoder ids
    if kind == "image32":
        return (torch.randn(2, 3, 32, 32, generator=g),)
    if kind == "audio":  # input_features (batch, mel bins, 2 * max_source_positions), mask, decoder ids
        frames = 2 * config.max_source_positions
        return (torch.randn(2, config.num_mel_bins, frames, generator=g), torch.ones(2, frames, dtype=torch.long),
                torch.randint(3, config.vocab_size, (2, 4), generator=g))
    raise ValueError(kind)


def transformers_model(name: str) -> tuple[torch.nn.Module, tuple]:
    """One of ``TRANSFORMERS`` from a tiny config (2 layers, width 64), random weights, eval mode.

    Example:
        >>> model, inputs = transformers_model("bert")  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'BertModel'
    """
    configs = _hf_configs()
    if name not in configs:
        raise KeyError(f"unknown transformers model {name!r}; choose from {', '.join(TRANSFORMERS)}")
    cls, config, kind = configs[name]()
    torch.manual_seed(0)
    model = cls(config).eval()
    return model, _hf_inputs(kind, config)


# --- Ultralytics YOLO: from the YAMLs inside the package ---------------------------------------

ULTRALYTICS = ("yolov8n", "yolo11n", "yolov8n-seg")


def ultralytics_model(name: str, side: int = 64) -> tuple[torch.nn.Module, tuple]:
    """The ``nn.Module`` of an Ultralytics YOLO built from its YAML (``yolov8n.yaml``), random
    weights, eval mode, fused nothing; inputs ``(1, 3, side, side)``.

    Example:
        >>> model, inputs = ultralytics_model("yolov8n")  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'DetectionModel'
    """
    if name not in ULTRALYTICS:
        raise KeyError(f"unknown ultralytics model {name!r}; choose from {', '.join(ULTRALYTICS)}")
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel
    torch.manual_seed(0)
    cls = SegmentationModel if name.endswith("-seg") else DetectionModel
    with contextlib.redirect_stdout(io.StringIO()):
        model = cls(f"{name}.yaml", verbose=False).eval()
    return model, (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)),)


# --- segmentation_models_pytorch -----------------------------------------------------------------

SMP = ("Unet", "FPN", "DeepLabV3Plus")


def smp_model(name: str, side: int = 64) -> tuple[torch.nn.Module, tuple]:
    """A segmentation_models_pytorch architecture with a resnet18 encoder, ``encoder_weights=None``.

    Example:
        >>> model, inputs = smp_model("Unet")  # doctest: +SKIP
        >>> model(*inputs).shape  # doctest: +SKIP
        torch.Size([1, 1, 64, 64])
    """
    import segmentation_models_pytorch as smp
    if name not in SMP:
        raise KeyError(f"unknown smp model {name!r}; choose from {', '.join(SMP)}")
    torch.manual_seed(0)
    model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=1).eval()
    return model, (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)),)


# --- timm: one model per family ------------------------------------------------------------------

def timm_families() -> dict[str, str]:
    """``{family (timm module): smallest model}``, smallest by parameter count of its default config.

    Example:
        >>> families = timm_families()  # doctest: +SKIP
        >>> families["resnet"]  # doctest: +SKIP
        'resnet10t'
    """
    import timm
    out = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            out[module] = min(names, key=lambda n: (_timm_size(n), n))
    return out


def _timm_size(name: str) -> int:
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a model that does not build ranks last
        return 1 << 62


def timm_model(name: str) -> tuple[torch.nn.Module, tuple]:
    """A timm model, random weights, eval mode, at its default input size (batch 1).

    Example:
        >>> model, inputs = timm_model("resnet18")  # doctest: +SKIP
        >>> inputs[0].shape  # doctest: +SKIP
        torch.Size([1, 3, 224, 224])
    """
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)),)


BUILDERS = {"timm": timm_model, "transformers": transformers_model, "ultralytics": ultralytics_model,
            "smp": smp_model}


def build(library: str, name: str) -> tuple[torch.nn.Module, tuple]:
    """``(model, example_inputs)`` of ``name`` from ``library`` (one of ``LIBRARIES``).

    Example:
        >>> model, inputs = build("smp", "FPN")  # doctest: +SKIP
    """
    if library not in BUILDERS:
        raise KeyError(f"unknown library {library!r}; choose from {', '.join(LIBRARIES)}")
    return BUILDERS[library](name)


__all__ = ["LIBRARIES", "SMP", "TRANSFORMERS", "ULTRALYTICS", "build", "smp_model", "timm_families",
           "timm_model", "transformers_model", "ultralytics_model"]
