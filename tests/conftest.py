"""Shared fixtures: a tiny synthetic dataset and one tiny finished run, made once per test session."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A tiny, fast model: every trainer test uses these settings unless it says otherwise.
TINY = ['--arch', 'resnet18', '--image-size', '64', '--epochs', '2', '--batch-size', '16', '--no-pretrained',
        '--num-workers', '2', '--warmup-epochs', '1', '--lr', '1e-3']


def run_cmd(args, timeout=300, env=None, cwd=None):
    "Run a command; returns CompletedProcess with text output (never raises on a non-zero exit)."
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd or ROOT)


def agenb(module, *args, **kw):
    return run_cmd([sys.executable, '-m', f'agenb.{module}', *map(str, args)], **kw)


@pytest.fixture(scope='session')
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    r = agenb('synth', root, '--preset', 'test')
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope='session')
def data_args(synth_root):
    return ['--image-dir', str(synth_root / 'TA' / 'Healthy' / 'Images'),
            '--excel-path', str(synth_root / 'TA' / 'characteristics.xlsx')]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_args):
    "One finished 2-epoch run (resnet18, 64 px) shared by the tests that only read its files."
    out = tmp_path_factory.mktemp('runs')
    r = agenb('train', *data_args, *TINY, '--output-dir', out, '--checkpoint-every', '1', '--keep-checkpoints', '1',
              '--run-name', 'tiny')
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    return run_dir
