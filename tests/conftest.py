"""Test-wide settings: poisoned kernel outputs, Triton's CPU interpreter where no GPU is."""
import os

# Kernel outputs are NaN-filled before launch so an unwritten element fails a comparison.
os.environ.setdefault("ZEROMASK_POISON", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. This must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
