"""Issue 16: covariates joined to the image embedding, and the distribution head's calibration in the report."""
import json, shutil
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
import torch

from conftest import TINY, agenb
from agenb.core import InputError

ONE = [*TINY, '--epochs', '1', '--image-size', '32', '--gradcam-n', '1']
COV = 'sex,bmi,echo_mean'


def _rename_header(src, dst, old, new):
    "A copy of the synthetic spreadsheet whose `old` header cells are `new` (so the column is no longer found)."
    wb = openpyxl.load_workbook(src)
    for ws in wb.worksheets:
        for row in ws.iter_rows():
            for c in row:
                if isinstance(c.value, str) and c.value.strip().lower() == old.lower(): c.value = new
    wb.save(dst)
    return dst


@pytest.fixture(scope='module')
def cov_run(data_args, tmp_path_factory):
    "A 1-epoch distribution-head run with covariates, its report rendered."
    out = tmp_path_factory.mktemp('covruns')
    r = agenb('train', *data_args, *ONE, '--output-dir', out, '--covariates', COV, '--head', 'distribution',
              '--age-bins', '0:100:4', timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def test_covariates_recorded_and_report_shows_calibration(cov_run):
    cfg = json.loads((cov_run / 'config.json').read_text())
    cov = cfg['model']['covariates']
    assert cov['names'] == COV.split(',') and cov['n_inputs'] == 6 and cov['fitted_on'] == 'training split only'
    assert cfg['model']['n_covariates'] == 6 and 'covariates (6) -> MLP' in cfg['model']['head']
    ck = torch.load(cov_run / 'best_model.pth', weights_only=True)
    assert ck['covariates'] == {k: v for k, v in cov.items() if k != 'gradcam'}       # the statistics live in the checkpoint
    html = (cov_run / 'report.html').read_text()
    cal = json.loads((cov_run / 'metrics.json').read_text())['calibration']
    assert 'Calibration of the predictive intervals' in html
    for level in ('images', 'subjects'):
        for k in ('coverage_80', 'coverage_95'): assert f'{cal[level][k]:.3f}' in html, (level, k)
    assert 'sex, bmi, echo_mean: standardised with training split only statistics' in html
    assert (cov_run / 'gradcam_best_worst.png').is_file()                             # Grad-CAM on the image branch


def test_covariate_predict_roundtrip_and_refusals(cov_run, data_args, tmp_path):
    preds = pd.read_csv(cov_run / 'predictions.csv')
    img_dir = Path(preds.path[0]).parent
    r = agenb('predict', cov_run, '--image-dir', img_dir, '--excel-path', data_args[3], '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr[-2000:]
    p = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[preds.path]
    np.testing.assert_allclose(p.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-3)   # same covariates, same statistics
    info = json.loads((tmp_path / 'p.json').read_text())['covariates']
    assert info['names'] == COV.split(',') and info['n_images_with_a_missing_covariate'] >= 0
    r = agenb('predict', cov_run, '--image-dir', img_dir, '--out', tmp_path / 'q.csv')
    assert r.returncode == 2 and '--excel-path' in r.stderr and 'Traceback' not in r.stderr
    no_sex = _rename_header(data_args[3], tmp_path / 'no_sex.xlsx', 'Sex', 'Remark')
    r = agenb('predict', cov_run, '--image-dir', img_dir, '--excel-path', no_sex, '--out', tmp_path / 'q.csv')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-1500:]
    assert r.stderr.strip().splitlines()[-1].startswith('agenb: error: --covariates sex:') and 'sex column' in r.stderr
    assert not (tmp_path / 'q.csv').exists()


def test_covariate_export_roundtrip(cov_run, data_args, tmp_path):
    """The exported model takes the covariates (raw, NaN missing) as a second input: the spreadsheet's, and echo_mean
    measured inside the muscle mask by agenb.images.echo_statistics."""
    r = agenb('export', cov_run, '--format', 'torchscript', '--out', tmp_path / 'exp')
    assert r.returncode == 0 and 'max |diff|' in r.stdout and 'WARNING' not in r.stdout, r.stderr[-2000:]
    card = json.loads((tmp_path / 'exp' / 'model_card.json').read_text())
    assert card['input']['second_input']['columns'] == COV.split(',') == card['input']['covariates']['names']
    assert 'inside the muscle mask' in card['input']['second_input']['units']['echo_mean']
    assert card['verification']['torchscript']['ok'] and 'covariates' in (tmp_path / 'exp' / 'README.md').read_text()
    from agenb.export import load_exported
    from agenb.predict import read_images
    from agenb.images import Preprocessing, echo_statistics
    from agenb.runs import run_options, run_table
    cfg = json.loads((cov_run / 'config.json').read_text())
    preds = pd.read_csv(cov_run / 'predictions.csv').head(4)
    x = read_images(preds.path, Preprocessing.from_dict(cfg['preprocessing']))[0].float().div(255).numpy()
    rows = run_table(run_options(cov_run), list(preds.path))
    c = np.stack([rows.sex.map({'M': 1.0, 'F': 0.0}).to_numpy(dtype=float), rows.bmi.to_numpy(dtype=float),
                  echo_statistics(preds.path)[:, 0]], 1)
    run = load_exported(tmp_path / 'exp' / 'model.torchscript.pt')
    np.testing.assert_allclose(run(x, c), preds.pred, atol=1e-3)
    assert np.isfinite(run(x, np.full_like(c, np.nan))).all()                          # missing values are imputed inside


def test_statistics_come_from_the_training_split_only(data_args, tmp_path):
    "Changing a test subject's weight (so its BMI) changes its own inputs but nothing about training."
    from agenb.options import resolve_options
    from agenb.trainer import prepare_data
    base = dict(image_dir=data_args[1], excel_path=data_args[3], image_size=32, covariates='sex,bmi,weight', num_workers=1)
    a = prepare_data(resolve_options(base))
    test_subject = a.table.subject[a.idx['test'][0]]
    wb = openpyxl.load_workbook(data_args[3]); ws = wb.active
    hdr = [c.value for c in ws[2]]
    for row in ws.iter_rows(min_row=3):
        if row[0].value is not None and str(row[0].value) == str(test_subject):
            row[hdr.index('Weight (kg)')].value = float(row[hdr.index('Weight (kg)')].value) + 20
    wb.save(tmp_path / 'changed.xlsx')
    b = prepare_data(resolve_options({**base, 'excel_path': str(tmp_path / 'changed.xlsx')}))
    assert (a.split == b.split).all()
    assert a.covariate_stats == b.covariate_stats
    torch.testing.assert_close(a.covariates[a.idx['train']], b.covariates[b.idx['train']])
    mine = torch.from_numpy((a.table.subject == test_subject).to_numpy().copy())
    assert not torch.allclose(a.covariates[mine], b.covariates[mine])                  # the edit did reach the table


def test_bad_covariates_exit_2(data_args, tmp_path):
    base = dict(image_dir='d', excel_path='x')
    from agenb.options import resolve_options
    for value, words in (('sex,age', 'age is the target'), ('bmi,,sex', 'an empty name'), ('bmi,bmi', 'twice')):
        with pytest.raises(InputError, match=words): resolve_options({**base, 'covariates': value})
    no_weight = _rename_header(data_args[3], tmp_path / 'no_weight.xlsx', 'Weight (kg)', 'Remark')
    out = tmp_path / 'runs'
    r = agenb('train', '--image-dir', data_args[1], '--excel-path', no_weight, *ONE, '--no-report', '--output-dir', out,
              '--covariates', 'sex,bmi')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-1500:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith('agenb: error: --covariates bmi:') and 'weight' in line
    assert not out.exists() or not any(out.iterdir())                                  # nothing half-written


def test_any_numeric_spreadsheet_column_is_a_covariate(data_args, tmp_path):
    """`--covariates sex,grip (kg)`: a column agenb does not know, read by its header from the run's spreadsheet for
    training, for run_table (predict_split, export) and for predict; a header that is not there is exit 2 naming it."""
    from agenb.data import load_dataset
    from agenb.model import covariate_inputs
    from agenb.options import resolve_options
    from agenb.runs import run_table
    from agenb.trainer import prepare_data
    t, _ = load_dataset(data_args[1], data_args[3])
    subj = t.drop_duplicates('subject')[['subject', 'age', 'sex']].reset_index(drop=True)
    grip = [np.nan if i % 5 == 0 else round(60 - 0.4 * a + i % 3, 1) for i, a in enumerate(subj.age)]   # every 5th blank
    pd.DataFrame({'ID': subj.subject, 'Age': subj.age, 'Sex': subj.sex, 'Grip (kg)': grip}).to_csv(tmp_path / 'grip.csv', index=False)
    o = resolve_options(dict(image_dir=data_args[1], excel_path=str(tmp_path / 'grip.csv'), image_size=32,
                             covariates='sex,Grip (kg)', num_workers=1))
    d = prepare_data(o)
    by_subject = dict(zip(subj.subject, grip))
    raw = np.stack([d.table.sex.map({'M': 1.0, 'F': 0.0}).to_numpy(dtype=float), d.table.subject.map(by_subject).to_numpy(dtype=float)], 1)
    train = raw[d.idx['train'], 1]
    assert d.covariate_stats['names'] == ['sex', 'grip (kg)'] and d.covariate_stats['median'][1] == np.nanmedian(train)
    torch.testing.assert_close(d.covariates, covariate_inputs(raw, d.covariate_stats))
    rows = run_table(o, list(d.table.path[:5]))
    np.testing.assert_array_equal(rows['grip (kg)'], raw[:5, 1])
    r = agenb('train', '--image-dir', data_args[1], '--excel-path', tmp_path / 'grip.csv', *ONE, '--output-dir', tmp_path / 'runs',
              '--covariates', 'sex,grip')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert "has no covariate column 'grip'; its columns are 'ID', 'Age', 'Sex', 'Grip (kg)'" in r.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / 'runs').glob('run_*/config.json'))


def test_explanations_predict_with_the_images_own_covariates(cov_run):
    """gradcam.csv (written by the trainer's Grad-CAM) predicts each image with its own covariates, as the test did:
    with the covariates held at their training means its predictions, and so its best and worst images, were another's."""
    g = pd.read_csv(cov_run / 'gradcam.csv', dtype={'subject': str})
    p = pd.read_csv(cov_run / 'predictions.csv', dtype={'subject': str})
    m = g.merge(p[['filename', 'pred']], on='filename', suffixes=('', '_run'))
    assert len(m) == len(g) == len(p)
    np.testing.assert_allclose(m['pred'].to_numpy(), m['pred_run'].to_numpy(), atol=1e-4)
