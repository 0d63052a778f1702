"""Model zoo: plain single-device torch modules; no training, data or distributed code.

``create_model("vit_base_patch16", img_size=224, num_classes=1000)``; ``list_models()``.
"""
from vitscale.models.registry import create_model, list_models, register_model
from vitscale.models import vit  # noqa: F401  (registers the ViT sizes)

__all__ = ["create_model", "list_models", "register_model"]
