"""Loaded by pytest before any test module of tests/ or bench/ is imported.

Without a CUDA device the Triton kernels run on CPU tensors under the interpreter, and triton
reads TRITON_INTERPRET once, when it is first imported: its own library functions (tl.zeros and
the like) are compiled or interpreted from then on. Other packages import triton as a side effect
(diffusers does, at import), so the variable is set here, before any of them, rather than next to
the kernel tests. A TRITON_INTERPRET already set is kept (=0 on a CPU machine makes the Triton
cases skip)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
