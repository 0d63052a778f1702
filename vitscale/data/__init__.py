"""Data pipelines: synthetic formula-driven images and (later) image-text shards.

Nothing here imports from ``vitscale.models`` or ``vitscale.train``.
"""
