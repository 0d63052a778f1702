"""vitscale: ViT and CLIP pre-training at supercomputer scale on DeepSpeed."""

__version__ = "0.1.0"
