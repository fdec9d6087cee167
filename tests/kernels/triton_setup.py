"""Where the Triton tests run: on the GPU when there is one, else on CPU tensors under the interpreter.

Import this before anything imports triton's kernels: `TRITON_INTERPRET` is read when a kernel is
decorated. Modules using it skip when triton is not installed (`make test` installs it).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
