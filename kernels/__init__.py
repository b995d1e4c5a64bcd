"""Triton kernels, installed as ``zeromask.kernels`` (see setup.py's package_dir).

Importing this package does not import Triton; the kernel modules do:

* :mod:`.rotary` - f0 rotary forward/backward (dtheta, dradius), both pairings;
* :mod:`.attention` - one-pass f0-rotary + zero-soft attention, forward and backward;
* :mod:`.common` - rotary tile loads and angles, the exp used by the softmax;
* :mod:`.autotune` - Ampere/Hopper configs pruned by head dim and shared memory;
* :mod:`.aot_check` - compile every kernel for sm80/sm90 without a GPU (ptxas).

:mod:`zeromask.backends.triton` puts them behind the kernel contract.
"""
