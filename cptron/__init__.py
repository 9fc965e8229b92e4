"""cptron: continual pretraining of Llama-family models."""

__version__ = "0.1.0"
