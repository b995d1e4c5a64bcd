"""Test-wide settings: poisoned kernel outputs, Triton's CPU interpreter where no GPU is."""
import os
import sys

# The repository root is not an import path here: its Triton sources sit in kernels/
# (installed as zeromask.kernels), and with the root on sys.path (`python -m pytest` puts
# the working directory there) that folder shadows Hugging Face's `kernels` package, which
# transformers >= 5.25 imports. zeromask itself comes from its installed (editable) copy.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

# Kernel outputs are NaN-filled before launch so an unwritten element fails a comparison.
os.environ.setdefault("ZEROMASK_POISON", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. This must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
