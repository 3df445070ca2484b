"""Every command on a bad path, an unwritable output or garbage data: one `error: <file>: <problem>`
line on stderr, exit code 2, never a traceback (as a user runs them: real processes)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from coop_perception import cli

ROS_ENV = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOCALHOST_ONLY': '1', 'ROS_DOMAIN_ID': '71'}
GARBAGE = b'\xff\xfe\x00 not utf-8 \x80\x81'


def run(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'coop_perception.cli', *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**os.environ, **ROS_ENV})


def assert_one_line(r, *words):
    """Exit code 2 and stderr exactly one `error:` line holding every one of ``words``."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert 'Traceback' not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def ds(tiny_dataset, tmp_path):
    """A copy of the tiny dataset to damage: (root, its LiDAR files sorted)."""
    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    return root, sorted((root / 'sweeps').rglob('*.pcd.bin'))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('I am a file\n')
    return path


def _table(root, name):
    return root / 'v2.0-mini' / f'{name}.json'


def _edit_rows(root, name, edit):
    path = _table(root, name)
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


# ------------------------------------------------------------------ info checks every scan file
@pytest.mark.parametrize('damage, problems', [
    (lambda f: f.write_bytes(f.read_bytes()[:-20]), ['sample_data row says']),   # one point short
    (lambda f: f.write_bytes(f.read_bytes()[:-2]), ['not a whole number of float32']),
    (lambda f: f.unlink(), ['missing']),
    # 4/5 of a 5-column file: as many floats as the row's points in 4 columns
    (lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 5 * 4]), ['sample_data row says', 'damaged']),
], ids=['point_short', 'odd_bytes', 'missing', 'four_fifths'])
# the first file, and one of the middle sample, which opening the dataset reads
@pytest.mark.parametrize('which', [0, 1], ids=['first', 'opened'])
def test_info_names_a_bad_scan(ds, damage, problems, which):
    root, files = ds
    bad = files[which] if which == 0 else next(f for f in files if f.name.endswith('_000002.pcd.bin'))
    damage(bad)
    line = assert_one_line(run('info', root), bad)
    assert any(problem in line for problem in problems), line


def test_info_names_every_bad_scan(ds):
    root, files = ds
    for f in files[:2]:
        f.write_bytes(f.read_bytes()[:-40])
    files[-1].unlink()
    line = assert_one_line(run('info', root), f'3 of {len(files)} LiDAR files are bad', *files[:2], files[-1])
    assert line.count('sample_data row says') == 2


def test_info_still_passes_a_sound_dataset(ds, tmp_path):
    r = run('info', ds[0], '--json', tmp_path / 'info.json')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / 'info.json').read_text())['frames'] == 4


# ------------------------------------------------------------------ garbage tables
@pytest.mark.parametrize('command', ['info', 'plot', 'to-bag'])
def test_a_table_that_is_not_utf8(ds, tmp_path, command):
    root = ds[0]
    _table(root, 'sample_data').write_bytes(GARBAGE)
    extra = {'plot': ['--out', tmp_path / 'x.png'], 'to-bag': ['--out', tmp_path / 'bag']}.get(command, [])
    assert_one_line(run(command, root, *extra), _table(root, 'sample_data'), 'not UTF-8')
    assert not (tmp_path / 'bag').exists()


@pytest.mark.parametrize('table, edit, words', [
    ('sample', lambda rows: rows.__setitem__(slice(None), {'a': 1}), ['sample.json', 'not a table']),
    ('scene', lambda rows: rows[0].pop('first_sample_token'), ['scene.json', "no field 'first_sample_token'"]),
    ('sample_annotation', lambda rows: rows[0].update(size=None), ['v2.0-mini', 'malformed table field']),
    ('ego_pose', lambda rows: [r.update(rotation=[1, 0]) for r in rows], ['v2.0-mini', 'malformed table field']),
    ('sample', lambda rows: rows[1].update(timestamp='soon'), ['v2.0-mini', 'malformed table field']),
])
def test_malformed_tables(ds, table, edit, words):
    _edit_rows(ds[0], table, edit)
    assert_one_line(run('info', ds[0]), *words)


def test_a_table_that_is_a_folder(ds):
    path = _table(ds[0], 'sample')
    path.unlink()
    path.mkdir()
    assert_one_line(run('info', ds[0]), path, 'cannot read table')


def test_a_dataset_that_is_a_file(a_file):
    assert_one_line(run('info', a_file), a_file, 'not a folder')


# ------------------------------------------------------------------ outputs that cannot be written
def test_synth_into_a_file(a_file):
    assert_one_line(run('synth', '--out', a_file, '--frames', 1, '--agents', 2), a_file, 'not a folder')
    assert_one_line(run('synth', '--out', a_file / 'sub', '--frames', 1, '--agents', 2), a_file, 'not a folder')


def test_demo_into_a_file(a_file):
    assert_one_line(run('demo', '--out', a_file), a_file, 'not a folder')


def test_demo_on_a_damaged_scene(ds, tmp_path):
    out = tmp_path / 'demo'
    shutil.copytree(ds[0], out / 'data')
    _table(out / 'data', 'scene').write_bytes(GARBAGE)
    r = run('demo', '--out', out)
    assert_one_line(r, _table(out / 'data', 'scene'), 'not UTF-8')


@pytest.mark.parametrize('args, named', [
    (['info', '{ds}', '--json', '{file}/x.json'], '{file}'),
    (['info', '{ds}', '--json', '{tmp}/nowhere/x.json'], '{tmp}/nowhere'),
    (['info', '{ds}', '--json', '{ds}'], '{ds}'),
    (['plot', '{ds}', '--out', '{tmp}/nowhere/bev.png'], '{tmp}/nowhere'),
    (['to-bag', '{ds}', '--out', '{file}'], '{file}'),
    (['to-bag', '{ds}', '--out', '{file}/bag'], '{file}'),
    (['bench', 'data', '--json', '{file}/x.json'], '{file}'),
    (['train', 'detector', '--data', '{ds}', '--out', '{file}'], '{file}'),
    (['train', 'fusion', '--data', '{ds}', '--out', '{file}'], '{file}'),
    (['eval', 'fusion', '--data', '{ds}', '--plot', '{file}/x.png'], '{file}'),
    (['eval', 'fusion', '--data', '{ds}', '--cache', '{file}'], '{file}'),
    (['calibrate', 'trust', '--data', '{ds}', '--out', '{file}/gate.yaml'], '{file}'),
    (['calibrate', 'box-trust', '--data', '{ds}', '--out', '{tmp}'], '{tmp}'),
])
def test_unwritable_outputs_fail_before_any_work(ds, a_file, tmp_path, args, named):
    values = {'ds': ds[0], 'file': a_file, 'tmp': tmp_path}
    assert_one_line(run(*[a.format(**values) for a in args]), named.format(**values))


def test_read_only_output(ds, tmp_path, monkeypatch, capsys):
    # As root every folder is writable, so the permission itself is what is faked here.
    monkeypatch.setattr('coop_perception.commands.os.access', lambda path, mode: False)
    assert cli.main(['info', str(ds[0]), '--json', str(tmp_path / 'x.json')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{tmp_path}' in err and 'not writable' in err


# ------------------------------------------------------------------ garbage models and configs
@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / 'garbage.bin'
    path.write_bytes(GARBAGE)
    return path


def test_garbage_detector_checkpoint(garbage):
    assert_one_line(run('bench', 'detector', '--weights', garbage, '--scans', 1), garbage, 'not a detector checkpoint')


def test_garbage_fusion_checkpoint(ds, garbage):
    assert_one_line(run('eval', 'fusion', '--data', ds[0], '--methods', 'trust', '--fusion', garbage), garbage,
                    'not a fusion checkpoint')


@pytest.mark.parametrize('option', ['--config', '--gate'])
@pytest.mark.parametrize('content', [GARBAGE, b'a: [1, 2\n  b: {\n'], ids=['not_utf8', 'not_yaml'])
def test_garbage_yaml(ds, garbage, option, content):
    garbage.write_bytes(content)
    assert_one_line(run('eval', 'fusion', '--data', ds[0], option, garbage), garbage, 'not a valid')


def test_missing_config_is_named(ds, tmp_path):
    missing = tmp_path / 'nothere.yaml'
    assert_one_line(run('eval', 'detector', '--data', ds[0], '--config', missing), missing, 'not found')


# ------------------------------------------------------------------ the entry point's own net
def _failing(error):
    def cmd(args):
        raise error
    return cmd


@pytest.mark.parametrize('error, words', [
    (PermissionError(13, 'Permission denied', '/some/out.json'), ['error: /some/out.json: Permission denied']),
    (OSError(28, 'No space left on device', '/some/bag'), ['error: /some/bag: No space left on device']),
])
def test_os_errors_while_running_are_one_line(monkeypatch, capsys, error, words):
    from coop_perception.data import commands

    monkeypatch.setattr(commands, 'cmd_bench_data', _failing(error))
    assert cli.main(['bench', 'data']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and all(w in err for w in words), err


def test_a_multi_line_user_error_is_printed_as_one_line(monkeypatch, capsys):
    from coop_perception.data import commands
    from coop_perception.errors import UserError

    monkeypatch.setattr(commands, 'cmd_bench_data', _failing(UserError('x.yaml', 'bad\n  at line 2\n  ^')))
    assert cli.main(['bench', 'data']) == 2
    assert capsys.readouterr().err == 'error: x.yaml: bad at line 2 ^\n'
