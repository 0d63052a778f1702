"""Data: synthetic formula-driven images, image-caption pairs, img2dataset image-text shards and
fine-tuning sets, each read by a registered data source (``sources.py``) into typed batches.

Nothing here imports from ``vitscale.models`` or ``vitscale.train``.
"""
