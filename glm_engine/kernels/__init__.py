"""Kernels ("plugins"). `reference` holds the plain-PyTorch versions that run on
CPU and GPU and that every fused kernel is checked against."""
