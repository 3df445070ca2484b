"""The data commands as a user runs them: real processes, exit codes, one-line errors."""
import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, '-m', 'coop_perception.cli', *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_synth_info_plot(tmp_path):
    out = tmp_path / 'data'
    r = run('synth', '--out', out, '--scenes', 1, '--frames', 3, '--agents', 3, '--seed', 2)
    assert r.returncode == 0, r.stderr
    assert (out / 'v2.0-mini' / 'scene.json').exists()
    assert len(list((out / 'sweeps').glob('LIDAR_TOP_id_*/scene_0_*.pcd.bin'))) == 9
    r = run('info', out, '--json', tmp_path / 'info.json')
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / 'info.json').read_text())
    assert info['scenes'] == 1 and info['frames'] == 3 and info['agents'] == [0, 1, 2]
    assert 0.0 <= info['occluded_visible_to_collaborator'] <= 1.0
    assert info['points_per_scan']['min'] > 30000
    png = tmp_path / 'bev.png'
    r = run('plot', out, '--scene', 0, '--frame', 1, '--out', png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    r = run('synth', '--out', out, '--scenes', 1, '--frames', 1)
    assert r.returncode == 2 and 'already exists' in r.stderr


@pytest.mark.parametrize('case', ['missing_folder', 'unknown_version', 'truncated', 'dangling', 'bad_frame',
                                  'ambiguous_timestamps', 'two_versions'])
def test_user_errors_are_one_line(tiny_dataset, tmp_path, case):
    import shutil
    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    args = ['info', root]
    if case == 'missing_folder':
        args = ['info', tmp_path / 'missing']
    elif case == 'unknown_version':
        args = ['info', root, '--version', 'v9.9']
    elif case == 'truncated':
        f = sorted((root / 'sweeps').rglob('*.pcd.bin'))[0]
        f.write_bytes(f.read_bytes()[:-20])
        args = ['plot', root, '--out', tmp_path / 'x.png', '--frame', 0]
    elif case == 'dangling':
        p = root / 'v2.0-mini' / 'sample_annotation.json'
        rows = json.loads(p.read_text())
        rows[0]['instance_token'] = 'nothing'
        p.write_text(json.dumps(rows))
    elif case == 'bad_frame':
        args = ['plot', root, '--out', tmp_path / 'x.png', '--frame', 99]
    elif case == 'ambiguous_timestamps':  # 500 apart: neither microseconds nor frame counters
        p = root / 'v2.0-mini' / 'sample.json'
        rows = json.loads(p.read_text())
        for i, row in enumerate(rows):
            row['timestamp'] = 500 * i
        p.write_text(json.dumps(rows))
    elif case == 'two_versions':
        shutil.copytree(root / 'v2.0-mini', root / 'v2.0')
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert 'Traceback' not in r.stderr
    option = {'ambiguous_timestamps': '--frame-period', 'two_versions': '--version'}.get(case)
    assert option is None or option in lines[0], lines[0]
