"""DDP with torchrun on 2 CPU processes (gloo): correct, not just running."""
import itertools, json, math, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, probe, probe_log, run_cmd, run_dir_of
from agenb.trainer import train_batches

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


# Each rank's own validation predictions are shifted before they are shared (tests/train_probe.py): at epoch e rank 0's
# by 1000 / e years, rank 1's by 1000 e. A rank deciding from its own numbers would see rank 0 improve every epoch and
# rank 1 never after epoch 1; the shared numbers (each validation image once) get worse after epoch 1. So the right
# decisions are: best epoch 1, the plateau rule halving the rate after epochs 2 and 3, early stopping after epoch 3
# (patience 2), the same on both ranks; a rank that decided alone would stop at another epoch than the other.
SHIFT = {f'{r}:{e}': (1000.0 / e if r == 0 else 1000.0 * e) for r in (0, 1) for e in range(1, 5)}


@pytest.fixture(scope='module')
def decided(data_args, tmp_path_factory):
    "(run folder, {rank: decision records}) of a 2-rank run with rank-dependent raw numbers and --accum-steps 2."
    out = tmp_path_factory.mktemp('ddp_decisions')
    r = probe(*data_args, *TINY, '--seed', odd_val_seed(data_args), '--epochs', 4, '--warmup-epochs', 0, '--patience', 2,
              '--scheduler', 'plateau', '--plateau-patience', 0, '--plateau-factor', 0.5, '--accum-steps', 2,
              '--output-dir', out / 'runs', '--no-report', '--gradcam-n', 0, nproc=2, timeout=300,
              env={'AGENB_PROBE_LOG': str(out / 'log'), 'AGENB_PROBE_VAL_OFFSET': json.dumps(SHIFT)})
    assert r.returncode == 0, r.stderr[-4000:]
    return run_dir_of(r), probe_log(out / 'log')


def test_every_rank_decides_from_the_shared_numbers(decided):
    run, log = decided
    assert sorted(log) == [0, 1] and log[0] == log[1]            # validation MAE, best epoch, rate, stop, weights
    *epochs, stop, closed = log[0]
    assert stop == {'stop': 'early_stopping', 'epoch': 3}
    # every rank freed its DDP wrapper after ending the process group, before the interpreter's shutdown (Trainer.close)
    assert closed == {'closed': True, 'ddp_wrapper_freed': True, 'group_freed': True, 'process_group': False}
    assert [(e['epoch'], e['improved'], e['best_epoch'], e['bad_epochs'], e['final']) for e in epochs] == [
        (1, True, 1, 0, False), (2, False, 1, 1, False), (3, False, 1, 2, True)]
    assert [e['lr'] for e in epochs] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert [e['lr_next'] for e in epochs] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    cfg = json.loads((run / 'config.json').read_text())
    assert (cfg['stop_reason'], cfg['epochs_completed'], cfg['best_epoch']) == ('early_stopping', 3, 1)
    assert torch.load(run / 'best_model.pth', weights_only=True)['epoch'] == 1
    h = json.loads((run / 'history.json').read_text())
    assert [e['val_mae'] for e in h] == [e['val_mae'] for e in epochs]


def test_the_shared_validation_mae_counts_each_image_once(decided):
    "Epoch 3's MAE is that of all validation images, each with its rank's shift (rank r holds positions r, r + 2, ...)."
    from agenb.runs import predict_split
    run, log = decided
    val = predict_split(run, 'val', checkpoint='last.pth')       # epoch 3's weights, one process, no shift
    assert len(val) % 2 == 1
    shift = np.where(np.arange(len(val)) % 2 == 0, SHIFT['0:3'], SHIFT['1:3'])
    want = float(np.abs(val.pred.to_numpy() + shift - val.age.to_numpy()).mean())
    assert log[0][2]['val_mae'] == pytest.approx(want, abs=1e-3)


def test_accumulation_steps_once_per_two_batches_and_ranks_stay_equal(decided, data_args):
    "--accum-steps 2: no_sync on the first batch of each pair, one optimizer step per pair, the same weights on both ranks."
    run, log = decided
    cfg = json.loads((run / 'config.json').read_text())
    n, seed = cfg['dataset']['train_samples'], cfg['args']['seed']
    assert cfg['training']['effective_batch_size'] == 16 * 2 * 2
    for rank in (0, 1):
        per_epoch = [math.ceil(len(train_batches(n, 16, e, seed, rank, 2)) / 2) for e in range(3)]
        assert [e['opt_steps'] for e in log[rank][:3]] == list(itertools.accumulate(per_epoch))
    assert len({e['weights'] for e in log[0][:3]}) == 3          # the weights moved every epoch (and equal on both ranks)


def test_a_failing_rank_fails_the_job_without_hanging(data_args, tmp_path):
    r = torchrun(*data_args, *TINY, '--output-dir', tmp_path, '--no-report', env={'AGENB_FAULT': 'raise:1:1:2'}, timeout=180)
    assert r.returncode != 0
    assert 'injected fault on rank 1' in r.stderr
