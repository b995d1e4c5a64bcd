"""Triton kernels, installed as ``zeromask.kernels`` (see setup.py's package_dir).

Importing this package does not import Triton; the kernel modules do.
"""
