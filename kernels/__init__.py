"""Triton kernels and their launchers (ships as ``fastft.kernels``). One file per op."""
