"""Grad-CAM maps for every backbone, the shortcut score, explain_run's files (embedded by the report) and the CLI."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agenb.explain import gradcam, shortcut_score, explain_run, FIGURE, TABLE
from agenb.images import Preprocessing
from agenb.model import ARCHS, build_model
from conftest import agenb


@pytest.mark.parametrize('arch', ARCHS)
def test_gradcam_shape_finite(arch):
    torch.manual_seed(0)
    m = build_model(arch, pretrained=False, dropout=0.0).eval()
    cam = gradcam(m, torch.randn(2, 3, 64, 40), arch)
    assert tuple(cam.shape) == (2, 64, 40) and torch.isfinite(cam).all() and (cam >= 0).all()


def test_shortcut_score_extremes():
    prep = Preprocessing(image_size=(64, 48))
    muscle = np.zeros((120, 100), np.uint8); muscle[20:60, 10:90] = 1
    r = prep.region_maps((120, 100), muscle)
    assert shortcut_score(r['annotation'].astype(float), r['annotation'], r['muscle']) == 1.0
    assert shortcut_score(r['muscle'] * 5.0, r['annotation'], r['muscle']) == 0.0
    s = shortcut_score(np.ones((64, 48)), r['annotation'], r['muscle'])
    assert s == pytest.approx(r['annotation'].mean(), abs=1e-9) and 0.1 < s < 0.25  # even spread: the regions' area


@pytest.fixture(scope='module')
def run_copy(tiny_run, tmp_path_factory):
    "A private copy of the shared tiny run (explain_run writes into the folder and updates metrics.json)."
    dst = tmp_path_factory.mktemp('explain') / tiny_run.name
    shutil.copytree(tiny_run, dst)
    return dst


def test_explain_run_writes_report_files(run_copy):
    before = json.loads((run_copy / 'metrics.json').read_text())
    res = explain_run(run_copy, n=2)
    assert res['files'] == {'figure': FIGURE, 'table': TABLE} and res['metrics_updated']
    png = (run_copy / FIGURE).read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
    t = pd.read_csv(run_copy / TABLE)
    split = pd.read_csv(run_copy / 'split.csv')
    assert len(t) == (split.split == 'test').sum()
    assert set(t.columns) >= {'filename', 'age', 'pred', 'abs_error', 'shortcut_score', 'muscle_share'}
    m = json.loads((run_copy / 'metrics.json').read_text())
    assert m['shortcut_score'] == pytest.approx(t.shortcut_score.mean()) and 0 <= m['shortcut_score'] <= 1
    before = {k: v for k, v in before.items() if not k.startswith('shortcut')}  # the trainer's own explain_run wrote these
    assert {k: m[k] for k in before} == before                      # nothing else in metrics.json changed
    assert len(m['shortcut']['best']) == len(m['shortcut']['worst']) == 2
    # the predictions match the run's own (same model, same preprocessing)
    preds = pd.read_csv(run_copy / 'predictions.csv')
    both = t.merge(preds, on='filename', suffixes=('', '_run'))
    assert len(both) == len(t) and np.allclose(both.pred, both.pred_run, atol=1e-3)


def test_explain_cli(run_copy, tmp_path):
    split = pd.read_csv(run_copy / 'split.csv')
    img = Path(split.path[split.split == 'test'].iloc[0])
    r = agenb('explain', run_copy, img, '--out', tmp_path / 'ov')
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'ov' / f'{img.stem}_gradcam.png').is_file() and 'shortcut' in r.stdout and 'true' in r.stdout
    r = agenb('explain', run_copy, tmp_path / 'missing.png', '--out', tmp_path / 'ov')
    assert r.returncode == 2 and 'agenb: error' in r.stderr and 'missing.png' in r.stderr
    r = agenb('explain', tmp_path / 'not_a_run', img)
    assert r.returncode == 2 and 'agenb: error' in r.stderr


def test_explanations_name_the_checkpoint_and_survive_maps_without_mass(run_copy, tmp_path):
    """An explanation says which weights it explains (gradcam.csv, the record, the printed line), and a model whose maps
    have no mass (score n/a) is reported, not an internal error ('{None:.3f}')."""
    import torch
    ck = torch.load(run_copy / 'last.pth', weights_only=True)
    ck['model']['fc.1.weight'] = torch.zeros_like(ck['model']['fc.1.weight'])   # constant output: every map is 0
    torch.save(ck, run_copy / 'checkpoint_flat.pth')
    r = agenb('explain', run_copy, '--checkpoint', 'checkpoint_flat.pth', '--n', '1', '--out', tmp_path / 'ex')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'n/a' in r.stdout and 'checkpoint_flat.pth' in r.stdout
    t = pd.read_csv(tmp_path / 'ex' / TABLE)
    assert set(t.checkpoint) == {'checkpoint_flat.pth'}
    (tmp_path / 'best').mkdir()
    res = explain_run(run_copy, n=1, out_dir=tmp_path / 'best')
    assert res['shortcut']['checkpoint'] == 'best_model.pth' and res['shortcut']['checkpoint_epoch'] is not None
    assert set(pd.read_csv(tmp_path / 'best' / TABLE).checkpoint) == {'best_model.pth'}
