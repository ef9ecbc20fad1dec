"""mambapeft: parameter-efficient fine-tuning of Mamba, reproducibly."""

__version__ = "0.1.0"
