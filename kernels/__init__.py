"""Triton kernels of wmdp_fast (installed as wmdp_fast.kernels)."""
