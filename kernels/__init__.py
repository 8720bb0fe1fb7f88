"""Triton kernels and their launch helpers, one kernel family per file; no autograd and nothing from
``apa_fast`` here (``apa_fast`` holds the autograd Functions and picks these by explicit import)."""
