"""JAX vs PyTorch benchmarks: ``python -m benchmarks`` runs them side by side and writes the
tables into docs/benchmarks.md.

- ``steps``: train-step and inference throughput, memory of the step (jaxft against torch).
- ``report``: tables, the generated block of the doc, the ratio plot.
- ``common``: interleaved timing, machine and version description.
- ``end_to_end``: a whole fine-tuning run in each framework.

The standalone scripts beside them (``convert_forward.py``, ``data_pipeline.py``,
``strategies_vs_torch.py``) run as files and print their own tables.
"""
