"""DDP with torchrun on 2 CPU processes (gloo): correct, not just running."""
import json, sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, run_cmd

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'agenb.train']


def torchrun(*args, timeout=240, env=None):
    return run_cmd([*TORCHRUN, *map(str, args)], timeout=timeout, env=env)


def odd_val_seed(data_args):
    "A split seed whose validation set has an odd number of images, so 2 ranks cannot split it evenly."
    from agenb.data import load_dataset
    from agenb.split import make_split
    table, _ = load_dataset(data_args[1], data_args[3])
    for seed in range(50):
        split, _ = make_split(table, seed=seed)
        if (split == 'val').sum() % 2 == 1: return seed
    pytest.skip('no seed with an odd validation set')


@pytest.fixture(scope='module')
def ddp_run(data_args, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    seed = odd_val_seed(data_args)
    r = torchrun(*data_args, *TINY, '--seed', seed, '--output-dir', out, '--no-report')
    assert r.returncode == 0, r.stderr[-4000:]
    runs = list(out.iterdir())
    assert len(runs) == 1, runs  # one run folder, written by rank 0 only
    assert Path(r.stdout.strip().splitlines()[-1]) == runs[0]
    return runs[0]


def test_ddp_run_completes_and_records_the_world(ddp_run):
    cfg = json.loads((ddp_run / 'config.json').read_text())
    assert cfg['status'] == 'completed'
    assert (cfg['world_size'], cfg['use_ddp'], cfg['distributed_backend']) == (2, True, 'gloo')
    assert cfg['training']['effective_batch_size'] == 2 * 16
    assert len(json.loads((ddp_run / 'history.json').read_text())) == 2


def test_ddp_val_mae_equals_single_process_evaluation(ddp_run):
    "Each validation sample counted once (odd count: the ranks hold 1 more / 1 fewer) and the numbers equal 1 process."
    from agenb.runs import predict_split
    cfg = json.loads((ddp_run / 'config.json').read_text())
    assert cfg['dataset']['val_samples'] % 2 == 1
    last_val_mae = json.loads((ddp_run / 'history.json').read_text())[-1]['val_mae']
    pred = predict_split(ddp_run, 'val', checkpoint='last.pth')
    assert len(pred) == cfg['dataset']['val_samples']
    assert np.mean(np.abs(pred.pred - pred.age)) == pytest.approx(last_val_mae, abs=1e-5)
    # the test predictions written by the run cover every test image exactly once
    import pandas as pd
    test_pred = pd.read_csv(ddp_run / 'predictions.csv')
    assert len(test_pred) == cfg['dataset']['test_samples'] and test_pred.path.is_unique


def test_ddp_early_stopping_ends_every_rank(data_args, tmp_path):
    # min_delta so large that nothing after epoch 1 counts as an improvement: patience 1 stops after epoch 2
    r = torchrun(*data_args, *TINY, '--epochs', '6', '--patience', '1', '--min-delta', '1000', '--output-dir', tmp_path,
                 '--no-report', timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['stop_reason'] == 'early_stopping' and cfg['epochs_completed'] == 2
    assert len(json.loads((run / 'history.json').read_text())) == 2


def test_a_failing_rank_fails_the_job_without_hanging(data_args, tmp_path):
    r = torchrun(*data_args, *TINY, '--output-dir', tmp_path, '--no-report', env={'AGENB_FAULT': 'raise:1:1:2'}, timeout=180)
    assert r.returncode != 0
    assert 'injected fault on rank 1' in r.stderr
