"""distill: DeiT-style distillation of CNN teachers into Vision Transformer students."""

__version__ = "0.2.0"  # 0.2: tensor data path resamples as Pillow does and is the default (data.store=auto)
