"""Datasets, splits and augmentations for the semi-supervised benchmarks (CIFAR-10, SVHN, ImageNet)."""
