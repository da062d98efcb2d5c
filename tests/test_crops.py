"""Issue 27: --crop-size / --crop-grid (windows of the stored image; the mean over a grid of windows when predicting)
through the command line, the exported model, Grad-CAM and torchrun; and the refusals."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, agenb
from test_ddp import torchrun

CROP = [*TINY, '--epochs', '1', '--no-report', '--gradcam-n', '0', '--image-size', '48', '--crop-size', '32',
        '--crop-grid', '2', '--patience', '0']


def test_a_crop_run_records_predicts_exports_and_explains_with_its_grid(data_args, tmp_path):
    r = agenb('train', *data_args, *CROP, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    pre = json.loads((run / 'config.json').read_text())['preprocessing']
    assert (pre['image_size'], pre['crop_size'], pre['crop_grid'], pre['input_height'], pre['input_width']) == (48, 32, 2, 32, 32)
    assert 'crop_grid x crop_grid grid' in pre['crop_rule']
    preds = pd.read_csv(run / 'predictions.csv')
    p = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--out', tmp_path / 'p.csv')
    assert p.returncode == 0, p.stderr
    got = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[preds.path]
    np.testing.assert_allclose(got.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)   # the same grid as the test
    t = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--tta', '--out', tmp_path / 't.csv')
    assert t.returncode == 0, t.stderr                                                  # each window gets each view
    tta = pd.read_csv(tmp_path / 't.csv')
    assert np.isfinite(tta.pred).all() and (tta.tta_sd > 0).all()
    e = agenb('export', run, '--format', 'torchscript', '--out', tmp_path / 'bundle')
    assert e.returncode == 0, e.stderr[-3000:]
    card = json.loads((tmp_path / 'bundle' / 'model_card.json').read_text())
    assert card['verification']['torchscript']['ok'], card['verification']       # the file's grid gives predictions.csv
    assert card['input']['crops']['window'] == 32 and len(card['input']['crops']['offsets_top_left']) == 4
    x = agenb('explain', run, preds.path[0], '--out', tmp_path / 'cam')
    assert x.returncode == 0, x.stderr[-3000:]
    assert any((tmp_path / 'cam').glob('*_gradcam.png'))


@pytest.mark.parametrize('extra, says', [
    (['--image-size', '32', '--crop-size', '48'], '--crop-size must be a whole number from 1 to --image-size (32)'),
    (['--crop-grid', '2'], '--crop-grid is only used with --crop-size'),
    (['--image-size', '64', '--crop-size', '16'], '--crop-size 16 is too small'),
    (['--crop-size', '32', '--subject-views', '2'], 'cannot be combined with --subject-views'),
    (['--crop-size', '32', '--head', 'distribution'], 'cannot be combined with --head distribution'),
])
def test_impossible_crops_are_refused_before_anything_is_written(data_args, tmp_path, extra, says):
    r = agenb('train', *data_args, *TINY, *extra, '--output-dir', tmp_path)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_crops_under_ddp_validate_the_whole_grid(data_args, tmp_path):
    "Two ranks each predict their shard of the validation set over the whole grid; the logged MAE is the whole set's."
    from agenb.runs import predict_split
    r = torchrun(*data_args, *CROP, '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    cfg, hist = (json.loads((run / f).read_text()) for f in ('config.json', 'history.json'))
    assert cfg['world_size'] == 2 and cfg['preprocessing']['crop_size'] == 32
    pred = predict_split(run, 'val', checkpoint='last.pth')
    assert len(pred) == cfg['dataset']['val_samples']
    assert np.mean(np.abs(pred.pred - pred.age)) == pytest.approx(hist[-1]['val_mae'], abs=1e-4)
