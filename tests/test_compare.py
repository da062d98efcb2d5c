"Integration tests of agenb.compare on fake run folders."
import json, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from agenb.compare import compare_runs, IGNORE


def cli(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'agenb.compare', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def make_run(root, name, *, lr=1e-4, arch='resnet50', mae=7.0, status='completed', history=True):
    run = Path(root) / name
    run.mkdir(parents=True)
    cfg = {'script_name': 'agenb.train', 'timestamp': name.split('_', 1)[1], 'output_dir': str(run), 'status': status,
           'dataset': {'train_samples': 2211, 'val_samples': 251, 'test_samples': 630, 'split_method': 'by_subject_id'},
           'model': {'architecture': arch, 'pretrained': True, 'dropout': 0.5},
           'training': {'loss_function': 'MAE (L1Loss)', 'learning_rate': lr, 'epochs': 500,
                        'scheduler_params': {'T_max': 500, 'eta_min': 1e-7}},
           'environment': {'hostname': f'host-{name}', 'command_line': ['python', '-m', 'agenb.train', name],
                           'git': {'commit': 'abc', 'dirty': False}}}
    (run / 'config.json').write_text(json.dumps(cfg))
    if history:
        (run / 'history.json').write_text(json.dumps([
            {'epoch': e, 'train_loss': 1.0, 'val_loss': v, 'val_mae': v, 'val_rmse': v + 1, 'lr': lr, 'epoch_seconds': 3.0}
            for e, v in [(1, 10.0), (2, 8.0), (3, 6.5), (4, 7.0)]]))
    if mae is not None:
        (run / 'metrics.json').write_text(json.dumps({
            'overall': {'mae': mae, 'rmse': mae + 2, 'pearson_r': 0.9}, 'subject_level': {'mae': mae - 0.3},
            'corrected': {'mae': mae - 1}, 'baseline': {'mae': 16.0}}))
    return run


def test_two_runs_differ_in_one_setting(tmp_path):
    a = make_run(tmp_path, 'run_20260101_100000', lr=1e-4, mae=7.5)
    b = make_run(tmp_path, 'run_20260102_110000', lr=3e-4, mae=6.9)
    metrics, diff = compare_runs([a, b])
    assert list(diff.columns) == ['training.learning_rate']       # timestamp, paths, host, command line ignored
    assert list(diff['training.learning_rate']) == [1e-4, 3e-4]
    assert list(metrics['test_mae']) == [7.5, 6.9] and list(metrics['test_corrected_mae']) == [6.5, 5.9]
    assert list(metrics['best_epoch']) == [3, 3] and list(metrics['test_baseline_mae']) == [16.0, 16.0]
    assert list(metrics['status']) == ['completed', 'completed']


def test_cli_writes_csv_and_markdown(tmp_path):
    a = make_run(tmp_path / 'runs', 'run_20260101_100000', arch='resnet50', mae=7.5)
    b = make_run(tmp_path / 'runs', 'run_20260102_110000', arch='resnet18', mae=8.1)
    r = cli(a, b, '--out', 'cmp', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'model.architecture' in r.stdout and 'learning_rate' not in r.stdout
    t = pd.read_csv(tmp_path / 'cmp.csv', index_col='run')
    assert list(t.index) == ['run_20260101_100000', 'run_20260102_110000']   # given order kept
    assert list(t['model.architecture']) == ['resnet50', 'resnet18'] and list(t['test_mae']) == [7.5, 8.1]
    assert [c for c in t.columns if '.' in c] == ['model.architecture']
    md = (tmp_path / 'cmp.md').read_text()
    assert '| run | model.architecture |' in md and '| run_20260102_110000 | resnet18 |' in md
    assert '| run_20260101_100000 | completed | 6.50 | 3 | 4 |  | 7.50 |  |  | 9.50 | 0.900 | 7.20 | 6.50 | 16.00 |  |' in md


def test_leaderboard_of_a_runs_folder(tmp_path):
    runs = tmp_path / 'runs'
    make_run(runs, 'run_20260101_100000', mae=7.5)
    make_run(runs, 'run_20260102_110000', mae=None, status='running', history=False)   # no metrics yet
    make_run(runs, 'run_20260103_120000', mae=6.2, lr=1e-3)
    h = runs / 'run_20260101_100000' / 'history.json'                 # the first run is better on validation
    h.write_text(h.read_text().replace('6.5', '6.0'))
    (runs / 'not_a_run').mkdir()
    r = cli(runs, cwd=tmp_path)                                    # default --out compare
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('Leaderboard, ranked by validation MAE') and 'test_* columns are measured on' in r.stdout
    t = pd.read_csv(tmp_path / 'compare.csv', index_col='run')
    assert list(t.index) == ['run_20260101_100000', 'run_20260103_120000', 'run_20260102_110000']   # by validation
    r = cli(runs, '--rank-by', 'test', cwd=tmp_path)
    assert r.returncode == 0 and 'ranked by TEST MAE' in r.stdout
    t = pd.read_csv(tmp_path / 'compare.csv', index_col='run')
    assert list(t.index) == ['run_20260103_120000', 'run_20260101_100000', 'run_20260102_110000']
    assert t.loc['run_20260102_110000', 'status'] == 'running' and pd.isna(t.loc['run_20260102_110000', 'test_mae'])
    assert (tmp_path / 'compare.md').exists()


@pytest.mark.parametrize('setup,msg', [
    (lambda p: None, 'is not a folder'),
    (lambda p: p.mkdir(), 'holds no runs'),
    (lambda p: (p.mkdir(), (p / 'config.json').write_text('{oops')), 'not valid JSON'),
])
def test_bad_inputs(tmp_path, setup, msg):
    target = tmp_path / 'target'
    setup(target)
    r = cli(target, cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ignore_list_is_documented_and_short():
    assert 'timestamp' in IGNORE and 'hostname' in IGNORE and 'best_epoch' in IGNORE and len(IGNORE) < 40
