"""distill: DeiT-style distillation of CNN teachers into Vision Transformer students."""

__version__ = "0.3.0"  # trained-teacher and teacher-output caches key on it
