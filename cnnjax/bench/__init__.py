"""Benchmarks: timing of train steps and of the machine, the PyTorch reference, the harness."""
