"""kdcompress: attention-based feature distillation to verified, deployable students."""

__version__ = "0.1.0"
