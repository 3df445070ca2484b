"""The one place that makes spconv 2.3.8 train on a CPU-only torch.

spconv's backward asks ``torch.cuda.current_stream()`` for a stream handle, which raises without
CUDA; its CPU kernels ignore the stream, so 0 (the default stream) is a correct answer there.
"""
from __future__ import annotations

import spconv.pytorch.ops as _ops
import torch


def patch_spconv_for_cpu() -> None:
    """Idempotent; leaves spconv untouched when CUDA is available."""
    if not torch.cuda.is_available():
        _ops.get_current_stream = _default_stream


def _default_stream() -> int:
    return 0
