"""python -m agenb.agegap on a tiny run trained on the Healthy cohort of synthetic data whose Pathological muscles
look a known number of years older (agenb.synth --pathological-age-shift): the effect is found, no effect is not
invented, the correction is the run's own, and the healthy comparison group is the run's test subjects only."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import agenb
from agenb.core import InputError, file_sha256
from agenb.agegap import main
from agenb.report import external_refs

SHIFT = 25.0   # large: a 6-epoch 48 px model is weak, the effect must stand out of its noise
SYNTH = ['--subjects', '80', '--pathological', '30', '--size', '48', '56']
TRAIN = ['--arch', 'resnet18', '--no-pretrained', '--image-size', '48', '--epochs', '6', '--batch-size', '16',
         '--lr', '1e-3', '--warmup-epochs', '1', '--num-workers', '2', '--gradcam-n', '0', '--no-report',
         '--test-size', '0.3', '--val-size', '0.2']   # 24 healthy test subjects (the statistics want >= 20), 16 val
RUN_FILES = ('config.json', 'metrics.json', 'predictions.csv', 'split.csv', 'best_model.pth', 'scatter.png')


def _synth(root, shift):
    r = agenb('synth', root, *SYNTH, '--pathological-age-shift', shift)
    assert r.returncode == 0, r.stderr[-2000:]
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "Two data sets with the same seed: Pathological muscles SHIFT years older, and no older at all."
    base = tmp_path_factory.mktemp('agegap_data')
    return {s: _synth(base / f'shift{s:g}', s) for s in (SHIFT, 0.0)}


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    "A tiny run trained on the Healthy cohort of the shifted data set, with a stand-in report.html."
    d = data[SHIFT]
    r = agenb('train', '--image-dir', d / 'TA' / 'Healthy' / 'Images', '--excel-path', d / 'TA' / 'characteristics.xlsx',
              *TRAIN, '--output-dir', tmp_path_factory.mktemp('agegap_runs'))
    assert r.returncode == 0, r.stderr[-3000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    (run / 'report.html').write_text('<html>rendered before the age gap</html>')
    return run


@pytest.fixture(scope='module')
def gap(run, data):
    "agenb.agegap into the default folder RUN/agegap: (its agegap.json, agegap.csv, CompletedProcess, run files' hashes before)."
    before = {f: file_sha256(run / f) for f in RUN_FILES}
    r = agenb('agegap', run, '--image-dir', data[SHIFT] / 'TA' / 'Pathological' / 'Images')
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / 'agegap'
    return json.loads((out / 'agegap.json').read_text()), pd.read_csv(out / 'agegap.csv', dtype={'subject': str}), r, before


@pytest.fixture(scope='module')
def two(run, data, tmp_path_factory):
    "Two cohorts in one call, each with its own spreadsheet: shifted and not shifted."
    out = tmp_path_factory.mktemp('agegap_two')
    args = []
    for s in (SHIFT, 0.0): args += ['--image-dir', data[s] / 'TA' / 'Pathological' / 'Images']
    for s in (SHIFT, 0.0): args += ['--excel-path', data[s] / 'TA' / 'characteristics.xlsx']
    r = agenb('agegap', run, *args, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / 'agegap.json').read_text())


def test_known_shift_is_found(gap, data):
    result, subjects, r, _ = gap
    shift = json.loads((data[SHIFT] / 'synth_meta.json').read_text())['pathological_age_shift']
    assert shift == SHIFT
    g = result['groups']
    assert result['measure'] == 'gap_corrected'
    # A tiny model regresses to the mean; the run's validation-fitted correction undoes most of it.
    assert abs(g['Pathological']['mean_gap_corrected'] - shift) < 10, g['Pathological']
    assert abs(g['Healthy test']['mean_gap_corrected']) < 6, g['Healthy test']
    c = result['comparisons']['Pathological']['corrected']
    assert c['difference_ci'][0] > 5 and c['auc'] > 0.75 and c['auc_ci'][0] > 0.5 and c['p_value'] < 0.01, c
    assert c['cohens_d_ci'][0] < c['cohens_d'] < c['cohens_d_ci'][1]
    assert result['comparisons']['Pathological']['age_adjusted']['ci'][0] > 0
    assert 'Pathological vs Healthy test' in r.stdout and 'AUC' in r.stdout
    # the table says the same as the statistics
    p = subjects[subjects.group == 'Pathological']
    assert len(p) == g['Pathological']['n_subjects'] == 30
    np.testing.assert_allclose(p.gap_corrected.mean(), g['Pathological']['mean_gap_corrected'], atol=1e-9)
    np.testing.assert_allclose(p.gap_corrected, p.corrected - p.age, atol=1e-9)


def test_no_shift_no_separation(two):
    assert list(two['comparisons']) == ['Pathological (shift25/TA)', 'Pathological (shift0/TA)']
    c = two['comparisons']['Pathological (shift0/TA)']['corrected']
    assert abs(c['auc'] - 0.5) < 0.2 and c['auc_ci'][0] < 0.5 < c['auc_ci'][1], c
    assert c['difference_ci'][0] < 0 < c['difference_ci'][1]
    assert two['comparisons']['Pathological (shift25/TA)']['corrected']['auc'] > 0.75


def test_correction_is_the_runs_validation_fit(run, gap, data, tmp_path):
    "The run's coefficients are used as they are: one patient's age changes that patient's gap and nothing else."
    result, subjects, _, _ = gap
    bc = json.loads((run / 'metrics.json').read_text())['bias_correction']
    assert result['bias_correction'] == bc and bc['fitted_on'] == 'val' and bc['applied']
    from openpyxl import load_workbook
    xlsx = tmp_path / 'TA' / 'characteristics.xlsx'
    xlsx.parent.mkdir()
    wb = load_workbook(data[SHIFT] / 'TA' / 'characteristics.xlsx')
    ws = wb.worksheets[0]
    assert ws['G1'].value == 'Pathological' and ws['H2'].value == 'Age'
    who, ws['H3'] = str(ws['G3'].value), ws['H3'].value + 7.0
    wb.save(xlsx)
    r = agenb('agegap', run, '--image-dir', data[SHIFT] / 'TA' / 'Pathological' / 'Images', '--excel-path', xlsx,
              '--out', tmp_path / 'out', '--no-run-report')
    assert r.returncode == 0, r.stderr[-3000:]
    new = pd.read_csv(tmp_path / 'out' / 'agegap.csv', dtype={'subject': str})
    assert json.loads((tmp_path / 'out' / 'agegap.json').read_text())['bias_correction'] == bc
    key = ['group', 'subject']
    m = subjects.merge(new, on=key, suffixes=('', '_new'))
    assert len(m) == len(subjects) == len(new)
    changed = (m.group == 'Pathological') & (m.subject == who)
    assert changed.sum() == 1
    np.testing.assert_allclose(m.gap_corrected_new - m.gap_corrected, np.where(changed, -7.0, 0.0), atol=1e-9)
    np.testing.assert_allclose(m.gap_new - m.gap, np.where(changed, -7.0, 0.0), atol=1e-9)
    np.testing.assert_allclose(m.corrected_new, m.corrected, atol=1e-9)


def test_healthy_group_is_the_test_split_only(run, gap):
    _, subjects, _, _ = gap
    split = pd.read_csv(run / 'split.csv', dtype={'subject': str})
    healthy = set(subjects.loc[subjects.group == 'Healthy test', 'subject'])
    assert healthy == set(split.loc[split.split == 'test', 'subject'])
    assert not healthy & set(split.loc[split.split != 'test', 'subject'])


def test_a_training_subject_in_predictions_is_refused(run, data, tmp_path):
    bad = tmp_path / 'run'
    bad.mkdir()
    for f in ('config.json', 'metrics.json', 'split.csv', 'best_model.pth'): shutil.copy(run / f, bad / f)
    split = pd.read_csv(run / 'split.csv', dtype={'subject': str})
    pred = pd.read_csv(run / 'predictions.csv', dtype={'subject': str})
    tr = split[split.split == 'train'].iloc[:1]
    pd.concat([pred, tr.assign(pred=40.0)[['path', 'filename', 'subject', 'age', 'pred']]]).to_csv(bad / 'predictions.csv', index=False)
    with pytest.raises(InputError, match=rf'does not put in test: {tr.subject.iloc[0]} \(train\)'):
        main([str(bad), '--image-dir', str(data[SHIFT] / 'TA' / 'Pathological' / 'Images'), '--out', str(tmp_path / 'o')])


def test_cohort_without_spreadsheet_block_is_exit_2(run, data, tmp_path):
    d = tmp_path / 'TA' / 'Mystery' / 'Images'
    d.mkdir(parents=True)
    for p in sorted((data[SHIFT] / 'TA' / 'Pathological' / 'Images').glob('*.png'))[:3]: shutil.copy(p, d / p.name)
    r = agenb('agegap', run, '--image-dir', d, '--excel-path', data[SHIFT] / 'TA' / 'characteristics.xlsx',
              '--out', tmp_path / 'out')
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:') and 'Mystery' in lines[0], r.stderr
    assert not (tmp_path / 'out' / 'agegap.json').exists()


def test_refusals(run, data, tmp_path):
    healthy = str(data[SHIFT] / 'TA' / 'Healthy' / 'Images')
    with pytest.raises(InputError, match='used by the run'):       # the run's own images are no clinical cohort
        main([str(run), '--image-dir', healthy, '--out', str(tmp_path / 'o')])
    patho = str(data[SHIFT] / 'TA' / 'Pathological' / 'Images')
    with pytest.raises(InputError, match='the run folder itself'):
        main([str(run), '--image-dir', patho, '--out', str(run)])
    with pytest.raises(InputError, match='--excel-path was given 2 times for 3 --image-dir'):
        main([str(run), '--image-dir', patho, '--image-dir', patho, '--image-dir', patho,
              '--excel-path', 'a.xlsx', '--excel-path', 'b.xlsx'])


def test_outputs_and_the_runs_files(run, gap):
    result, _, r, before = gap
    out = run / 'agegap'
    for f in ('agegap.csv', 'agegap_images.csv', 'agegap.json', 'agegap.html', 'gap_vs_age.png', 'gap_distribution.png', 'roc.png'):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert {f: file_sha256(run / f) for f in RUN_FILES} == before      # the run's own files are untouched
    page = (out / 'agegap.html').read_text()
    assert external_refs(page) == [] and 'Age gap: ' + run.name in page and "Cohen's d" in page
    imgs = pd.read_csv(out / 'agegap_images.csv', dtype={'subject': str})
    assert len(imgs) == result['cohorts'][0]['n_images'] and imgs['pred'].notna().all()
    assert result['run']['checkpoint'] == 'best_model.pth' and result['train_ages'][0] <= result['train_ages'][1]
    # the run's report was rendered again, now with a link to the page (its one reference outside the file)
    report = (run / 'report.html').read_text()
    assert 'href="agegap/agegap.html"' in report and external_refs(report) == ['agegap/agegap.html']
    assert 'linked from' in r.stdout


def test_a_copy_of_the_runs_own_images_is_refused(tiny_run, synth_root, tmp_path):
    """Issue 29: the run's healthy images copied byte for byte into another folder, with the same spreadsheet, are no
    clinical cohort (their bytes and their spreadsheet rows are the run's); nor is a cohort with one such image."""
    before = {p.name: file_sha256(p) for p in tiny_run.iterdir() if p.is_file()}
    copy = tmp_path / 'copy' / 'TA'
    shutil.copytree(synth_root / 'TA' / 'Healthy' / 'Images', copy / 'Healthy' / 'Images')
    shutil.copy(synth_root / 'TA' / 'characteristics.xlsx', copy / 'characteristics.xlsx')
    r = agenb('agegap', tiny_run, '--image-dir', copy / 'Healthy' / 'Images', '--out', tmp_path / 'out')
    split = pd.read_csv(tiny_run / 'split.csv')
    n, subjects = len(split), split.subject.nunique()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    for needle in ('agenb: error: cohort folder', f'{n} of its images are byte-identical to images the run used',
                   f"{subjects} of its subjects are the run's (the same rows: spreadsheet sha256", 'block Healthy',
                   'an age gap needs a cohort the run never saw'):
        assert needle in lines[0], (needle, lines[0])
    # partial: a Pathological cohort with one of its images replaced by the bytes of a training image
    shutil.copytree(synth_root / 'TA' / 'Pathological' / 'Images', copy / 'Pathological' / 'Images')
    train = pd.read_csv(tiny_run / 'split.csv').query('split == "train"').iloc[0]
    victim = sorted((copy / 'Pathological' / 'Images').glob('*.png'))[0]
    shutil.copy(train.path, victim)
    r = agenb('agegap', tiny_run, '--image-dir', copy / 'Pathological' / 'Images', '--out', tmp_path / 'out')
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert f'1 of its images are byte-identical to images the run used ({victim.name} = {train.filename} (train))' in lines[0]
    assert "of its subjects are the run's" not in lines[0]             # another block: its IDs are other persons
    assert not (tmp_path / 'out').exists()
    assert {p.name: file_sha256(p) for p in tiny_run.iterdir() if p.is_file()} == before
