"""--device / the nodes' device parameter: resolution and clear errors (the CPU is what runs here)."""
import subprocess
import sys

import pytest
import torch

from coop_perception.errors import UserError
from coop_perception.torch_device import resolve_device


def test_cpu_and_auto():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device(' CPU ') == torch.device('cpu')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')


@pytest.mark.parametrize('name', ['tpu', 'gpu', 'cuda:x', ''])
def test_unknown_devices_are_a_user_error(name):
    with pytest.raises(UserError, match='--device'):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA GPU')
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    with pytest.raises(UserError, match='no CUDA GPU'):
        resolve_device('cuda')
    run = subprocess.run([sys.executable, '-m', 'coop_perception.cli', 'bench', 'detector', '--scans', '1',
                          '--device', 'cuda'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().count('\n') == 0 and 'no CUDA GPU' in run.stderr, run.stderr
