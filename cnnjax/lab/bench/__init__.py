"""Benchmarks: timing of train steps and of the machine, the PyTorch reference models, the harness of cases,
the input pipeline's rate, BatchNorm's float32 precision against float64, and the GPU check's support;
`scripts/` holds their entry points."""
