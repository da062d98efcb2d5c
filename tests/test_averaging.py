"""Issue 27: stochastic weight averaging (--swa-epochs) through the command line, in one process and under torchrun."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, agenb
from test_ddp import torchrun

TWO = [*TINY, '--epochs', '2', '--no-report', '--gradcam-n', '0', '--image-size', '32', '--patience', '0']


def _read(run):
    return (json.loads((run / f).read_text()) for f in ('config.json', 'history.json'))


def test_swa_is_what_the_run_validates_keeps_and_predicts_with(data_args, tmp_path):
    r = agenb('train', *data_args, *TWO, '--swa-epochs', '2', '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    cfg, hist = _read(run)
    assert cfg['training']['swa']['epochs'] == 2 and cfg['training']['swa']['first_averaged_epoch'] == 1
    assert cfg['swa_n_averaged'] == 2 and [h['swa_n_averaged'] for h in hist] == [1, 2]
    last = torch.load(run / 'last.pth', weights_only=True)
    assert last['train_state']['swa_n_averaged'] == 2
    raw, avg = last['train_state']['raw_model'], last['model']
    assert not torch.allclose(raw['fc.1.weight'], avg['fc.1.weight'])                 # the average is not the raw weights
    assert not torch.allclose(raw['bn1.running_var'], avg['bn1.running_var'])         # and has its own BatchNorm statistics
    preds = pd.read_csv(run / 'predictions.csv')
    p = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--out', tmp_path / 'p.csv')
    assert p.returncode == 0, p.stderr
    got = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[preds.path]
    np.testing.assert_allclose(got.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)  # predict uses the kept average


def test_swa_and_ema_together_are_refused(data_args, tmp_path):
    r = agenb('train', *data_args, *TWO, '--swa-epochs', '1', '--ema-decay', '0.9', '--output-dir', tmp_path)
    assert r.returncode == 2 and 'not both' in r.stderr and not any(tmp_path.iterdir())


def test_swa_under_ddp_validates_the_average_it_saves(data_args, tmp_path):
    "Two ranks recompute BatchNorm statistics on their own shards; the validated and saved ones are rank 0's."
    from agenb.runs import predict_split
    r = torchrun(*data_args, *TWO, '--swa-epochs', '1', '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    cfg, hist = _read(run)
    assert cfg['world_size'] == 2 and [h['swa_n_averaged'] for h in hist] == [0, 1]
    pred = predict_split(run, 'val', checkpoint='last.pth')
    assert len(pred) == cfg['dataset']['val_samples']
    assert np.mean(np.abs(pred.pred - pred.age)) == pytest.approx(hist[-1]['val_mae'], abs=1e-5)
