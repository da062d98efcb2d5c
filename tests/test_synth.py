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
    # (pathological muscles look 15 years older by default, and most pathological subjects are adults)
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


# --- the disease's age shift and the covariate effects (generator version 2)

def mask_stats(root, cohort, lat):
    "Mask mean grey and the muscle's thickness in cm (mask rows at the middle column / pixels per cm) per image."
    mg, th = [], []
    for f, depth in zip(lat.filename, lat.depth_cm):
        im = np.asarray(Image.open(root / 'TA' / cohort / 'Images' / f), float)
        mk = np.asarray(Image.open(root / 'TA' / cohort / 'Masks' / f)) > 0
        H = im.shape[0]
        pxcm = (H - max(8, round(H * 0.08))) / depth
        mg.append(im[mk].mean()); th.append(mk[:, mk.shape[1] // 2].sum() / pxcm)
    return np.array(mg), np.array(th)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    "The same subjects (same seed) with the covariate effects on and off; pathological shift 15 and 0."
    base = tmp_path_factory.mktemp('pair')
    out = {}
    for name, kw in (('on', {}), ('off', dict(covariate_effect=False)), ('noshift', dict(pathological_age_shift=0))):
        generate(base / name, preset='test', subjects=80, pathological=30, seed=5, workers=2, **kw)
        lat = pd.read_csv(base / name / 'synth_latents.csv')
        for cohort in ('Healthy', 'Pathological'):
            sel = lat[lat.cohort == cohort].reset_index(drop=True)
            sel['mg'], sel['th'] = mask_stats(base / name, cohort, sel)
            out[name, cohort] = sel
    out['root'] = base
    return out


def test_pathological_muscles_look_shift_years_older(pair):
    h, p = pair['on', 'Healthy'], pair['on', 'Pathological']
    ha, pa = h[h.age >= 18], p[p.age >= 18]
    slope, icpt = np.polyfit(ha.age, ha.mg, 1)                 # healthy adults: grey level per year of age
    assert slope > 0.3 and len(pa) > 40
    excess = pa.mg - (icpt + slope * pa.age)                     # above healthy subjects of the same age
    assert excess.mean() > 0.4 * 15 * slope, (excess.mean(), slope)
    # the same subjects without the shift look like healthy subjects of their age ...
    p0 = pair['noshift', 'Pathological']; p0 = p0[p0.age >= 18]
    assert p0.filename.tolist() == pa.filename.tolist()
    excess0 = p0.mg - (icpt + slope * p0.age)
    assert abs(excess0.mean()) < 0.4 * 15 * slope
    # ... and the shift adds what 15 years of age add to a healthy muscle
    assert 0.7 * 15 * slope < (excess - excess0).mean() < 1.3 * 15 * slope
    on, o0 = pair['on', 'Healthy'], pair['noshift', 'Healthy']
    assert on.filename.tolist() == o0.filename.tolist() and np.allclose(on.mg, o0.mg)   # healthy: untouched
    # recorded: the shift, the muscle's age, the true age in the spreadsheet, the oracle's age gap
    meta = json.loads((pair['root'] / 'on' / 'synth_meta.json').read_text())
    assert meta['pathological_age_shift'] == 15.0 and meta['params']['pathological_age_shift'] == 15.0
    pp = pair['on', 'Pathological']
    assert np.allclose(pp.muscle_age, np.maximum(pp.age + 15, 0), atol=1e-6)
    sheet = pd.read_excel(pair['root'] / 'on' / 'TA' / 'characteristics.xlsx', header=1)
    ages = dict(zip(sheet['Number.1'].dropna().astype(int), sheet['Age.1'].dropna()))
    assert all(ages[s] == a for s, a in zip(pp.subject, pp.age))
    gap = meta['pathological']['TA']['oracle_mean_age_gap']
    assert gap == pytest.approx((pp.oracle_pred - pp.age).mean(), abs=0.01) and 8 < gap < 17


def test_covariates_act_only_when_on(pair):
    from agenb.phantom import bmi_mean, MODEL
    on, off = pair['on', 'Healthy'], pair['off', 'Healthy']
    assert on.filename.tolist() == off.filename.tolist()         # the same subjects and views
    dev = on.bmi - bmi_mean(on.age)
    # the latents: with the effect off, echo does not depend on BMI; on, it moves by bmi_echo per BMI unit
    assert np.allclose(on.echo - off.echo, MODEL['bmi_echo'] * dev, atol=1e-5)
    # the pixels: at a fixed age (same subject), the mask's grey level rises with BMI only when on
    d = on.mg - off.mg
    assert pearsonr(dev, d)[0] > 0.8 and np.polyfit(dev, d, 1)[0] > 0.5
    ad = off[off.age >= 18]
    resid = ad.mg - np.polyval(np.polyfit(ad.age, ad.mg, 1), ad.age)
    ado = on[on.age >= 18]
    resid_on = ado.mg - np.polyval(np.polyfit(ado.age, ado.mg, 1), ado.age)
    dev_ad = ad.bmi - bmi_mean(ad.age)
    assert pearsonr(dev_ad, resid_on)[0] > pearsonr(dev_ad, resid)[0] + 0.1
    # sex: men's muscles thicker than the same muscles with the effect off, women's thinner (adults)
    r = (on.th / off.th)[on.age >= 18]
    men = (on.sex == 'M')[on.age >= 18]
    assert r[men].mean() > 1.03 and r[~men].mean() < 0.97
    kids = (on.age < 9).to_numpy()
    assert np.allclose(on.thickness_cm[kids], off.thickness_cm[kids])   # before puberty: no sex difference
    # recorded, and the oracle that knows sex and BMI is the lower floor
    m_on = json.loads((pair['root'] / 'on' / 'synth_meta.json').read_text())
    m_off = json.loads((pair['root'] / 'off' / 'synth_meta.json').read_text())
    assert m_on['covariate_effects']['on'] and m_on['covariate_effects']['bmi_echo'] == MODEL['bmi_echo']
    assert not m_off['covariate_effects']['on'] and m_off['covariate_effects']['bmi_echo'] == 0
    assert 'BMI' in m_on['covariate_effects']['echo'] and m_on['params']['covariate_effect'] is True
    assert m_on['oracle_mae_with_covariates'] < m_on['oracle_mae']
    assert m_on['oracle_mae'] == pytest.approx(np.abs(on.oracle_pred - on.age).mean(), abs=1e-3)


def test_cli_reuse(tmp_path):
    d = tmp_path / 'demo'
    r = run(d, '--preset', 'test', '--subjects', '5', '--pathological', '1', '--reuse')
    assert r.returncode == 0 and f'generating {d}: no data there yet' in r.stdout, r.stderr
    r = run(d, '--preset', 'test', '--subjects', '5', '--pathological', '1', '--reuse')
    assert r.returncode == 0 and f'using {d}' in r.stdout
    r = run(d, '--preset', 'test', '--subjects', '5', '--pathological', '1', '--pathological-age-shift', '20',
            '--no-covariate-effect', '--reuse')
    assert r.returncode == 0
    assert f'regenerating {d}: written with covariate_effect=True, pathological_age_shift=15.0' in r.stdout
    meta = json.loads((d / 'synth_meta.json').read_text())
    assert meta['pathological_age_shift'] == 20.0 and meta['covariate_effects']['on'] is False
    r = run(d, '--preset', 'test', '--reuse', '--overwrite')
    assert r.returncode == 2 and 'not allowed with' in r.stderr
