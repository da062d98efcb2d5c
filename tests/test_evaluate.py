"Integration tests of agenb.evaluate: the command line on prediction files, bad files, and RUN_DIR mode."
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agenb import evaluate as ev
from conftest import in_process

PLOTS = ['scatter.png', 'error_hist.png', 'bland_altman.png', 'mae_by_age.png', 'residual_vs_age.png']


def cli(*args, cwd=None):
    return in_process('evaluate', *args, cwd=cwd)


def fake_preds(n_subj, seed, imgs=(3, 2, 1), shrink=0.6):
    "Prediction table like predict_split's: uneven images per subject, predictions shrunk toward 50."
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subj):
        age = round(float(rng.uniform(5, 90)), 1)
        for k in range(imgs[i % len(imgs)]):
            rows.append({'path': f'/data/anon_{i}_{k + 1}.png', 'filename': f'anon_{i}_{k + 1}.png', 'subject': str(i),
                         'age': age, 'pred': shrink * age + (1 - shrink) * 50 + rng.normal(0, 2)})
    return pd.DataFrame(rows)


def test_predictions_csv_cli(tmp_path):
    # hand-checkable: errors +2, -2, +3, 0 over subjects 1 (2 images) and 2 (2 images)
    p = tmp_path / 'preds.csv'
    p.write_text('image,target,prediction\nanon_1_1.png,10,12\nanon_1_2.png,10,8\nanon_2_1.png,30,33\nanon_2_2.png,30,30\n')
    r = cli('--predictions', p, '--out', tmp_path / 'out', '--train-mean-age', '25')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert m['n_images'] == 4 and m['n_subjects'] == 2
    assert m['overall']['mae'] == pytest.approx(1.75)
    assert m['overall']['bias'] == pytest.approx(0.75)
    assert m['subject_level']['mae'] == pytest.approx((0 + 1.5) / 2)   # subject means 10 and 31.5
    assert m['baseline']['mae'] == pytest.approx(10.0) and m['baseline']['train_mean_age'] == 25
    assert m['corrected'] is None and 'no validation' in m['bias_correction']['reason']
    assert m['overall_metrics']['Accuracy_5years'] == pytest.approx(100.0)
    assert [g['age_range'] for g in m['age_group_analysis']] == ['10-20', '30-40']
    assert m['age_group_analysis'][0]['mean_pred_age'] == pytest.approx(10.0)
    for f in ['predictions.csv', 'subject_predictions.csv', *PLOTS]:
        assert (tmp_path / 'out' / f).stat().st_size > 0, f
    pc = pd.read_csv(tmp_path / 'out' / 'predictions.csv')
    assert list(pc.columns[:5]) == ['path', 'filename', 'subject', 'age', 'pred']
    assert list(pc['error']) == [2.0, -2.0, 3.0, 0.0]
    assert 'MAE 1.75' in r.stdout


def test_legacy_json_cli_with_val(tmp_path):
    test, val = fake_preds(12, 1), fake_preds(10, 2)
    for name, df in [('test.json', test), ('val.json', val)]:
        (tmp_path / name).write_text(json.dumps({'predictions': df['pred'].tolist(), 'targets': df['age'].tolist(),
                                                 'filenames': df['filename'].tolist()}))
    r = cli('--predictions', tmp_path / 'test.json', '--val-predictions', tmp_path / 'val.json', '--out', tmp_path / 'o')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
    assert m['n_subjects'] == 12 and m['subject_level']['n'] == 12
    bc = m['bias_correction']
    assert bc['applied'] and bc['fitted_on'] == 'val' and bc['n'] == len(val)
    assert bc['a'] == pytest.approx(0.6, abs=0.1)
    assert m['corrected']['mae'] < m['overall']['mae']            # raw and corrected both reported
    assert m['overall']['slope'] < 0.75 and m['corrected']['slope'] == pytest.approx(1.0, abs=0.15)
    pc = pd.read_csv(tmp_path / 'o' / 'predictions.csv')
    np.testing.assert_allclose(pc['corrected'], (test['pred'] - bc['b']) / bc['a'])


@pytest.mark.parametrize('name,content,msg', [
    ('missing.csv', None, 'does not exist'),
    ('cols.csv', 'x,y\n1,2\n', '--true-col'),
    ('text.csv', 'age,pred\n30,31\n40,forty\n', "row 2 is 'forty'"),
    ('nan.csv', 'age,pred\n30,31\n,41\n', 'row 2'),
    ('empty.csv', '', 'cannot be read as CSV'),
    ('header.csv', 'age,pred\n', 'no predictions'),
    ('broken.json', '{"predictions": [1, 2', 'not valid JSON'),
    ('uneven.json', '{"predictions": [1, 2], "targets": [1], "filenames": ["a", "b"]}', 'different lengths'),
    ('scalar.json', '42', 'parallel lists'),
])
def test_bad_prediction_files(tmp_path, name, content, msg):
    p = tmp_path / name
    if content is not None: p.write_text(content)
    r = cli('--predictions', p, '--out', tmp_path / 'o')
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith('agenb: error:') and msg in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'o' / 'metrics.json').exists()


def test_cli_argument_errors(tmp_path):
    r = cli('--predictions', tmp_path / 'x.csv')
    assert r.returncode == 2 and '--out' in r.stderr
    r = cli(tmp_path)                                              # not a run folder
    assert r.returncode == 2 and 'no split.csv' in r.stderr and 'Traceback' not in r.stderr


def test_bias_correction_fitted_on_val_only(monkeypatch):
    test, val = fake_preds(15, 3), fake_preds(10, 4)
    seen = []
    real = ev.fit_bias_correction
    def spy(t, p, **kw):
        seen.append((np.asarray(t, float).copy(), np.asarray(p, float).copy())); return real(t, p, **kw)
    monkeypatch.setattr(ev, 'fit_bias_correction', spy)
    m1, d1, _ = ev._evaluate(test, val)
    changed = test.assign(age=test['age'][::-1].to_numpy() + 11.0)   # other test labels
    m2, d2, _ = ev._evaluate(changed, val)
    assert len(seen) == 2
    for t, p in seen:                                              # the fit only ever saw validation data
        np.testing.assert_array_equal(t, val['age'].to_numpy()); np.testing.assert_array_equal(p, val['pred'].to_numpy())
    assert m1['bias_correction'] == m2['bias_correction']
    np.testing.assert_allclose(d1['corrected'], d2['corrected'])
    assert m1['corrected']['mae'] != m2['corrected']['mae']       # metrics do use the (changed) labels


def test_refused_correction_is_recorded():
    test = fake_preds(6, 5)
    val = fake_preds(6, 6).assign(pred=lambda d: 50 - 0.3 * d['age'])   # negative slope
    m = ev.evaluate_predictions(test, val)
    assert not m['bias_correction']['applied'] and 'below' in m['bias_correction']['reason']
    assert m['corrected'] is None and m['corrected_subject_level'] is None and m['overall'] is not None


def test_subject_level_uneven():
    "Per-subject mean (not median, not first image): subject b's images 41, 42, 52 average 45, their median is 42."
    df = pd.DataFrame({'subject': ['b', 'a', 'b', 'c', 'a', 'b', 'a'], 'age': [40.0, 20, 40, 60, 20, 40, 20],
                       'pred': [41.0, 25, 42, 50, 19, 52, 28]})
    s = ev.subject_level(df).set_index('subject')
    assert list(s.index) == ['b', 'a', 'c']
    assert s.loc['b', 'pred'] == 45.0 and s.loc['a', 'pred'] == 24.0 and s.loc['c', 'pred'] == 50.0
    assert list(s['n_images']) == [3, 3, 1]
    assert s.loc['b', 'pred_sd'] == pytest.approx(np.std([41, 42, 52], ddof=1)) and np.isnan(s.loc['c', 'pred_sd'])
    m = ev.evaluate_predictions(df)
    assert m['n_subjects'] == 3 and m['subject_level']['mae'] == pytest.approx((5 + 4 + 10) / 3)
    assert m['overall']['mae'] == pytest.approx((1 + 5 + 2 + 10 + 1 + 12 + 8) / 7)


def _fake_run(tmp_path):
    run = tmp_path / 'run_20260101_000000'
    run.mkdir()
    parts = {'train': fake_preds(20, 7), 'val': fake_preds(8, 8), 'test': fake_preds(10, 9)}
    split = pd.concat([d.assign(split=s) for s, d in parts.items()])
    split[['path', 'filename', 'subject', 'age', 'split']].to_csv(run / 'split.csv', index=False)
    return run, parts


@pytest.mark.parametrize('which', ['test', 'val'])
def test_run_dir_mode(tmp_path, monkeypatch, capsys, which):
    run, parts = _fake_run(tmp_path)
    calls = []
    def fake_predict(run_dir, split='test', device='cpu'):
        calls.append(split); return parts[split].assign(split=split)
    monkeypatch.setattr(ev, 'predict_split', fake_predict)   # the name evaluate calls
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    m = ev.main([str(run), '--split', which])
    (out,) = (run / 'evaluations').iterdir()                       # a new folder of the evaluate command's own
    assert out.name.startswith(f'{which}_')
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['overall']['mae'] == pytest.approx(m['overall']['mae'])
    assert saved['n_images'] == len(parts[which])
    assert saved['baseline']['train_mean_age'] == pytest.approx(parts['train']['age'].mean())
    for f in PLOTS: assert (out / f).exists()
    if which == 'test':
        assert calls == ['test', 'val'] and saved['bias_correction']['applied']
        assert saved['bias_correction']['n'] == len(parts['val'])  # fitted on the validation predictions
    else:
        assert calls == ['val'] and saved['corrected'] is None
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before   # the run's own files untouched
    assert 'MAE' in capsys.readouterr().out


# ---------------------------------------------------------------- every number of metrics.json, against a hand computation
def test_regression_metrics_by_hand():
    from scipy.stats import linregress, pearsonr
    t, p = np.array([10.0, 20, 30, 40, 50]), np.array([15.0, 14, 30, 52, 50])
    e = p - t                                                         # 5, -6, 0, 12, 0
    m = ev.regression_metrics(t, p)
    sd = np.std(e, ddof=1)
    fit = linregress(t, p)
    want = {'n': 5, 'mae': 23 / 5, 'rmse': np.sqrt((25 + 36 + 144) / 5), 'median_ae': 5.0, 'max_ae': 12.0,
            'r2': 1 - 205 / 1000, 'pearson_r': pearsonr(t, p).statistic, 'bias': 11 / 5, 'sd_error': sd,
            'loa_lower': 11 / 5 - 1.96 * sd, 'loa_upper': 11 / 5 + 1.96 * sd, 'slope': fit.slope, 'intercept': fit.intercept,
            'delta_age_corr': pearsonr(e, t).statistic, 'mean_true': 30.0, 'mean_pred': 32.2,
            'acc_5y': 3 / 5, 'acc_10y': 4 / 5, 'acc_15y': 1.0}              # within 5 years: |5| counts, |6| does not
    assert set(m) == set(want)
    for k, v in want.items(): assert m[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_regression_metrics_undefined_parts_are_nan():
    one = ev.regression_metrics([30.0], [33.0])
    assert (one['n'], one['mae'], one['bias'], one['max_ae']) == (1, 3.0, 3.0, 3.0)
    for k in ('sd_error', 'loa_lower', 'loa_upper', 'slope', 'intercept', 'pearson_r', 'r2', 'delta_age_corr'):
        assert np.isnan(one[k]), k
    same_age = ev.regression_metrics([30.0, 30.0, 30.0], [29.0, 31.0, 33.0])
    assert np.isnan(same_age['slope']) and np.isnan(same_age['r2']) and np.isnan(same_age['pearson_r'])
    assert same_age['sd_error'] == pytest.approx(2.0) and same_age['bias'] == pytest.approx(1.0)
    const_pred = ev.regression_metrics([10.0, 20.0], [15.0, 15.0])
    assert np.isnan(const_pred['pearson_r']) and const_pred['slope'] == pytest.approx(0.0) and const_pred['r2'] == pytest.approx(0.0)


@pytest.mark.parametrize('t,p,msg', [([1, 2], [1], '2 true ages but 1 predictions'), ([], [], '0 rows'),
                                     ([1, np.nan, 3], [1, 2, 3], 'first at row 1'), ([1, 2], [1, np.inf], '1 of 2 rows'),
                                     (['a'], [1], 'must be numbers'), ([1], ['a'], 'must be numbers')])
def test_bad_arrays(t, p, msg):
    from agenb.core import InputError
    with pytest.raises(InputError, match=msg): ev.regression_metrics(t, p)


def test_age_groups_by_hand():
    g = ev.age_group_table([19.9, 20.0, 29.9, 45.0], [21.9, 17.0, 29.9, 40.0], bin_width=10)
    assert list(g.age_range) == ['10-20', '20-30', '40-50'] and list(g['count']) == [1, 2, 1]
    assert list(g.start_age) == [10.0, 20.0, 40.0] and list(g.end_age) == [20.0, 30.0, 50.0]
    r = g.iloc[1]                                                     # errors -3 and 0
    assert (r.mae, r.bias, r.mean_true, r.mean_pred) == pytest.approx((1.5, -1.5, 24.95, 23.45))
    assert r.rmse == pytest.approx(np.sqrt(4.5)) and g.iloc[0].mae == pytest.approx(2.0)
    assert list(ev.age_group_table([2.0, 6.0], [2.0, 6.0], bin_width=2.5).age_range) == ['0-2.5', '5-7.5']
    from agenb.core import InputError
    for bad in (0, -5, None):
        with pytest.raises(InputError, match='bin width'): ev.age_group_table([1.0], [1.0], bin_width=bad)


def test_bias_correction_fit_and_refusals():
    t = np.array([10.0, 20, 30, 40])
    coef = ev.fit_bias_correction(t, 0.5 * t + 20)
    assert coef['applied'] and (coef['a'], coef['b'], coef['n'], coef['fitted_on']) == pytest.approx((0.5, 20.0, 4, 'val'))
    np.testing.assert_allclose(ev.apply_bias_correction([25.0, 45.0], coef), [10.0, 50.0])
    assert ev.fit_bias_correction(t, 0.1 * t + 20)['applied']          # exactly the minimum slope is accepted
    low = ev.fit_bias_correction(t, 0.09 * t + 20)
    assert not low['applied'] and 'below 0.1' in low['reason'] and low['a'] == pytest.approx(0.09)
    with pytest.raises(ValueError, match='not fitted'): ev.apply_bias_correction([1.0], low)
    assert ev.fit_bias_correction(t, 0.3 * t, min_slope=0.5)['applied'] is False
    two = ev.fit_bias_correction([10.0, 20.0], [15.0, 25.0])
    assert not two['applied'] and 'only 2' in two['reason'] and np.isnan(two['a'])
    assert ev.fit_bias_correction([10.0, 20.0, 30.0], [15.0, 25.0, 35.0])['applied']       # 3 are enough
    flat = ev.fit_bias_correction([30.0] * 4, [1.0, 2, 3, 4])
    assert not flat['applied'] and 'all equal' in flat['reason']


def test_evaluate_by_hand():
    test = pd.DataFrame({'filename': ['a_1', 'a_2', 'b_1', 'c_1'], 'subject': ['a', 'a', 'b', 'c'],
                         'age': [10.0, 10.0, 30.0, 50.0], 'pred': [14.0, 20.0, 30.0, 41.0]})
    val = pd.DataFrame({'age': [10.0, 20.0, 30.0, 40.0], 'pred': [25.0, 30.0, 35.0, 40.0]})     # pred = 0.5 age + 20
    m, df, subj = ev._evaluate(test, val, train_ages=[20.0, 40.0], bin_width=20, top_n=2)
    assert m['n_images'] == 4 and m['n_subjects'] == 3 and m['val'] == ev.regression_metrics(val.age, val.pred)
    assert m['bias_correction']['a'] == pytest.approx(0.5) and m['bias_correction']['b'] == pytest.approx(20.0)
    np.testing.assert_allclose(df.corrected, (test.pred - 20) / 0.5)
    np.testing.assert_allclose(df.corrected_error, df.corrected - test.age)
    assert list(df.error) == [4.0, 10.0, 0.0, -9.0] and list(df.abs_error) == [4.0, 10.0, 0.0, 9.0]
    assert m['corrected'] == ev.regression_metrics(test.age, (test.pred - 20) / 0.5)
    assert list(subj.subject) == ['a', 'b', 'c'] and list(subj.pred) == [17.0, 30.0, 41.0] and list(subj.n_images) == [2, 1, 1]
    np.testing.assert_allclose(subj.corrected, [(14 - 20) / 0.5 / 2 + (20 - 20) / 0.5 / 2, 20.0, 42.0])
    assert m['subject_level'] == ev.regression_metrics([10, 30, 50], [17, 30, 41])
    assert m['corrected_subject_level'] == ev.regression_metrics([10, 30, 50], subj.corrected)
    assert m['baseline'] == {'method': 'always predict the training mean age', 'train_mean_age': 30.0, 'n_train': 2,
                             'mae': 15.0, 'rmse': pytest.approx(np.sqrt(300)), 'subject_mae': pytest.approx(40 / 3)}
    assert [g['age_range'] for g in m['age_groups']] == ['0-20', '20-40', '40-60']
    assert [g['count'] for g in m['corrected_age_groups']] == [2, 1, 1]
    assert [g['count'] for g in m['subject_age_groups']] == [1, 1, 1]
    assert [h['filename'] for h in m['highest_errors']] == ['a_2', 'c_1'] and m['highest_errors'][1]['error'] == -9.0
    assert m['overall_metrics']['MAE'] == m['overall']['mae'] and m['overall_metrics']['Accuracy_5years'] == 50.0
    assert m['age_group_analysis'][0]['mean_pred_age'] == 17.0 and m['age_group_analysis'][0]['pred_mean'] == 17.0
    assert m['settings'] == {'bin_width': 20, 'min_slope': 0.1, 'accuracy_years': [5, 10, 15],
                             'accuracy_units': 'fraction (legacy overall_metrics: percent)', 'error': 'pred - true'}
    assert m['subject_level_note'] is None
    # no subject for one image: no subject level; no validation: no correction; no training ages: no baseline
    m2, df2, subj2 = ev._evaluate(test.assign(subject=['a', None, 'b', 'c']))
    assert subj2 is None and m2['subject_level'] is None and m2['n_subjects'] is None and '1 of 4' in m2['subject_level_note']
    assert m2['val'] is None and not m2['bias_correction']['applied'] and m2['baseline'] is None and df2.corrected.isna().all()
    assert m2['corrected_age_groups'] is None and m2['subject_age_groups'] is None


def test_subject_level_checks():
    from agenb.core import InputError
    s = ev.subject_level(pd.DataFrame({'subject': [7, 7, 8], 'age': [1.0, 1.0, 2.0], 'pred': [1.0, 2.0, 3.0]}))
    assert list(s.subject) == ['7', '8'] and list(s.columns) == ['subject', 'age', 'pred', 'n_images', 'pred_sd']
    with pytest.raises(InputError, match='1 rows have no subject'):
        ev.subject_level(pd.DataFrame({'subject': ['a', None], 'age': [1.0, 2.0], 'pred': [1.0, 2.0]}))
    with pytest.raises(InputError, match="missing column"): ev.subject_level(pd.DataFrame({'subject': ['a'], 'age': [1.0]}))


def test_correction_records_and_messages():
    from agenb.core import InputError
    refused = ev.fit_bias_correction([10.0, 20.0, 30.0], [30.0, 30.5, 31.0])
    assert set(refused) == {'method', 'fitted_on', 'n', 'a', 'b', 'min_slope', 'applied', 'reason'}
    assert refused['method'].startswith('linear (Cole/de Lange): corrected = (pred - b) / a')
    assert refused['min_slope'] == 0.1 and refused['b'] == pytest.approx(29.5)
    assert refused['reason'] == ('slope a=0.05 is below 0.1: the predictions barely follow age, '
                                 'dividing by a would blow up their noise')                  # metrics.json's words
    assert ev.fit_bias_correction([1.0], [1.0])['reason'] == 'only 1 validation predictions; need at least 3'
    with pytest.raises(InputError, match='validation predictions for the bias correction: 1 of 3 rows'):
        ev.fit_bias_correction([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match=r"subject-level aggregation: missing column\(s\) \['pred'\]"):
        ev.subject_level(pd.DataFrame({'subject': ['a'], 'age': [1.0]}))
    with pytest.raises(InputError, match='pass a subject column or file names like anon_<subject>_<k>.png'):
        ev.subject_level(pd.DataFrame({'subject': [None], 'age': [1.0], 'pred': [1.0]}))


def test_evaluate_records_when_parts_are_missing_exactly():
    """metrics.json's records when there is no validation set and no subject, to the letter (readers use every key);
    the default age-group width and number of highest errors; ties among the highest errors kept in file order;
    the settings passed through; bad inputs named."""
    from agenb.core import InputError
    n = 40
    err = np.random.default_rng(0).integers(1, 4, n).astype(float) * np.where(np.arange(n) % 2, 1, -1)   # |error| 1-3, ties
    test = pd.DataFrame({'filename': [f'f{i:02d}' for i in range(n)], 'subject': [None] * n, 'age': np.arange(n) * 2.0})
    test['pred'] = test.age + err
    m, df, subj = ev._evaluate(test, train_ages=[20, 40])
    assert m['bias_correction'] == {'fitted_on': 'val', 'n': 0, 'a': ev.NAN, 'b': ev.NAN, 'min_slope': 0.1, 'applied': False,
                                    'reason': 'no validation predictions given (the correction is only ever fitted on validation data)'}
    assert subj is None and m['subject_level'] is None and m['corrected_subject_level'] is None and m['baseline']['subject_mae'] is None
    assert m['subject_level_note'] == 'subject unknown for 40 of 40 images; subject-level metrics need a subject for every image'
    assert [g['age_range'] for g in m['age_groups']] == [f'{a}-{a + 10}' for a in range(0, 80, 10)]   # default width 10
    worst = df.assign(i=range(n)).sort_values('abs_error', ascending=False, kind='stable').i[:10]
    assert [h['filename'] for h in m['highest_errors']] == [f'f{i:02d}' for i in worst]               # default 10, stable
    # a validation fit refused because of the slope asked for; the widths passed to every age-group table
    val = pd.DataFrame({'age': [10.0, 20.0, 30.0, 40.0], 'pred': [25.0, 30.0, 35.0, 40.0]})        # slope 0.5
    assert not ev._evaluate(test, val, min_slope=0.6)[0]['bias_correction']['applied']
    withs = test.assign(subject=[str(i // 2) for i in range(n)])
    m = ev._evaluate(withs, val, bin_width=20)[0]
    for k in ('age_groups', 'corrected_age_groups', 'subject_age_groups'):
        assert [g['age_range'] for g in m[k]] == ['0-20', '20-40', '40-60', '60-80'], k
    with pytest.raises(InputError, match='test predictions: expected a table'): ev._evaluate([1, 2])
    with pytest.raises(InputError, match='validation predictions: expected a table'): ev._evaluate(test, [1, 2])
    with pytest.raises(InputError, match='^training ages for the baseline contain missing values$'):
        ev._evaluate(test, train_ages=[20, None])


def test_regression_metrics_of_two_points_and_of_spreads_of_one_year():
    "Correlation, slope, SD and R2 are defined from two points on, and for ages or predictions that span one year or less."
    m = ev.regression_metrics([10.0, 11.0], [3.0, 4.0])            # n = 2; ages and predictions each span exactly 1
    assert m['pearson_r'] == pytest.approx(1.0) and m['slope'] == pytest.approx(1.0) and m['sd_error'] == 0.0
    assert m['r2'] == pytest.approx(1 - (49 + 49) / 0.5)
    m = ev.regression_metrics([10.0, 10.5, 11.0], [10.0, 10.2, 11.0])   # ages span 1 year: SS_tot 0.5
    assert m['slope'] == pytest.approx(1.0) and m['r2'] == pytest.approx(1 - 0.09 / 0.5)
    assert m['sd_error'] == pytest.approx(np.std([0, -0.3, 0], ddof=1))
    assert ev.regression_metrics([10.0, 12.0], [5.0, 9.0])['sd_error'] == pytest.approx(np.std([-5.0, -3.0], ddof=1))


def test_age_group_table_defaults_to_decades_and_takes_any_positive_width():
    assert list(ev.age_group_table([5.0, 15.0, 25.0], [5.0, 15.0, 25.0]).age_range) == ['0-10', '10-20', '20-30']
    assert list(ev.age_group_table([5.0, 6.5], [5.0, 6.0], bin_width=1).age_range) == ['5-6', '6-7']
