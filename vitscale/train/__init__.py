"""Training: wires models, data and DeepSpeed together (``python -m vitscale.train CONFIG``)."""
