"""Reliability: exact resume after kill -9, SIGTERM, NaN, truncated checkpoints, under 1 and 2 processes."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from conftest import TINY, agenb, run_cmd, ROOT

THREE = [*TINY, '--epochs', '3', '--no-report']


def _run_dir(r):
    return Path(r.stdout.strip().splitlines()[-1])


def _same_history(a, b):
    ha, hb = (json.loads((d / 'history.json').read_text()) for d in (a, b))
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        for k in ('train_loss', 'val_loss', 'val_mae', 'val_rmse', 'lr'):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (x['epoch'], k)


def _same_weights(a, b):
    wa, wb = (torch.load(d / 'last.pth', weights_only=True)['model'] for d in (a, b))
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k


@pytest.mark.parametrize('nproc', [1, 2])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(data_args, tmp_path, nproc):
    launch = ([sys.executable, '-m', 'agenb.train'] if nproc == 1 else
              [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '-m', 'agenb.train'])
    full = run_cmd([*launch, *data_args, *THREE, '--output-dir', tmp_path / 'full'], timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_cmd([*launch, *data_args, *THREE, '--output-dir', tmp_path / 'killed'], timeout=300,
                     env={'AGENB_FAULT': 'kill:0:2:2'})   # SIGKILL rank 0 at epoch 2, step 2
    assert killed.returncode != 0
    (run,) = list((tmp_path / 'killed').iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'running' and cfg['epochs_completed'] == 1  # a killed run cannot update its status
    resumed = run_cmd([*launch, '--resume', str(run)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _run_dir(resumed) == run
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'completed' and len(cfg['resumes']) == 1 and cfg['resumes'][0]['from_epoch'] == 1
    _same_history(_run_dir(full), run)
    _same_weights(_run_dir(full), run)


def test_sigterm_records_interrupted_and_keeps_last_pth(data_args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    p = subprocess.Popen([sys.executable, '-m', 'agenb.train', *data_args, *TINY, '--epochs', '200', '--no-report',
                          '--output-dir', str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob('*/last.pth')): time.sleep(0.5)
    assert list(tmp_path.glob('*/last.pth')), 'no epoch finished in time'
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    (run,) = list(tmp_path.iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'interrupted' and 'SIGTERM' in cfg['error']
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] >= 1
    assert '--resume' in err


def test_nan_loss_stops_with_message_and_keeps_checkpoint(data_args, tmp_path):
    r = agenb('train', *data_args, *THREE, '--output-dir', tmp_path, env={'AGENB_FAULT': 'nan:0:2:1'})
    assert r.returncode == 3 and 'non-finite' in r.stderr and 'Traceback' not in r.stderr
    (run,) = list(tmp_path.iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'failed' and 'non-finite' in cfg['error'] and cfg['failed_at_epoch'] == 2
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 1


def test_nan_policy_skip_counts_the_batch(data_args, tmp_path):
    r = agenb('train', *data_args, *TINY, '--no-report', '--nan-policy', 'skip', '--output-dir', tmp_path,
              env={'AGENB_FAULT': 'nan:0:2:1'})
    assert r.returncode == 0, r.stderr[-2000:]
    h = json.loads((_run_dir(r) / 'history.json').read_text())
    assert [e['skipped_batches'] for e in h] == [0, 1]


def test_truncated_checkpoint_and_bad_resume(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    data = (run / 'last.pth').read_bytes()
    (run / 'last.pth').write_bytes(data[: len(data) // 2])
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'
    (run / 'config.json').write_text(json.dumps(cfg))
    r = agenb('train', '--resume', run)
    assert r.returncode == 2 and 'truncated' in r.stderr and 'Traceback' not in r.stderr
    r = agenb('train', '--resume', tiny_run)  # a completed run has nothing left to do
    assert r.returncode == 2 and 'completed' in r.stderr


def test_unwritable_output_dir_fails_early(data_args, tmp_path):
    if os.geteuid() == 0:
        target = '/proc/agenb-runs'  # root can write anywhere on disk; /proc cannot be written by anyone
    else:
        ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500); target = ro / 'runs'
    r = agenb('train', *data_args, *TINY, '--output-dir', target)
    assert r.returncode == 2 and '--output-dir' in r.stderr and 'Traceback' not in r.stderr


def test_checkpoint_of_another_architecture_or_size_is_refused(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'; cfg['args']['epochs'] = 4
    (run / 'config.json').write_text(json.dumps(cfg))
    for flag, value, needle in (('--arch', 'resnet34', "arch='resnet18'"), ('--image-size', '96', 'image_size=64')):
        r = agenb('train', '--resume', run, flag, value)
        assert r.returncode == 2 and needle in r.stderr and 'Traceback' not in r.stderr, r.stderr
