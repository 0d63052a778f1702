"""The speed choices in force for this run, as one start-up log line (issue 21): the attention
kernels scaled_dot_product_attention may pick, the optimizer kernel, precision and master weights,
torch.compile, the image memory format, pinned host memory, and ZeRO's communication settings.

Everything is read from what was built (the engine, its optimizer, the composed DeepSpeed config,
torch's backend switches), not from what the config asked for, so the line shows what runs. The
config keys behind each: attention (none: torch picks among the enabled SDPA kernels, flash first),
``optim.torch_adam`` (DeepSpeed's fused Adam kernel, or torch's AdamW, fused on CUDA), ``train.precision``
(bf16 weights and activations, fp32 master weights under ZeRO >= 1), ``train.compile`` /
``train.compile_backend``, ``train.channels_last``, pinned memory (on whenever the device is CUDA),
``parallel.ds_preset`` (ZeRO's ``overlap_comm``, ``contiguous_gradients``, bucket sizes)."""
from __future__ import annotations

import torch

from vitscale.config.deepspeed import zero_settings


def attention_kernels(device: torch.device) -> str:
    """The SDPA kernels torch may choose from on ``device`` (in its order of preference)."""
    if device.type != "cuda":
        return "SDPA (CPU: torch's fused flash kernel, math as fallback)"
    b = torch.backends.cuda
    kernels = [name for name, on in (("flash", b.flash_sdp_enabled() and b.is_flash_attention_available()),
                                     ("cudnn", b.cudnn_sdp_enabled()),
                                     ("memory-efficient", b.mem_efficient_sdp_enabled()),
                                     ("math", b.math_sdp_enabled())) if on]
    return f"SDPA ({', '.join(kernels) or 'none enabled'})"


def optimizer_kernel(engine) -> str:
    """The update kernel under DeepSpeed's wrapper: DeepSpeed's FusedAdam / CPU Adam, or torch's
    AdamW (fused, foreach or per tensor)."""
    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    name = type(basic).__name__
    defaults = getattr(basic, "defaults", {})
    if isinstance(basic, torch.optim.Optimizer) and type(basic).__module__.startswith("torch."):
        mode = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "torch's default: foreach on CUDA"
        return f"torch {name} ({mode})"
    return name


def describe(cfg, engine, ds_config: dict, dims, precision: dict, channels_last: bool) -> str:
    """The one line (``precision``: ``engine.precision_in_use``)."""
    t = cfg.train
    zero = zero_settings(ds_config)
    stage = zero.pop("stage")
    zero_text = f"ZeRO-{stage}"
    if stage > 0:
        knobs = ", ".join(f"{key} {value}" for key, value in zero.items()) or "DeepSpeed's defaults"
        zero_text += f" ({knobs}; preset {cfg.parallel.ds_preset})"
    cuda, kernel = dims.device.type == "cuda", optimizer_kernel(engine)
    return "; ".join([
        f"attention {attention_kernels(dims.device)}",
        f"optimizer {kernel}" + (f" in {precision['optimizer']}" if precision["optimizer"] not in kernel else ""),
        f"{t.precision} weights, {precision['master_weights']} master weights",
        f"torch.compile {t.compile_backend + ' per block' if t.compile else 'off'}",
        f"channels_last {'on' if channels_last else 'off'} (train.channels_last={t.channels_last})",
        f"pinned host memory {'on' if cuda else 'off'} ({dims.device.type})",
        zero_text,
    ])
