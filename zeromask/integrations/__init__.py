"""Bridges to other libraries; each is an optional extra and is imported on its own:

* :mod:`zeromask.integrations.transformers`: ``attn_implementation="zeromask"`` for Hugging
  Face transformers models (``pip install zeromask[hf]``).
"""
