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


PROBE = str(ROOT / 'tests' / 'train_probe.py')


def probe(*args, nproc=1, **kw):
    "The trainer through tests/train_probe.py (test probes set by AGENB_PROBE_* in `env`), in 1 process or under torchrun."
    launch = [sys.executable, PROBE] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', PROBE]
    return run_cmd([*launch, *map(str, args)], **kw)


def run_dir_of(r):
    "The run folder a finished trainer printed last."
    return Path(r.stdout.strip().splitlines()[-1])


def probe_log(d, drop=('bn',)):
    """{rank: [records]} written by train_probe.py's AGENB_PROBE_LOG, without the keys `drop` (BatchNorm statistics
    after training differ between ranks unless --sync-bn)."""
    read = lambda p: [{k: v for k, v in json.loads(line).items() if k not in drop} for line in p.read_text().splitlines()]
    return {int(p.stem[4:]): read(p) for p in sorted(Path(d).glob('rank*.jsonl'))}


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


@pytest.fixture(scope='session')
def roi_run(tmp_path_factory, data_args):
    """One finished 1-epoch run with --roi crop --mask-annotations (the crop keeps the label and ticks, so both steps
    change the pixels): predict, export and explain must reproduce it."""
    out = tmp_path_factory.mktemp('roi_runs')
    r = agenb('train', *data_args, *TINY, '--epochs', '1', '--warmup-epochs', '0', '--roi', 'crop', '--roi-box', '0.1,0,0.9,1',
              '--mask-annotations', '--output-dir', out, '--no-report', '--checkpoint-every', '0', '--run-name', 'roi')
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(r)
