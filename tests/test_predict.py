"""python -m agenb.predict on a finished run: reproduces its predictions and metrics, subjects, TTA, bad images."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import agenb
from agenb.core import file_sha256


@pytest.fixture(scope='module')
def test_images(tiny_run, tmp_path_factory):
    "A folder holding copies of the run's own test images (and nothing else)."
    d = tmp_path_factory.mktemp('test_images') / 'Images'
    d.mkdir()
    split = pd.read_csv(tiny_run / 'split.csv', dtype={'subject': str})
    for p in split.loc[split.split == 'test', 'path']: shutil.copy(p, d / Path(p).name)
    return d


A, B = 0.8, 5.0  # a bias correction the copied run is given, so the corrected path is always exercised


@pytest.fixture(scope='module')
def corrected_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose validation fit is a known, applied correction (a 2-epoch model's own fit on 3
    validation subjects may be refused), with its files made consistent with it."""
    run = tmp_path_factory.mktemp('corrected') / tiny_run.name
    shutil.copytree(tiny_run, run)
    m = json.loads((run / 'metrics.json').read_text())
    m['bias_correction'] = {**m['bias_correction'], 'a': A, 'b': B, 'applied': True, 'reason': None}
    pred = pd.read_csv(run / 'predictions.csv', dtype={'subject': str}).assign(corrected=lambda d: (d.pred - B) / A)
    pred.to_csv(run / 'predictions.csv', index=False)
    subj = pred.groupby('subject')[['age', 'corrected']].mean()
    stats = lambda age, p: {'mae': float(np.abs(p - age).mean()), 'rmse': float(np.sqrt(((p - age) ** 2).mean())),
                            'bias': float((p - age).mean())}                  # by hand, not with agenb.evaluate
    m['corrected'] = stats(pred.age, pred.corrected)
    m['corrected_subject_level'] = stats(subj.age, subj.corrected)
    (run / 'metrics.json').write_text(json.dumps(m))
    return run


@pytest.fixture(scope='module')
def predicted(corrected_run, test_images, data_args, tmp_path_factory):
    "One prediction with the spreadsheet: (output folder, CompletedProcess)."
    out = tmp_path_factory.mktemp('pred')
    excel = data_args[data_args.index('--excel-path') + 1]
    r = agenb('predict', corrected_run, '--image-dir', test_images, '--excel-path', excel, '--cohort', 'Healthy',
              '--out', out / 'new.csv')
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_reproduces_the_runs_predictions(corrected_run, predicted):
    out, _ = predicted
    new = pd.read_csv(out / 'new.csv', dtype={'subject': str})
    run = pd.read_csv(corrected_run / 'predictions.csv', dtype={'subject': str})
    assert len(new) == len(run) > 0
    m = run.merge(new, on='filename', suffixes=('_run', '_new'))
    assert len(m) == len(run)
    np.testing.assert_allclose(m.pred_new, m.pred_run, atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.corrected_new, m.corrected_run, atol=1e-3, rtol=0)  # the run's own coefficients
    assert (m.subject_new == m.subject_run).all() and (m.age_new == m.age_run).all()


def test_one_row_per_subject(predicted):
    out, _ = predicted
    img = pd.read_csv(out / 'new.csv', dtype={'subject': str})
    subj = pd.read_csv(out / 'new_subjects.csv', dtype={'subject': str})
    assert len(subj) == img.subject.nunique() and subj.subject.is_unique
    assert subj.n_images.sum() == len(img)
    means = img.groupby('subject').pred.mean()
    assert not np.allclose(img.groupby('subject').pred.median(), means)   # the data can tell a mean from a median
    np.testing.assert_allclose(subj.set_index('subject').pred.loc[means.index], means, atol=1e-9)
    assert {'pred_sd', 'corrected', 'age'} <= set(subj.columns)


def test_metrics_match_the_run(corrected_run, predicted):
    out, r = predicted
    mine = json.loads((out / 'new_metrics.json').read_text())
    run = json.loads((corrected_run / 'metrics.json').read_text())
    assert mine['bias_correction']['a'] == run['bias_correction']['a']
    for k in ('overall', 'subject_level', 'corrected', 'corrected_subject_level'):
        for stat in ('mae', 'rmse', 'bias'):
            assert abs(mine[k][stat] - run[k][stat]) < 1e-4, (k, stat)
    assert 'MAE' in r.stdout and 'subjects' in r.stdout
    info = json.loads((out / 'new.json').read_text())
    assert info['checkpoint_sha256'] == file_sha256(corrected_run / 'best_model.pth')
    assert info['tta']['enabled'] is False and info['skipped'] == []
    assert info['preprocessing']['image_size'] == 64 and info['n_predicted'] == len(pd.read_csv(out / 'new.csv'))


def test_tta_is_recorded(tiny_run, test_images, predicted, tmp_path, capsys):
    from agenb.predict import main   # in-process: the CLI path is covered by the other tests
    main([str(tiny_run), '--image-dir', str(test_images), '--out', str(tmp_path / 'tta.csv'), '--tta', '--num-workers', '1'])
    assert 'TTA over 3 views' in capsys.readouterr().out
    info = json.loads((tmp_path / 'tta.json').read_text())
    names = [v['name'] for v in info['tta']['views']]
    assert names[0] == 'identity' and len(names) == 3 and not any('flip' in n for n in names)  # trained: rotation 10, no flips
    tta = pd.read_csv(tmp_path / 'tta.csv')
    plain = pd.read_csv(predicted[0] / 'new.csv')
    assert (tta.tta_sd > 0).all()
    assert not np.allclose(tta.pred, plain.pred, atol=1e-6)   # the views change the numbers
    assert 'age' not in tta.columns  # no spreadsheet given


def test_unreadable_image(tiny_run, test_images, tmp_path):
    d = tmp_path / 'imgs'; shutil.copytree(test_images, d)
    (d / 'anon_999_1.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    r = agenb('predict', tiny_run, '--image-dir', d, '--out', tmp_path / 'a.csv')
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('agenb: error:') and 'anon_999_1.png' in err[0], r.stderr
    assert not (tmp_path / 'a.csv').exists()
    r = agenb('predict', tiny_run, '--image-dir', d, '--out', tmp_path / 'b.csv', '--skip-bad')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'skipped' in r.stderr and 'anon_999_1.png' in r.stderr
    info = json.loads((tmp_path / 'b.json').read_text())
    assert [Path(s['file']).name for s in info['skipped']] == ['anon_999_1.png'] and info['skipped'][0]['reason']
    out = pd.read_csv(tmp_path / 'b.csv')
    assert 'anon_999_1.png' not in set(out.filename) and len(out) == len(list(test_images.iterdir()))
