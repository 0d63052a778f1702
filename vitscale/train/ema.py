"""An exponential moving average of the weights (``train.ema``): timm's ``ModelEmaV3``, updated after
each optimizer step, evaluated beside the model on ``data.test``, and kept in checkpoints so that
a resumed run continues the same average."""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def build_ema(model: nn.Module, decay: float):
    """timm's ``ModelEmaV3`` of ``model`` (a whole, unsharded model), updated after each step."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def ema_state(ema) -> dict[str, torch.Tensor]:
    """The EMA's tensors on the CPU, for a checkpoint's client state (every rank holds the same whole
    EMA: ``train.ema`` needs pipe = tensor = 1 and ZeRO < 3)."""
    return {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}


def restore_ema(ema, client: dict, step: int, is_main: bool) -> None:
    """Continue the EMA a resumed checkpoint (``client`` state, of ``step``) holds; without one
    (``train.ema`` was off, or the checkpoint was resharded) it starts again from the resumed weights."""
    if "ema" in client:
        ema.module.load_state_dict(client["ema"])
    elif is_main:
        logger.warning("the checkpoint of step %d holds no EMA (train.ema was off, or resharded): the EMA "
                       "starts again from the resumed weights", step)
