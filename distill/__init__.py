"""distill: DeiT-style distillation of CNN teachers into Vision Transformer students."""

__version__ = "0.2.0"
