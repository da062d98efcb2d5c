"""Integration tests of the synthetic data generator (`python -m agenb.synth`)."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image
from scipy.stats import pearsonr, skew

from agenb.synth import generate, HEADERS

ARGS = ['--preset', 'test', '--subjects', '60', '--pathological', '8', '--seed', '3']


def run(*args):
    return subprocess.run([sys.executable, '-m', 'agenb.synth', *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp('synth') / 'data'
    r = run(d, *ARGS)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope='module')
def stats(ds):
    "Per-image mean grey and skewness inside the mask, with age and subject, for the healthy cohort."
    lat = pd.read_csv(ds / 'synth_latents.csv')
    lat = lat[lat.cohort == 'Healthy'].copy()
    mg, sk = [], []
    for f in lat.filename:
        im = np.asarray(Image.open(ds / 'TA/Healthy/Images' / f), float)
        mk = np.asarray(Image.open(ds / 'TA/Healthy/Masks' / f)) > 0
        mg.append(im[mk].mean()); sk.append(skew(im[mk]))
    lat['mg'], lat['sk'] = mg, sk
    return lat


def test_layout_and_counts(ds):
    meta = json.loads((ds / 'synth_meta.json').read_text())
    c = meta['counts']['TA']
    assert (c['Healthy']['subjects'], c['Pathological']['subjects']) == (60, 8)
    for cohort in ('Healthy', 'Pathological'):
        imgs = sorted(p.name for p in (ds / 'TA' / cohort / 'Images').iterdir())
        masks = sorted(p.name for p in (ds / 'TA' / cohort / 'Masks').iterdir())
        assert imgs == masks and len(imgs) == c[cohort]['images']
        assert all(n.startswith('anon_') and n.endswith('.png') for n in imgs)
    with Image.open(sorted((ds / 'TA/Healthy/Images').iterdir())[0]) as im:
        assert im.mode == 'L' and im.size == (104, 96)
    assert sorted(p.name for p in ds.iterdir()) == ['TA', 'synth_latents.csv', 'synth_meta.json']
    assert sorted(p.name for p in (ds / 'TA').iterdir()) == ['Healthy', 'Pathological', 'characteristics.xlsx']


def test_some_subjects_have_fewer_images(ds):
    names = [p.name for p in (ds / 'TA/Healthy/Images').iterdir()]
    per = pd.Series([n.split('_')[1] for n in names]).value_counts()
    assert (per == 3).mean() > 0.8 and (per < 3).sum() >= 1


def test_xlsx_real_format(ds):
    wb = load_workbook(ds / 'TA/characteristics.xlsx')
    assert wb.sheetnames == ['Blad1']
    ws = wb['Blad1']
    assert ws['A1'].value == 'Healthy' and ws['G1'].value == 'Pathological' and ws['F1'].value is None
    assert [ws.cell(2, c).value for c in range(1, 6)] == HEADERS
    assert [ws.cell(2, c).value for c in range(7, 12)] == HEADERS
    n_h = sum(1 for r in range(3, ws.max_row + 1) if ws.cell(r, 1).value is not None)
    n_p = sum(1 for r in range(3, ws.max_row + 1) if ws.cell(r, 7).value is not None)
    assert (n_h, n_p) == (60, 8)               # blocks of different lengths
    assert all(ws.cell(r, 6).value is None for r in range(1, ws.max_row + 1))
    ages = [ws.cell(r, 2).value for r in range(3, 3 + n_h)]
    assert min(ages) >= 0 and max(ages) <= 90 and min(ages) < 18 < max(ages)
    assert {ws.cell(r, 5).value for r in range(3, 3 + n_h)} <= {'M', 'F'}
    # file numbers join the Number column
    nums = {str(ws.cell(r, 1).value) for r in range(3, 3 + n_h)}
    files = {p.name.split('_')[1] for p in (ds / 'TA/Healthy/Images').iterdir()}
    assert files == nums


def test_deterministic_byte_identical(ds, tmp_path):
    # the same seed in another folder, in-process and serial (the fixture ran the CLI with parallel workers)
    meta = generate(tmp_path / 'again', preset='test', subjects=60, pathological=8, seed=3, workers=1)
    files = sorted(p.relative_to(ds) for p in ds.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / 'again') for p in (tmp_path / 'again').rglob('*') if p.is_file())
    for f in files:
        if f.name == 'synth_meta.json': continue
        assert (ds / f).read_bytes() == (tmp_path / 'again' / f).read_bytes(), f
    m1 = json.loads((ds / 'synth_meta.json').read_text()); m1.pop('seconds'); meta.pop('seconds')
    assert m1 == json.loads(json.dumps(meta))
    # and another seed gives other images
    generate(tmp_path / 'other', preset='test', subjects=5, pathological=0, seed=4, workers=1)
    a = sorted((ds / 'TA/Healthy/Images').iterdir())[0].read_bytes()
    assert all(p.read_bytes() != a for p in (tmp_path / 'other/TA/Healthy/Images').iterdir())


def test_echo_rises_and_skewness_falls_with_adult_age(stats):
    ad = stats[stats.age >= 18]
    assert len(ad) > 60
    assert pearsonr(ad.age, ad.mg)[0] > 0.4
    assert pearsonr(ad.age, ad.sk)[0] < -0.4


def test_images_of_a_subject_are_correlated_not_identical(stats, ds):
    g = stats.groupby('subject').mg
    within = (g.max() - g.min())[g.size() > 1].mean() / 2   # mean |difference| scale within subjects
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(stats), (2, 2000))
    keep = stats.subject.values[i] != stats.subject.values[j]
    between = np.abs(stats.mg.values[i] - stats.mg.values[j])[keep].mean()
    assert within < 0.6 * between
    # but the views are different images
    a = np.asarray(Image.open(ds / 'TA/Healthy/Images' / stats.filename.iloc[0]), float)
    b = np.asarray(Image.open(ds / 'TA/Healthy/Images' / stats.filename.iloc[1]), float)
    assert stats.subject.iloc[0] == stats.subject.iloc[1] and np.abs(a - b).mean() > 5


def test_pathological_is_brighter(ds, stats):
    vals = []
    for f in (ds / 'TA/Pathological/Images').iterdir():
        im = np.asarray(Image.open(f), float)
        mk = np.asarray(Image.open(ds / 'TA/Pathological/Masks' / f.name)) > 0
        vals.append(im[mk].mean())
    assert np.mean(vals) > stats[stats.age >= 18].mg.mean()


def test_oracle_recorded_and_honest(ds):
    meta = json.loads((ds / 'synth_meta.json').read_text())
    lat = pd.read_csv(ds / 'synth_latents.csv')
    h = lat[lat.cohort == 'Healthy']
    assert meta['oracle_mae'] == pytest.approx(np.abs(h.oracle_pred - h.age).mean(), abs=1e-3)
    assert 1 < meta['oracle_mae'] < 10
    assert meta['oracle_mae_with_label'] == meta['oracle_mae']   # no label shortcut by default
    assert meta['params']['label_age_shortcut'] == 0 and meta['seed'] == 3


def test_label_shortcut_recorded_and_lowers_the_floor(tmp_path):
    m = generate(tmp_path / 's', preset='test', subjects=20, pathological=0, label_age_shortcut=0.9, workers=1)
    assert m['params']['label_age_shortcut'] == 0.9
    assert m['oracle_mae_with_label'] < m['oracle_mae']


def test_cli_errors(tmp_path, ds):
    r = run(ds, *ARGS)                      # not empty
    assert r.returncode == 2 and 'not empty' in r.stderr and 'Traceback' not in r.stderr
    r = run(tmp_path / 'x', '--preset', 'test', '--label-age-shortcut', '2')
    assert r.returncode == 2 and 'between 0 and 1' in r.stderr
    r = run(tmp_path / 'y', '--preset', 'nope')
    assert r.returncode == 2
