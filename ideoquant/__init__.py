"""ideoquant: offline converter from Ideogram 4 weights to INT8 W8A8, GGUF and NF4 checkpoints."""

__version__ = "0.1.0"
