"""Triton kernels and their launch helpers, one kernel family per file (no autograd here).

``kernels.<family>`` mirrors ``apa_fast._torch_<family>``: same functions, same signatures.
"""
