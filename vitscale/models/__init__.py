"""Model zoo: plain single-device torch modules; no training, data or parallel code in the model classes.

``create_model("vit_base_patch16", img_size=224, num_classes=1000)`` builds a model;
``list_models("vit_*_patch16")`` lists the registered names; ``resolve_model`` turns the config's
model section into a ``ModelSpec`` (``spec.py``); ``parallelize.py`` splits a built model over a
layout. The registry itself lives in ``registry.py`` so that model modules can register without
importing this package.
"""
from vitscale.models.registry import create_model, list_models, model_kind, register_model
from vitscale.models import vit  # noqa: F401  (importing registers the ViT sizes)
from vitscale.models import clip  # noqa: F401  (importing registers the CLIP sizes)
from vitscale.models import cappa  # noqa: F401  (importing registers a CapPa per CLIP size)
from vitscale.models.spec import ModelSpec, resolve_model
from vitscale.models.vit import ViTConfig, VisionTransformer

__all__ = ["create_model", "list_models", "model_kind", "register_model", "resolve_model", "ModelSpec", "ViTConfig",
           "VisionTransformer"]
