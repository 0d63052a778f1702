"""Console scripts (``vitscale-synth``, ...): thin argument parsing over the library."""
