"""Where the networks run: ``--device auto|cpu|cuda[:N]`` of the commands and the nodes' ``device``
parameter. The CPU is the default and what the tests run; a GPU needs torch and spconv built for
CUDA (README). Arrays in and out of the networks stay numpy on the host either way.
"""
from __future__ import annotations

from .errors import UserError

DEVICE_CHOICES = 'auto, cpu, cuda or cuda:N'
DEVICE_HELP = f'where the networks run: {DEVICE_CHOICES} (auto: a CUDA GPU when torch sees one, else the CPU)'


def resolve_device(name: str, where: str = '--device'):
    """``name`` -> torch.device; a UserError naming ``where`` for an unknown device or a GPU that
    torch cannot use here."""
    import torch

    text = str(name).strip().lower()
    if text == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(where, f'unknown device {name!r}: use {DEVICE_CHOICES}')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(where, f'{name!r} asked for, but this torch sees no CUDA GPU (a CPU-only build, or no '
                                   'driver): install the CUDA builds of torch and spconv (README) or use cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(where, f'{name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)')
    return device
