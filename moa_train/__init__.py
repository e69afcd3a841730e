"""moa-train: config-driven LLM pretraining for Mixture-of-Activations FFNs."""

__version__ = "0.1.0"
