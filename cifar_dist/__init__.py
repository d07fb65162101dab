"""Distributed fine-tuning of ImageNet ResNet50 on CIFAR-100 with Accelerate (see cifar_dist.train)."""

__version__ = "0.1.0"
