"""Exact, fast checks of the code where experiments decide (issue 29, `make mutate`): the statistics chapter
(agenb.stats), the experiment protocol (agenb.exp_protocol), the out-of-fold coverage check (agenb.exp_worker), the
age-gap statistics (agenb.gap_stats) and the model's view pooling and heads (agenb.model).

The simulation tests (tests/test_stats.py) show the decision rule holds its error rates, but take minutes; these pin
what each function computes on small inputs: against an independent computation from its definition (a loop, a
textbook formula, or the documented building blocks with the documented arguments), so that a changed operator,
constant or argument is seen. mutation/prepare.py lists the functions they guard. In-process, seconds in all."""
import hashlib, json, math, warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from scipy.special import rel_entr
from sklearn.metrics import roc_auc_score
from torch import nn

from agenb.core import InputError
from agenb import stats as S
from agenb.stats import (OOF_COLUMNS, boot_means, check_oof, compare_with, error_cubes, holm, leaderboard, max_t, mean_ci,
                         paired_difference, percentile_interval, ratio_ci, resample_counts, subject_errors,
                         two_sample_resamples)
from agenb.exp_protocol import make_protocol, opening_counts, protocol_labels
from agenb.split import EXCLUDED, make_split
from agenb import gap_stats as G
from agenb.gap_stats import (HEALTHY, COLUMNS, age_adjusted, age_bands, agegap_stats, band_table, cohens_d, compare_gaps,
                             correction_applied, subject_gaps)
from agenb.evaluate import apply_bias_correction
from agenb.model import (AgeNet, AgeOutput, DistributionHead, RegressionHead, coverage, draw_views, parse_age_bins,
                         subject_groups, view_batches)
import agenb.exp_jobs as J
import agenb.exp_worker as W


# ---- agenb.stats: bootstrap building blocks ------------------------------------------------------------------------------

def counts_by_loop(n, n_boot, seed):
    "How often each of n units is drawn in each of n_boot resamples, one resample at a time."
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


@pytest.mark.parametrize('n,n_boot,seed', [(1, 1, 0), (3, 40, 1), (7, 5, 2), (2, 30, 3)])
def test_resample_counts_are_the_draws_of_each_resample(n, n_boot, seed):
    c = resample_counts(n, n_boot, seed)
    assert c.shape == (n_boot, n) and (c.sum(1) == n).all()
    np.testing.assert_array_equal(c, counts_by_loop(n, n_boot, seed))
    np.testing.assert_array_equal(resample_counts(n, n_boot, np.random.default_rng(seed)), c)   # a generator as a seed


def test_resample_counts_keep_units_never_drawn():
    "The last unit of the last resample is not drawn for some seed: its count is 0, the shape stays (n_boot, n)."
    seed = next(s for s in range(100) if counts_by_loop(3, 4, s)[-1, -1] == 0)
    c = resample_counts(3, 4, seed)
    assert c.shape == (4, 3) and c[-1, -1] == 0
    np.testing.assert_array_equal(c, counts_by_loop(3, 4, seed))


def test_resample_counts_refuse_nothing_to_draw():
    for n, b in ((0, 5), (5, 0), (-1, 3)):
        with pytest.raises(InputError, match='at least one unit'): resample_counts(n, b)


def test_percentile_interval():
    assert percentile_interval(np.arange(101), 0.9) == pytest.approx((5.0, 95.0), abs=1e-9)
    assert percentile_interval(np.arange(101)) == pytest.approx((2.5, 97.5), abs=1e-9)     # the default level is 95%
    assert percentile_interval([np.nan, 0, 50, 100, np.inf, -np.inf], 0.5) == pytest.approx((25.0, 75.0), abs=1e-9)
    lo, hi = percentile_interval([np.nan, np.inf])
    assert math.isnan(lo) and math.isnan(hi)
    assert all(type(v) is float for v in percentile_interval([1, 2, 3]))


def test_mean_ci_is_scipys_percentile_bootstrap():
    x = np.random.default_rng(0).normal(5, 2, 30)
    m, lo, hi = mean_ci(x, n_boot=300, seed=4, level=0.8)
    r = sps.bootstrap((x,), np.mean, n_resamples=300, confidence_level=0.8, method='percentile', vectorized=True,
                      rng=np.random.default_rng(4))
    assert m == x.mean() and (lo, hi) == (r.confidence_interval.low, r.confidence_interval.high)
    m2, lo2, hi2 = mean_ci(x, n_boot=300, seed=4)                                   # 95%: wider
    assert lo2 < lo < m < hi < hi2
    assert mean_ci(x, 300, 5) != mean_ci(x, 300, 4)                                 # the seed is used
    r = sps.bootstrap((x,), np.mean, n_resamples=2000, confidence_level=0.95, method='percentile', rng=np.random.default_rng(0))
    assert mean_ci(x)[1:] == (r.confidence_interval.low, r.confidence_interval.high)   # defaults: 2000 resamples, seed 0


def test_mean_ci_of_few_or_equal_values():
    assert all(math.isnan(v) for v in mean_ci([]))
    m, lo, hi = mean_ci([4.0])
    assert m == 4.0 and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([3, 3, 3]) == (3.0, 3.0, 3.0)
    m, lo, hi = mean_ci([1.0, 3.0], n_boot=200)                                     # two values: an interval
    assert m == 2.0 and 1.0 <= lo < hi <= 3.0


def test_paired_difference_is_the_bootstrap_of_the_mean_difference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 3, 12), rng.normal(9, 3, 12)
    d = a - b
    r = paired_difference(a, b, n_boot=400, seed=3, level=0.8)
    reps = counts_by_loop(12, 400, 3) @ d / 12
    lo, hi = np.percentile(reps, [10, 90])
    p = min(1.0, 2 * min((reps <= 0).mean(), (reps >= 0).mean()))
    assert r == pytest.approx({'diff': d.mean(), 'ci_low': lo, 'ci_high': hi, 'p': p, 'n': 12, 'n_boot': 400}, abs=1e-12)
    assert 0 < r['p'] < 1
    r95 = paired_difference(a, b, n_boot=400, seed=3)
    assert r95['ci_low'] < lo and r95['ci_high'] > hi and r95['p'] == p
    assert paired_difference(b, a, n_boot=400, seed=3)['diff'] == -d.mean()
    default = paired_difference(a, b)
    assert default['n_boot'] == 2000 and (default['ci_low'], default['ci_high']) == pytest.approx(
        np.percentile(counts_by_loop(12, 2000, 0) @ d / 12, [2.5, 97.5]), abs=1e-12)


def test_paired_difference_p_at_its_ends():
    x = np.arange(6.0)
    assert paired_difference(x, x)['p'] == 1.0                                    # no difference at all
    r = paired_difference(x + 2, x)                                               # 2 years on every subject
    assert (r['diff'], r['ci_low'], r['ci_high'], r['p']) == (2.0, 2.0, 2.0, 0.0)
    assert paired_difference(x - 2, x)['p'] == 0.0
    # d = (1, -1): the resampled mean is 1, 0 or -1 (1/4, 1/2, 1/4); both tails hold 3/4, so 2 x 3/4 is capped at 1
    assert paired_difference([1.0, 0.0], [0.0, 1.0], n_boot=400)['p'] == 1.0
    with pytest.raises(InputError, match='same subjects'): paired_difference([1, 2], [1])


def test_ratio_ci_resamples_subjects_once_for_both_sums():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(1, 5, 9), rng.uniform(1, 5, 9)
    r, lo, hi = ratio_ci(a, b, n_boot=300, seed=6, level=0.9)
    c = counts_by_loop(9, 300, 6)
    assert r == a.sum() / b.sum() and (lo, hi) == pytest.approx(np.percentile((c @ a) / (c @ b), [5, 95]), abs=1e-12)
    np.testing.assert_allclose(ratio_ci(3 * a, a, 50), 3.0, rtol=1e-12)
    _, lo95, hi95 = ratio_ci(a, b, n_boot=300, seed=6)
    assert lo95 < lo and hi95 > hi


def test_two_sample_resamples_draw_each_group_within_itself():
    x, y = np.arange(3.0), np.arange(10.0, 15.0)
    bx, by = two_sample_resamples(x, y, 40, 7)
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(bx, x[rng.integers(0, 3, (40, 3))])
    np.testing.assert_array_equal(by, y[rng.integers(0, 5, (40, 5))])
    bx2, _ = two_sample_resamples(x, y, 40, 8)
    assert not np.array_equal(bx, bx2)
    assert two_sample_resamples(x, y)[0].shape == (2000, 3)


def test_holm():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, np.nan, 0.5]), [0.04, 0.09, 0.09, np.nan, 0.5])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0] and holm([0.2, 0.3]).tolist() == [0.4, 0.4]
    assert holm([0.02]).tolist() == [0.02] and holm([]).empty
    h = holm(pd.Series([0.01, 0.2], index=['x', 'y']))
    assert list(h.index) == ['x', 'y'] and h.tolist() == [0.02, 0.2]


# ---- agenb.stats: the OOF table, subject errors and the cubes --------------------------------------------------------------

def oof_rows(errors, variant='a', seed=0, folds=None, age=40.0):
    "OOF rows: {subject: [image errors]} of one variant and seed (fold = the subject's position mod 2 unless given)."
    rows = []
    for i, (s, errs) in enumerate(errors.items()):
        for j, e in enumerate(errs):
            rows.append({'variant': variant, 'seed': seed, 'fold': (folds or {}).get(s, i % 2), 'subject': s,
                         'file': f'anon_{s}_{j}.png', 'age': age + i, 'prediction': age + i + e})
    return pd.DataFrame(rows)


def test_check_oof_types_and_refusals():
    oof = oof_rows({'1': [1, -2], '2': [3]}).assign(variant=1, subject=[1, 1, 2], age=['40', '40', '41'])
    out = check_oof(oof)
    assert out['variant'].tolist() == ['1'] * 3 and out['subject'].tolist() == ['1', '1', '2']
    assert out['age'].dtype == float and out['age'].tolist() == [40.0, 40.0, 41.0]
    assert out['prediction'].tolist() == [41.0, 38.0, 44.0]
    with pytest.raises(InputError, match=r'in x: missing column\(s\) fold, age; the columns are variant, seed, fold'):
        check_oof(oof.drop(columns=['fold', 'age']), 'in x')
    for col, bad in (('age', 'old'), ('prediction', np.inf), ('prediction', np.nan), ('age', -np.inf)):
        with pytest.raises(InputError, match=rf'column {col} is not a finite number in 1 row\(s\), first data row 3'):
            check_oof(oof.assign(**{col: [40, bad, 41] if col == 'age' else [1.0, bad, 2.0]}))
    with pytest.raises(InputError, match=r'^out-of-fold predictions: column age .* in 2 row'):
        check_oof(oof.assign(age=[np.nan, 'x', 3]))


def test_subject_errors_one_row_per_variant_seed_and_subject():
    oof = pd.concat([oof_rows({'10': [2, -4], '2': [0], '1': [5, 5, -5]}, 'a'),
                     oof_rows({'10': [1, 1], '2': [-3], '1': [0, 0, 0]}, 'b', seed=1)], ignore_index=True)
    e = subject_errors(oof)
    assert e.columns.tolist() == ['variant', 'seed', 'subject', 'fold', 'age', 'err', 'n_images']
    assert e['subject'].tolist() == ['10', '2', '1'] * 2                           # in order of appearance
    assert e['err'].tolist() == [3.0, 0.0, 5.0, 1.0, 3.0, 0.0] and e['n_images'].tolist() == [2, 1, 3, 2, 1, 3]
    assert e['fold'].tolist() == [0, 1, 0] * 2 and e['age'].tolist() == [40.0, 41.0, 42.0] * 2
    moved = oof.assign(fold=[0, 1] + [1] * 4 + [0, 0, 1, 0, 0, 0])                # subject 10 of a in folds 0 and 1
    with pytest.raises(InputError, match=r'^x: subject 10 of variant a \(seed 0\) is predicted in 2 folds'):
        subject_errors(moved, 'x')
    ok = oof.assign(fold=[0, 0] + [1] * 4 + [1, 1, 0, 1, 1, 1])                    # other folds, one per subject
    assert subject_errors(ok)['fold'].tolist() == [0, 1, 1, 1, 0, 1]


def test_error_cubes_pair_subjects_in_natural_order():
    oof = pd.concat([oof_rows({'10': [2], '2': [1], '1': [3]}, 'b'), oof_rows({'2': [4], '1': [5], '10': [6]}, 'b', seed=7),
                     oof_rows({'1': [1], '10': [0], '2': [2]}, 'a')], ignore_index=True)
    variants, subjects, cubes = error_cubes(subject_errors(oof))
    assert variants == ['b', 'a'] and subjects == ['1', '2', '10']
    np.testing.assert_array_equal(cubes['b'], [[3.0, 1.0, 2.0], [5.0, 4.0, 6.0]])
    np.testing.assert_array_equal(cubes['a'], [[1.0, 2.0, 0.0]])
    short = subject_errors(oof[~((oof.variant == 'b') & (oof.seed == 7) & (oof.subject == '2'))])
    with pytest.raises(InputError, match=r'^y: variant b \(seed 7\) has no prediction for 1 of the 3 subjects \(first: 2\)'):
        error_cubes(short, 'y')
    nan = subject_errors(oof).astype({'err': float})
    nan.loc[(nan.variant == 'a') & (nan.subject == '10'), 'err'] = np.nan
    with pytest.raises(InputError, match=r'variant a \(seed 0\) has no prediction for 1 of the 3 subjects \(first: 10\)'):
        error_cubes(nan)


# ---- agenb.stats: the two-level bootstrap and the family-wise comparisons --------------------------------------------------

def test_boot_means_one_seed_is_the_subject_bootstrap_shared_by_all_variants():
    e = {'a': np.array([[1.0, 2.0, 6.0, 3.0]]), 'b': np.array([[2.0, 5.0, 1.0, 0.0]])}
    M = boot_means(e, 300, 9)
    c = resample_counts(4, 300, np.random.default_rng(9)) / 4                       # the first draw of the seed's generator
    np.testing.assert_allclose(M, np.vstack([c @ e['a'][0], c @ e['b'][0]]), rtol=0, atol=1e-12)
    shifted = boot_means({'a': e['a'], 'c': e['a'] + 1.5}, 300, 9)                 # paired: the same subjects every replicate
    np.testing.assert_allclose(shifted[1] - shifted[0], 1.5, atol=1e-12)


def test_boot_means_resample_seeds_then_subjects():
    one = np.array([[1.0, 2.0, 6.0, 3.0]])
    same = boot_means({'a': one, 'b': np.repeat(one, 3, 0)}, 300, 2)               # identical seeds: any seed weights
    np.testing.assert_allclose(same[1], same[0], atol=1e-12)
    flat = boot_means({'a': np.array([[1.0, 1, 1], [3.0, 3, 3]])}, 400, 1)[0]      # seeds 1 and 3 years: halves of 2 draws
    assert set(np.round(flat, 9)) == {1.0, 2.0, 3.0}
    w = resample_counts(2, 400, _after_subject_draw(1, 3, 400)) / 2
    np.testing.assert_allclose(flat, w @ np.array([1.0, 3.0]), atol=1e-12)


def _after_subject_draw(seed, n, n_boot):
    "The generator of boot_means(seed) after its shared subject resample of n subjects."
    rng = np.random.default_rng(seed)
    resample_counts(n, n_boot, rng)
    return rng


def max_t_by_loop(M, means, pairs, df=None, rng=0):
    out = np.zeros(M.shape[1])
    for b in range(M.shape[1]):
        t = [abs((M[i, b] - M[j, b]) - (means[i] - means[j])) / np.std(M[i] - M[j], ddof=1)
             for i, j in pairs if np.std(M[i] - M[j], ddof=1) > 1e-12]
        out[b] = max(t, default=0.0)
    if df: out = out / np.sqrt(np.random.default_rng(rng).chisquare(df, len(out)) / df)
    return out


def test_max_t_is_the_largest_studentised_deviation_over_the_family():
    rng = np.random.default_rng(0)
    M = rng.normal(0, 1, (4, 50)) + np.array([[0.0], [1.0], [0.5], [2.0]])
    M[3] = M[0] + 2.0                                                               # no spread against 0: left out
    means = M.mean(1) + np.array([0.1, -0.2, 0.0, 0.3])
    pairs = [(0, 1), (0, 3), (1, 2), (0, 2)]
    np.testing.assert_allclose(max_t(M, means, pairs), max_t_by_loop(M, means, pairs), rtol=1e-12)
    np.testing.assert_allclose(max_t(M, means, pairs, df=7, rng=[3, 1]), max_t_by_loop(M, means, pairs, 7, [3, 1]), rtol=1e-12)
    np.testing.assert_allclose(max_t(M, means, [(2, 1)]), max_t_by_loop(M, means, [(2, 1)]), rtol=1e-12)
    np.testing.assert_array_equal(max_t(M, means, [(0, 3)]), np.zeros(50))          # only exact pairs: zeros
    np.testing.assert_array_equal(max_t(M, means, [(0, 3)], df=5), np.zeros(50))


def test_compare_with_interval_p_and_flag():
    rng = np.random.default_rng(5)
    M = rng.normal(0, 0.3, (4, 40)) + np.array([[0.0], [3.0], [0.2], [0.0]])
    M[3] = M[0]                                                                     # identical to the reference
    means = M.mean(1)
    D, d = M[[1, 2]] - M[0], means[[1, 2]] - means[0]
    se = D.std(1, ddof=1)
    t = np.abs(d) / se
    mx = np.r_[t[1], t[1] / 2, t[0] * 3, np.linspace(0.1, 4, 37)]                  # one value exactly at row 2's t
    r = compare_with(M, means, 0, [1, 2, 3], mx, level=0.9)
    crit = np.quantile(mx, 0.9)
    assert r.columns.tolist() == ['diff', 'ci_low', 'ci_high', 'se', 'p', 'flag', 'crit']
    np.testing.assert_allclose(r['diff'], [d[0], d[1], 0.0], atol=1e-12)
    np.testing.assert_allclose(r['se'], [se[0], se[1], 0.0], atol=1e-12)
    np.testing.assert_allclose(r['ci_low'], [d[0] - crit * se[0], d[1] - crit * se[1], 0.0], atol=1e-12)
    np.testing.assert_allclose(r['ci_high'], [d[0] + crit * se[0], d[1] + crit * se[1], 0.0], atol=1e-12)
    p = [(1 + (mx >= t[0]).sum()) / 41, (1 + (mx >= t[1]).sum()) / 41, 1.0]
    np.testing.assert_allclose(r['p'], p, atol=1e-12)
    assert r['flag'].tolist() == [True, False, False] and (r['crit'] == crit).all()
    assert compare_with(M, means, 0, [1], mx)['crit'][0] == np.quantile(mx, 0.95)   # the default level


def test_compare_with_exact_differences():
    E = np.array([[1.0] * 5, [2.0] * 5, [1.0] * 5, [0.5] * 5])
    r = compare_with(E, E.mean(1), 0, [1, 2, 3], np.array([1.0, 2.0, 3.0]))
    assert r['flag'].tolist() == [True, False, True] and r['p'].tolist() == [0.0, 1.0, 0.0]
    assert r['ci_low'].tolist() == [1.0, 0.0, -0.5] and r['ci_high'].tolist() == [1.0, 0.0, -0.5]


# ---- agenb.stats: the leaderboard --------------------------------------------------------------------------------------

def board_oof(n=12, seeds=(0, 1), seed=0):
    "Three variants x seeds of OOF predictions, 2 images per subject, 3 folds: b has 2 years more error on every image."
    rng = np.random.default_rng(seed)
    age, hard = rng.uniform(20, 80, n), rng.normal(0, 3, n)
    rows = []
    for s in seeds:
        base = hard[:, None] + rng.normal(0, 2, (n, 2))
        for v, err in (('a', base), ('b', base + 2 * np.sign(base)), ('c', base + rng.normal(0, 1, (n, 2)))):
            rows.append(pd.DataFrame({'variant': v, 'seed': s, 'fold': np.repeat(np.arange(n) % 3, 2),
                                      'subject': np.repeat(np.arange(1, n + 1), 2).astype(str),
                                      'file': [f'anon_{i // 2 + 1}_{i % 2}.png' for i in range(2 * n)],
                                      'age': np.repeat(age, 2), 'prediction': np.repeat(age, 2) + err.ravel()}))
    return pd.concat(rows, ignore_index=True)


def test_leaderboard_columns_are_the_building_blocks():
    oof = board_oof()
    B, seed, level = 300, 4, 0.9
    board = leaderboard(oof, baseline='a', n_boot=B, seed=seed, level=level)
    errs = subject_errors(oof)
    variants, subjects, cubes = error_cubes(errs)
    M = boot_means(cubes, B, seed)
    means = np.array([cubes[v].mean() for v in variants])
    assert board['variant'].tolist() == [variants[i] for i in np.argsort(means, kind='stable')]
    assert board['rank'].tolist() == [1, 2, 3] and board.columns[:3].tolist() == ['variant', 'rank', 'subject_mae']
    b = board.set_index('variant')
    for i, v in enumerate(variants):
        ev, er = oof[oof.variant == v], errs[errs.variant == v]
        ae = (ev.prediction - ev.age).abs()
        fold = er.groupby(['seed', 'fold'])['err'].mean()
        r = b.loc[v]
        assert r['subject_mae'] == means[i] and (r['subject_mae_ci_low'], r['subject_mae_ci_high']) == percentile_interval(M[i], level)
        assert r['image_mae'] == pytest.approx(ae.mean(), abs=1e-12)
        assert r['fold_mae_mean'] == pytest.approx(fold.mean(), abs=1e-12) and r['fold_mae_sd'] == pytest.approx(fold.std(ddof=1), abs=1e-12)
        assert r['seed_mae_sd'] == pytest.approx(er.groupby('seed')['err'].mean().std(ddof=1), abs=1e-12)
        assert r['rmse'] == pytest.approx(np.sqrt(((ev.prediction - ev.age) ** 2).mean()), abs=1e-12)
        assert r['r'] == pytest.approx(np.corrcoef(ev.prediction, ev.age)[0, 1], abs=1e-12)
        assert (r['n_subjects'], r['n_images'], r['n_seeds'], r['n_fold_runs'], r['interval_covers']) == (12, 24, 2, 6, 'seeds, subjects')
    ra, rb = variants.index('a'), variants.index('b')
    assert b.loc['a', 'diff_to_baseline'] == 0.0 and b.loc['b', 'diff_to_baseline'] == pytest.approx(2.0, abs=1e-12)
    # the baseline family: every other variant against a; its own random draw (seed, row of a, False)
    others = [variants.index(v) for v in board.variant if v != 'a']
    fam = max_t(M, means, [(ra, j) for j in others], len(subjects) - 1, [seed, ra, False])
    res = compare_with(M, means, ra, others, fam, level)
    rest = board[board.variant != 'a']
    for c, col in (('diff', 'diff_to_baseline'), ('ci_low', 'diff_to_baseline_ci_low'), ('ci_high', 'diff_to_baseline_ci_high'),
                   ('p', 'p_to_baseline'), ('flag', 'distinguishable_from_baseline')):
        np.testing.assert_array_equal(rest[col].to_numpy(), res[c].to_numpy(), err_msg=col)
    assert math.isnan(b.loc['a', 'p_to_baseline']) and not b.loc['a', 'distinguishable_from_baseline']
    assert b.loc['b', 'distinguishable_from_baseline'] and not b.loc['c', 'distinguishable_from_baseline']
    # the best family: all pairs of variants; its draw (seed, row of the best, True)
    best = board.variant.iloc[0]
    rbest = variants.index(best)
    others = [variants.index(v) for v in board.variant if v != best]
    fam = max_t(M, means, [(0, 1), (0, 2), (1, 2)], len(subjects) - 1, [seed, rbest, True])
    res = compare_with(M, means, rbest, others, fam, level)
    rest = board[board.variant != best]
    for c, col in (('diff', 'diff_to_best'), ('ci_low', 'diff_to_best_ci_low'), ('ci_high', 'diff_to_best_ci_high'),
                   ('p', 'p_to_best'), ('flag', 'distinguishable_from_best')):
        np.testing.assert_array_equal(rest[col].to_numpy(), res[c].to_numpy(), err_msg=col)
    assert b.loc[best, 'diff_to_best'] == 0.0 and math.isnan(b.loc[best, 'diff_to_best_ci_low'])
    assert (board['best'] == best).all() and (board['baseline'] == 'a').all() and (board['n_variants'] == 3).all()
    assert board.attrs['notes'] == S.board_notes(board) and board.attrs['notes']


def test_leaderboard_defaults_one_seed_and_no_baseline():
    oof = board_oof(seeds=(5,))
    board = leaderboard(oof)
    again = leaderboard(oof, n_boot=2000, seed=0, level=0.95)
    pd.testing.assert_frame_equal(board, again)
    assert (board['interval_covers'] == 'subjects').all() and (board['n_seeds'] == 1).all() and board['seed_mae_sd'].isna().all()
    assert (board['n_images'] == 24).all() and (board['n_fold_runs'] == 3).all()
    assert board['baseline'].isna().all() and board['p_to_baseline'].isna().all() and board['diff_to_baseline'].isna().all()
    assert not board['distinguishable_from_baseline'].any() and board['p_to_best'].notna().sum() == 2
    nob = leaderboard(oof, baseline='not a variant', n_boot=200)
    assert nob['baseline'].isna().all() and nob['p_to_baseline'].isna().all()


def test_leaderboard_of_one_variant_and_of_nothing():
    one = leaderboard(board_oof()[lambda d: d.variant == 'c'], baseline='c', n_boot=200)
    assert len(one) == 1 and one['rank'].tolist() == [1] and one['best'].tolist() == ['c']
    assert math.isnan(one['p_to_best'].iloc[0]) and math.isnan(one['p_to_baseline'].iloc[0])
    assert not one['distinguishable_from_best'].iloc[0] and not one['distinguishable_from_baseline'].iloc[0]
    assert one['n_variants'].tolist() == [1]
    empty = leaderboard(pd.DataFrame(columns=OOF_COLUMNS))
    assert empty.empty and empty.columns.tolist() == ['variant', 'rank', 'subject_mae'] and empty.attrs['notes'] == []


def test_leaderboard_single_fold_and_constant_predictions():
    "One fold run per variant: no fold SD; a variant that predicts one age for everyone: no correlation (NaN)."
    oof = board_oof(seeds=(0,)).assign(fold=0)
    oof.loc[oof.variant == 'c', 'prediction'] = 50.0
    b = leaderboard(oof, n_boot=200).set_index('variant')
    assert b['fold_mae_sd'].isna().all() and (b['n_fold_runs'] == 1).all()
    assert math.isnan(b.loc['c', 'r']) and not math.isnan(b.loc['a', 'r'])
    same_age = board_oof(seeds=(0,)).assign(age=50.0)
    assert leaderboard(same_age, n_boot=200)['r'].isna().all()


# ---- agenb.exp_protocol: test subjects, age filter, folds, the final split, openings --------------------------------------

def protocol_table(n=36, seed=0):
    "One row per image (1 to 3 per subject); subject 3 is exactly 5.0 years old and subject 4 exactly 80.0 (the filter's ends)."
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, n + 1):
        age = {3: 5.0, 4: 80.0}.get(s, round(float(rng.uniform(1, 89)), 1))
        for k in range(1, int(rng.choice([1, 2, 3])) + 1):
            rows.append(dict(path=f'/d/anon_{s}_{k}.png', filename=f'anon_{s}_{k}.png', subject=str(s), image_index=k, age=age))
    return pd.DataFrame(rows)


def protocol_spec(**kw):
    return {'data': {'min_age': 5.0, 'max_age': 80.0}, 'folds': 3, 'split_seed': 7, 'stratify': False, 'bin_width': 10,
            'test_size': 0.25, 'val_size': 0.15, 'seeds': [0, 1], **kw}


def natural(subjects):
    return sorted(set(map(str, subjects)), key=lambda s: (int(s), s))


def test_protocol_is_made_of_the_documented_splits():
    t, spec = protocol_table(), protocol_spec()
    protocol, test, excluded, folds, labels = make_protocol(t, spec)
    outer, _ = make_split(t, test_size=0.25, val_size=0, seed=7, stratify=False, bin_width=10)
    keep = (t.age >= 5.0) & (t.age <= 80.0)
    assert {'3', '4'} <= set(t.subject[keep]) and (~keep).any()
    want_test = natural(t.subject[(outer == 'test') & keep])
    dev = t[(outer == 'train') & keep]
    assert test == want_test and excluded == natural(t.subject[~keep])
    assert not set(test) & set(excluded) and not set(dev.subject) & (set(test) | set(excluded))
    for k, f in enumerate(folds):
        lab, _ = make_split(dev, val_size=0.15, seed=7, folds=3, fold=k, stratify=False, bin_width=10)
        assert f['fold'] == k + 1
        for p in ('train', 'val', 'test'):
            assert f[f'{p}_subjects'] == natural(dev.subject[lab == p]) and f['images'][p] == int((lab == p).sum())
        full = labels[f'fold_{k + 1}']
        assert full.index.equals(t.index) and full[dev.index].tolist() == lab.tolist()
        assert (full[~t.index.isin(dev.index)] == EXCLUDED).all()                      # test and filtered subjects: never
    held = [set(f['test_subjects']) for f in folds]
    assert set().union(*held) == set(dev.subject) and sum(map(len, held)) == len(set(dev.subject))
    lab, _ = make_split(dev, test_size=0.15, val_size=0, seed=7, stratify=False, bin_width=10)
    final = labels['final']
    assert final[dev.index].tolist() == lab.replace({'test': 'val'}).tolist()
    assert set(t.subject[final == 'test']) == set(test) and set(t.subject[final == EXCLUDED]) == set(excluded)
    assert list(labels) == ['fold_1', 'fold_2', 'fold_3', 'final']
    assert protocol == {
        'split_method': 'by_subject_id', 'split_seed': 7, 'test_size': 0.25, 'val_size': 0.15, 'folds': 3, 'seeds': [0, 1],
        'stratify': False, 'bin_width': 10, 'stratified': False, 'split_warnings': [], 'n_images': len(t),
        'n_subjects': 36, 'n_test_subjects': len(test), 'n_development_subjects': len(set(dev.subject)),
        'n_excluded_by_age_filter': len(excluded),
        'final': {'val_subjects': natural(dev.subject[lab == 'test']), 'n_train_subjects': len(set(dev.subject[lab == 'train']))}}
    assert len(set(dev.subject)) + len(test) + len(excluded) == 36


def test_protocol_without_an_age_filter_and_with_another_seed():
    t = protocol_table()
    protocol, test, excluded, folds, _ = make_protocol(t, protocol_spec(data={}, split_seed=8, folds=2))
    outer, _ = make_split(t, test_size=0.25, val_size=0, seed=8)
    assert excluded == [] and protocol['n_excluded_by_age_filter'] == 0 and test == natural(t.subject[outer == 'test'])
    assert sorted(sum((f['test_subjects'] for f in folds), []), key=int) == natural(t.subject[outer == 'train'])
    only_min = make_protocol(t, protocol_spec(data={'min_age': 5.0}))[2]
    only_max = make_protocol(t, protocol_spec(data={'max_age': 80.0}))[2]
    assert only_min == natural(t.subject[t.age < 5.0]) and only_max == natural(t.subject[t.age > 80.0])
    assert only_min and only_max


def test_protocol_stratified_collects_each_warning_once(capsys):
    t = protocol_table(48, seed=3)
    spec = protocol_spec(stratify=True, bin_width=30, data={})
    protocol, test, _, folds, labels = make_protocol(t, spec)
    outer, info = make_split(t, test_size=0.25, val_size=0, seed=7, stratify=True, bin_width=30)
    assert protocol['stratified'] is True and info['stratified'] and test == natural(t.subject[outer == 'test'])
    dev = t[outer == 'train']
    lab, _ = make_split(dev, val_size=0.15, seed=7, folds=3, fold=1, stratify=True, bin_width=30)
    assert folds[1]['val_subjects'] == natural(dev.subject[lab == 'val'])
    capsys.readouterr()
    protocol, *_ = make_protocol(t, protocol_spec(stratify=True, bin_width=2, data={}))   # bins of one subject: no strata
    err = capsys.readouterr().err
    assert err == '' and protocol['stratified'] is False
    w = protocol['split_warnings']
    assert w and len(w) == len(set(w)) and all(l.startswith('agenb: warning: age stratification not possible') for l in w)


def test_protocol_needs_two_development_subjects_per_fold():
    t = protocol_table(40)
    n_dev = make_protocol(t, protocol_spec(folds=2))[0]['n_development_subjects']
    assert n_dev % 2 == 0                                                                   # exactly 2 per fold at the limit
    assert make_protocol(t, protocol_spec(folds=n_dev // 2, val_size=0.05))[0]["folds"] == n_dev // 2
    with pytest.raises(InputError, match=rf'^{n_dev} development subjects are too few for {n_dev // 2 + 1} folds'):
        make_protocol(t, protocol_spec(folds=n_dev // 2 + 1, val_size=0.05))
    with pytest.raises(InputError, match=r'^0 development subjects are too few for 3 folds \(after setting aside 0 test'):
        make_protocol(t, protocol_spec(data={'min_age': 200}))


def test_protocol_labels_rebuild_every_split_file():
    t = protocol_table()
    protocol, test, _, folds, labels = make_protocol(t, protocol_spec())
    exp = json.loads(json.dumps({'folds': folds, 'test_subjects': test, 'protocol': protocol}))
    shuffled = t.sample(frac=1, random_state=3)
    rebuilt = protocol_labels(shuffled, exp)
    assert list(rebuilt) == list(labels)
    for k, lab in labels.items():
        assert rebuilt[k].index.equals(shuffled.index) and rebuilt[k].reindex(lab.index).tolist() == lab.tolist(), k
    ints = {**exp, 'test_subjects': [int(s) for s in test],                                  # IDs read back as numbers
            'folds': [{**f, **{f'{p}_subjects': [int(s) for s in f[f'{p}_subjects']] for p in ('train', 'val', 'test')}} for f in folds],
            'protocol': {**protocol, 'final': {**protocol['final'], 'val_subjects': [int(s) for s in protocol['final']['val_subjects']]}}}
    for k, lab in protocol_labels(t, ints).items(): assert rebuilt[k].reindex(lab.index).tolist() == lab.tolist(), k


def test_opening_counts():
    assert opening_counts({}) == {'completed': 0, 'other': [], 'n': 0}
    assert opening_counts({'test_openings': None}) == {'completed': 0, 'other': [], 'n': 0}
    ops = [{'status': 'completed'}, {'status': 'started', 'kind': 'ensemble'}, {'x': 1}, {'status': 'failed', 'kind': 'final'},
           {'status': 'completed', 'kind': 'ensemble'}]
    c = opening_counts({'test_openings': ops})
    assert c['completed'] == 2 and c['n'] == 5
    assert c['other'] == [{'status': 'interrupted', 'kind': 'ensemble'}, {'x': 1, 'kind': 'final', 'status': 'interrupted'},
                          {'status': 'failed', 'kind': 'final'}]


# ---- agenb.gap_stats: the statistics of the age gap ----------------------------------------------------------------------

FIT = {'applied': True, 'a': 0.8, 'b': 9.0}


def test_correction_applied():
    assert correction_applied({'applied': True, 'a': 1, 'b': 0}) is True
    for c in (None, {}, {'applied': False, 'reason': 'x'}, 'applied', [('applied', True)]): assert correction_applied(c) is False


def test_subject_gaps():
    img = pd.DataFrame({'subject': [2, 2, 10, 1], 'age': [30.0, 30.0, 50.0, 70.0], 'pred': [34.0, 38.0, 45.0, 70.0], 'x': 1})
    g = subject_gaps(img, FIT, 'ALS', train_ages=(30.0, 60.0))
    assert g.columns.tolist() == COLUMNS and g['subject'].tolist() == ['2', '10', '1'] and (g['group'] == 'ALS').all()
    assert g['n_images'].tolist() == [2, 1, 1] and g['pred'].tolist() == [36.0, 45.0, 70.0]
    np.testing.assert_allclose(g['corrected'], apply_bias_correction(np.array([36.0, 45.0, 70.0]), FIT))
    np.testing.assert_allclose(g['gap'], [6.0, -5.0, 0.0])
    np.testing.assert_allclose(g['gap_corrected'], g['corrected'] - g['age'])
    assert g['outside_training_ages'].tolist() == [False, False, True]               # 30 and 50 inside [30, 60]
    g = subject_gaps(img, FIT, 'ALS', train_ages=(50.0, 80.0))
    assert g['outside_training_ages'].tolist() == [True, False, False]
    raw = subject_gaps(img, {'applied': False, 'reason': 'few'}, HEALTHY)
    assert raw['corrected'].isna().all() and raw['gap_corrected'].isna().all() and not raw['outside_training_ages'].any()
    assert raw['gap'].tolist() == [6.0, -5.0, 0.0] and subject_gaps(img, None, 'x')['corrected'].isna().all()


def d_by_formula(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    sp = math.sqrt((((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()) / (len(x) + len(y) - 2))
    return (x.mean() - y.mean()) / sp


def test_cohens_d():
    x, y = [1.0, 4.0, 6.0, 9.0, 3.0], [2.0, 0.0, 1.0]
    assert cohens_d(x, y) == pytest.approx(d_by_formula(x, y), abs=1e-12)
    assert cohens_d(y, x) == pytest.approx(-d_by_formula(x, y), abs=1e-12)
    assert cohens_d([1.0, 3.0], [0.0, 2.0]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)   # equal groups: sp = sqrt(2)
    for a, b in (([1.0], [1.0, 2.0]), ([1.0, 2.0], [3.0]), ([2.0, 2.0], [5.0, 5.0, 5.0])): assert math.isnan(cohens_d(a, b))
    assert isinstance(cohens_d(x, y), float)


def test_bootstrap_rows_are_d_and_auc_of_each_row():
    rng = np.random.default_rng(0)
    bx, by = rng.normal(1, 1, (6, 5)), rng.normal(0, 1, (6, 3)).round(0)
    by[2] = by[2, 0]; bx[2] = bx[2, 0]                                               # row 2: no spread in either group
    bx[3, :3] = by[3]                                                                # row 3: ties across the groups
    d = G._d_rows(bx, by)
    for i in range(6):
        if i == 2: assert math.isnan(d[i])
        else: assert d[i] == pytest.approx(d_by_formula(bx[i], by[i]), abs=1e-12)
    auc = G._auc_rows(bx, by)
    for i in range(6):
        assert auc[i] == pytest.approx(roc_auc_score(np.r_[np.ones(5), np.zeros(3)], np.r_[bx[i], by[i]]), abs=1e-12)


def test_mean_ci_is_the_t_interval():
    x = np.array([3.0, 5.0, 4.0, 9.0, 1.0])
    lo, hi = sps.t.interval(0.95, 4, loc=x.mean(), scale=sps.sem(x))
    assert G._mean_ci(x) == pytest.approx([lo, hi], abs=1e-12)
    lo, hi = sps.t.interval(0.8, 4, loc=x.mean(), scale=sps.sem(x))
    assert G._mean_ci(x, 0.8) == pytest.approx([lo, hi], abs=1e-12)
    assert all(math.isnan(v) for v in G._mean_ci([2.0])) and all(math.isnan(v) for v in G._mean_ci([]))
    assert G._mean_ci([1.0, 3.0]) == pytest.approx(list(sps.t.interval(0.95, 1, loc=2.0, scale=1.0)), abs=1e-12)


def test_compare_gaps_against_its_definitions():
    rng = np.random.default_rng(4)
    x, y = np.r_[rng.normal(8, 4, 9), np.nan], np.r_[rng.normal(0, 4, 12), np.inf]
    c = compare_gaps(x, y, n_boot=300, seed=5, level=0.9)
    xf, yf = x[:-1], y[:-1]
    bx, by = two_sample_resamples(xf, yf, 300, 5)
    mw = sps.mannwhitneyu(xf, yf, alternative='two-sided')
    pct = lambda v: pytest.approx(list(np.percentile(v[np.isfinite(v)], [5, 95])), abs=1e-12)
    assert c == {
        'n_clinical': 9, 'n_healthy': 12, 'mean_clinical': pytest.approx(xf.mean(), abs=1e-12),
        'sd_clinical': pytest.approx(xf.std(ddof=1), abs=1e-12), 'mean_healthy': pytest.approx(yf.mean(), abs=1e-12),
        'sd_healthy': pytest.approx(yf.std(ddof=1), abs=1e-12), 'difference': pytest.approx(xf.mean() - yf.mean(), abs=1e-12),
        'difference_ci': pct(bx.mean(1) - by.mean(1)), 'cohens_d': pytest.approx(d_by_formula(xf, yf), abs=1e-12),
        'cohens_d_ci': pct(np.array([d_by_formula(a, b) for a, b in zip(bx, by)])),
        'mannwhitney_u': mw.statistic, 'p_value': mw.pvalue,
        'auc': pytest.approx(roc_auc_score(np.r_[np.ones(9), np.zeros(12)], np.r_[xf, yf]), abs=1e-12),
        'auc_ci': pct(np.array([roc_auc_score(np.r_[np.ones(9), np.zeros(12)], np.r_[a, b]) for a, b in zip(bx, by)])),
        'n_boot': 300, 'seed': 5, 'level': 0.9, 'note': None}
    assert c['auc'] > 0.5 and c['difference_ci'][0] > 0
    d = compare_gaps(xf, yf)
    assert (d['n_boot'], d['seed'], d['level']) == (2000, 0, 0.95)
    bx, by = two_sample_resamples(xf, yf, 2000, 0)
    assert d['difference_ci'] == pytest.approx(list(np.percentile(bx.mean(1) - by.mean(1), [2.5, 97.5])), abs=1e-12)


def test_compare_gaps_with_too_few_subjects():
    c = compare_gaps([3.0], [1.0, 2.0, np.nan])
    assert (c['n_clinical'], c['n_healthy'], c['mean_clinical'], c['mean_healthy']) == (1, 2, 3.0, 1.5)
    assert math.isnan(c['sd_clinical']) and c['sd_healthy'] == pytest.approx(math.sqrt(0.5))
    assert c['note'] == 'too few subjects (need at least 2 per group)'
    for k in ('difference', 'cohens_d', 'mannwhitney_u', 'p_value', 'auc'): assert math.isnan(c[k]), k
    for k in ('difference_ci', 'cohens_d_ci', 'auc_ci'): assert len(c[k]) == 2 and all(math.isnan(v) for v in c[k]), k
    e = compare_gaps([], [1.0, 2.0])
    assert e['n_clinical'] == 0 and math.isnan(e['mean_clinical']) and e['note']
    assert compare_gaps([1.0, 2.0], [5.0])['note'] and compare_gaps([1.0, 2.0], [5.0, 6.0])['note'] is None


def test_age_bands_are_quantiles_without_repeats():
    ages = [10, 20, 30, 40, 50, 60, 70]
    np.testing.assert_allclose(age_bands(ages), np.quantile(ages, [0, 1 / 3, 2 / 3, 1]))
    np.testing.assert_allclose(age_bands(ages, 2), [10, 40, 70])
    assert age_bands([5, 5, 5, 5, 9]).tolist() == [5.0, 9.0]                          # repeated quantiles once


def test_band_table():
    rng = np.random.default_rng(6)
    x_age, y_age = np.r_[10.0, 20.0, rng.uniform(20, 80, 16), 80.0], np.r_[10.0, rng.uniform(10, 80, 20), 80.0]
    x_gap, y_gap = rng.normal(5, 3, 19), rng.normal(0, 3, 22)
    rows = band_table(x_age, x_gap, y_age, y_gap, n_bands=2, min_n=5, n_boot=200, seed=3)
    edges = np.quantile(np.r_[x_age, y_age], [0, 0.5, 1])
    assert [r['band'] for r in rows] == [f'[{edges[0]:.1f}, {edges[1]:.1f})', f'[{edges[1]:.1f}, {edges[2]:.1f}]']
    ps = []
    for i, r in enumerate(rows):
        inx = (x_age >= edges[i]) & ((x_age < edges[i + 1]) if i == 0 else (x_age <= edges[i + 1]))
        iny = (y_age >= edges[i]) & ((y_age < edges[i + 1]) if i == 0 else (y_age <= edges[i + 1]))
        assert (r['age_min'], r['age_max'], r['n_clinical'], r['n_healthy']) == (edges[i], edges[i + 1], inx.sum(), iny.sum())
        c = compare_gaps(x_gap[inx], y_gap[iny], 200, 3)
        for k in ('mean_clinical', 'mean_healthy', 'difference', 'cohens_d', 'cohens_d_ci', 'p_value', 'auc', 'auc_ci'):
            assert r[k] == c[k], k
        assert r['note'] is None
        ps.append(c['p_value'])
    assert [r['p_value_holm'] for r in rows] == holm(ps).tolist()
    assert sum(r['n_clinical'] for r in rows) == 19 and sum(r['n_healthy'] for r in rows) == 22   # both ends counted once


def test_band_table_leaves_small_bands_out_of_the_family():
    x_age, y_age = np.arange(10.0, 70.0, 5), np.arange(12.0, 72.0, 5)            # 12 each, 4 per tertile
    x_gap, y_gap = np.arange(12.0) % 5, (np.arange(12.0) * 3) % 7
    rows = band_table(x_age, x_gap, y_age, y_gap, n_bands=3, min_n=4, n_boot=100)
    counts = [(r['n_clinical'], r['n_healthy']) for r in rows]
    assert all(min(c) >= 4 for c in counts[:1]) and rows[0]['note'] is None
    small = [r for r in rows if min(r['n_clinical'], r['n_healthy']) < 4]
    for r in small:
        assert r['note'] == 'too few subjects for statistics (need at least 4 per group)' and 'p_value' not in r
        assert math.isnan(r['p_value_holm'])
    tested = [r['p_value'] for r in rows if r['note'] is None]
    assert [r['p_value_holm'] for r in rows if r['note'] is None] == holm(tested).tolist()
    five = band_table(x_age, x_gap, y_age, y_gap, n_bands=3, min_n=5, n_boot=100)
    assert all(r['note'] for r in five if min(r['n_clinical'], r['n_healthy']) == 4)
    assert band_table(x_age, x_gap, y_age, y_gap, n_bands=1, min_n=5, n_boot=100, seed=2)[0]['p_value'] == compare_gaps(x_gap, y_gap, 100, 2)['p_value']


def ols_by_partialling_out(x_age, x_gap, y_age, y_gap, level=0.95):
    "The group coefficient of gap ~ 1 + group + age (Frisch-Waugh-Lovell), its t-interval and p, and the age slope."
    age, gap = np.r_[x_age, y_age], np.r_[x_gap, y_gap]
    grp = np.r_[np.ones(len(x_age)), np.zeros(len(y_age))]
    ok = np.isfinite(age) & np.isfinite(gap)
    age, gap, grp = age[ok], gap[ok], grp[ok]
    resid = lambda v: v - np.polyval(np.polyfit(age, v, 1), age)
    rg, rc = resid(gap), resid(grp)
    b = rc @ rg / (rc @ rc)
    n = len(gap)
    se = math.sqrt(((rg - b * rc) @ (rg - b * rc)) / (n - 3) / (rc @ rc))
    t = sps.t.ppf(0.5 + level / 2, n - 3)
    slope = np.polyfit(resid_on(grp, age), resid_on(grp, gap), 1)[0]
    return b, [b - t * se, b + t * se], 2 * sps.t.sf(abs(b / se), n - 3), slope, n


def resid_on(grp, v):
    "v with each group's mean taken out (the age slope within groups)."
    return v - np.where(grp == 1, v[grp == 1].mean(), v[grp == 0].mean())


def test_age_adjusted_is_the_ols_group_coefficient():
    rng = np.random.default_rng(7)
    x_age, y_age = rng.uniform(40, 80, 9), rng.uniform(20, 70, 11)
    x_gap, y_gap = 4 + 0.2 * (x_age - 50) + rng.normal(0, 2, 9), 0.2 * (y_age - 50) + rng.normal(0, 2, 11)
    x_gap[0], y_age[3] = np.nan, np.inf                                              # each row with a non-finite value: out
    for level in (0.95, 0.8):
        b, ci, p, slope, n = ols_by_partialling_out(x_age, x_gap, y_age, y_gap, level)
        r = age_adjusted(x_age, x_gap, y_age, y_gap, level)
        assert r == {'difference': pytest.approx(b, abs=1e-9), 'ci': pytest.approx(ci, abs=1e-9), 'p_value': pytest.approx(p, rel=1e-7),
                     'age_slope': pytest.approx(slope, abs=1e-9), 'n': 18, 'note': None}
    assert age_adjusted(x_age, x_gap, y_age, y_gap)['ci'] == pytest.approx(ols_by_partialling_out(x_age, x_gap, y_age, y_gap)[1], abs=1e-9)


def test_age_adjusted_needs_both_groups_and_an_age_spread():
    too_few = 'too few subjects or no age spread'
    four = age_adjusted([30.0, 50.0], [1.0, 3.0], [40.0, 60.0], [0.0, 1.5])          # n = 4 > 3 parameters: estimated
    assert four['note'] is None and four['n'] == 4 and not math.isnan(four['difference'])
    for args in (([30.0, 50.0], [1.0, 3.0], [40.0], [0.0]),                          # n = 3
                 ([30.0, 50.0, 60.0], [1.0, 3.0, 2.0], [], []),                      # one group
                 ([], [], [30.0, 50.0, 60.0, 70.0], [1.0, 3.0, 2.0, 0.0]),
                 ([40.0, 40.0], [1.0, 3.0], [40.0, 40.0], [0.0, 1.5])):              # no age spread
        r = age_adjusted(*args)
        assert r['note'] == too_few and math.isnan(r['difference']) and math.isnan(r['p_value']) and math.isnan(r['age_slope'])
        assert all(math.isnan(v) for v in r['ci']) and r['n'] == len(args[0]) + len(args[2])
    exact = age_adjusted([30.0, 50.0, 70.0], [3.0, 4.0, 5.0], [20.0, 40.0, 60.0], [-2.5, -1.5, -0.5])   # a perfect fit
    assert exact['difference'] == pytest.approx(5.0) and exact['age_slope'] == pytest.approx(0.05) and exact['p_value'] < 1e-12


def same(a, b):
    "a == b, NaN equal to NaN (in dicts, lists and numbers)."
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a): return isinstance(b, float) and math.isnan(b)
    return a == b


def subjects_frame(groups, seed=0):
    "COLUMNS rows: {group: (n, age range, gap shift)}, corrected gaps = raw gaps - 1."
    rng = np.random.default_rng(seed)
    frames = []
    for name, (n, (a0, a1), shift) in groups.items():
        age = rng.uniform(a0, a1, n)
        gap = shift + rng.normal(0, 3, n)
        frames.append(pd.DataFrame({'group': name, 'subject': [f'{name[:1]}{i}' for i in range(n)], 'n_images': 1 + np.arange(n) % 3,
                                    'age': age, 'pred': age + gap, 'corrected': age + gap - 1, 'gap': gap, 'gap_corrected': gap - 1,
                                    'outside_training_ages': False}))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def test_group_summary():
    g = subjects_frame({'x': (7, (20, 60), 2.0)})
    g.loc[2, 'gap_corrected'] = np.nan
    g.loc[[1, 4], 'outside_training_ages'] = True
    s = G._group_summary(g)
    gc = g['gap_corrected'].dropna()
    assert s == {'n_subjects': 7, 'n_images': int(g.n_images.sum()), 'age_min': g.age.min(), 'age_max': g.age.max(),
                 'age_mean': pytest.approx(g.age.mean()), 'mean_gap': pytest.approx(g.gap.mean()),
                 'sd_gap': pytest.approx(g.gap.std(ddof=1)), 'mean_gap_ci': pytest.approx(G._mean_ci(g.gap)),
                 'mean_gap_corrected': pytest.approx(gc.mean()), 'sd_gap_corrected': pytest.approx(gc.std(ddof=1)),
                 'mean_gap_corrected_ci': pytest.approx(G._mean_ci(gc)), 'n_outside_training_ages': 2}
    one = G._group_summary(g.iloc[:1])
    assert math.isnan(one['sd_gap']) and math.isnan(one['sd_gap_corrected']) and one['mean_gap_corrected'] == g.gap_corrected[0]
    raw = G._group_summary(g.assign(gap_corrected=np.nan))
    assert math.isnan(raw['mean_gap_corrected']) and math.isnan(raw['sd_gap_corrected'])
    two = G._group_summary(g.assign(gap_corrected=[np.nan] * 5 + [1.0, 3.0]))
    assert two['sd_gap_corrected'] == pytest.approx(math.sqrt(2))


def test_agegap_stats_wires_the_comparisons():
    subj = subjects_frame({HEALTHY: (24, (20, 70), 0.0), 'ALS': (12, (50, 85), 6.0), 'MD': (8, (20, 70), 0.0)})
    fit = {'applied': True, 'a': 0.9, 'b': 4.0}
    r = agegap_stats(subj, fit, train_ages=(18.0, 75.0), n_boot=150, seed=2, n_bands=2, min_band=3, min_healthy=20)
    assert r['measure'] == 'gap_corrected' and r['healthy_group'] == HEALTHY and r['bias_correction'] is fit
    assert r['train_ages'] == [18.0, 75.0] and list(r['groups']) == [HEALTHY, 'ALS', 'MD'] and list(r['comparisons']) == ['ALS', 'MD']
    assert r['settings'] == {'n_boot': 150, 'seed': 2, 'n_bands': 2, 'min_band_subjects': 3, 'min_healthy_subjects': 20, 'ci_level': 0.95}
    outside = subj.assign(outside_training_ages=(subj.age < 18.0) | (subj.age > 75.0))
    h, c = outside[outside.group == HEALTHY], outside[outside.group == 'ALS']
    assert same(r['groups']['ALS'], G._group_summary(c)) and same(r['groups'][HEALTHY], G._group_summary(h))
    assert r['groups']['ALS']['n_outside_training_ages'] == int((c.age > 75.0).sum()) > 0
    k = r['comparisons']['ALS']
    assert k['measure'] == 'gap_corrected' and same(k['corrected'], compare_gaps(c.gap_corrected, h.gap_corrected, 150, 2))
    assert same(k['raw'], compare_gaps(c.gap, h.gap, 150, 2))
    p = sps.mannwhitneyu(c.age, h.age, alternative='two-sided').pvalue
    assert k['age_difference_p_value'] == p < 0.05
    assert same(k['age_bands'], band_table(c.age, c.gap_corrected, h.age, h.gap_corrected, 2, 3, 150, 2))
    assert same(k['age_adjusted'], age_adjusted(c.age, c.gap_corrected, h.age, h.gap_corrected))
    w = r['warnings']
    n_out = int((c.age > 75.0).sum())
    assert any(s.startswith(f'{n_out} of 12 ALS subjects are outside the training ages (18.0-75.0 years') for s in w)
    assert any(s.startswith('the ALS subjects are older than the healthy test subjects') for s in w)
    assert not any('MD subjects are' in s for s in w)                              # same ages, inside the training ages
    assert not any(s.startswith('no validation-fitted') or 'only' in s for s in w)


def test_agegap_stats_raw_gap_and_its_warnings():
    subj = subjects_frame({HEALTHY: (10, (50, 80), 0.0), 'young': (10, (18, 40), 5.0)}, seed=3)
    r = agegap_stats(subj, {'applied': False, 'reason': 'only 2 validation predictions'}, n_boot=100, n_bands=3, min_band=5)
    assert r['measure'] == 'gap' and r['train_ages'] is None
    k = r['comparisons']['young']
    h, c = subj[subj.group == HEALTHY], subj[subj.group == 'young']
    assert k['corrected'] is None and k['measure'] == 'gap' and same(k['raw'], compare_gaps(c.gap, h.gap, 100, 0))
    assert same(k['age_bands'], band_table(c.age, c.gap, h.age, h.gap, 3, 5, 100, 0))
    assert same(k['age_adjusted'], age_adjusted(c.age, c.gap, h.age, h.gap))
    w = r['warnings']
    assert w[0].startswith('no validation-fitted bias correction (only 2 validation predictions): the statistics use the raw gap')
    assert w[1].startswith('the healthy test group has only 10 subjects (fewer than 20)')
    assert any(s.startswith('the young subjects are younger than the healthy test subjects') for s in w)
    skipped = [b['band'] for b in k['age_bands'] if b.get('note')]
    assert skipped and f'young: age band(s) {", ".join(skipped)} have fewer than 5 subjects in a group: no statistics there' in w
    assert not any('outside the training ages' in s for s in w)
    none = agegap_stats(subj, None, n_boot=100, min_healthy=10)
    assert none['warnings'][0].startswith("no validation-fitted bias correction (the run's metrics.json has no bias correction)")
    assert not any('healthy test group has only' in s for s in none['warnings'])      # 10 is not fewer than 10
    assert agegap_stats(subj, {'applied': False}, n_boot=100)['warnings'][0].startswith(
        "no validation-fitted bias correction (the run's metrics.json has no bias correction)")


def test_agegap_stats_train_ages_recomputed_and_small_groups():
    subj = subjects_frame({HEALTHY: (6, (30, 60), 0.0), 'one': (1, (30, 60), 3.0)})
    subj['outside_training_ages'] = True                                             # stale: train_ages decides
    r = agegap_stats(subj, FIT, train_ages=(0.0, 100.0), n_boot=50)
    assert r['groups'][HEALTHY]['n_outside_training_ages'] == 0 and not any('outside' in s for s in r['warnings'])
    assert math.isnan(r['comparisons']['one']['age_difference_p_value'])          # one subject: no age test
    assert not any('older' in s or 'younger' in s for s in r['warnings'])
    stale = agegap_stats(subj, FIT, n_boot=50)
    assert stale['groups'][HEALTHY]['n_outside_training_ages'] == 6 and not any('outside the training' in s for s in stale['warnings'])
    with pytest.raises(InputError, match="no 'Healthy test' subjects to compare with"):
        agegap_stats(subj[subj.group != HEALTHY], FIT)


# ---- agenb.model: view pooling, the heads and their decoding ---------------------------------------------------------------

PX, NF = 6, 10   # image side, embedding size of the tiny backbone


def agenet(pool=None, n_cov=0, outputs=1, seed=0, **kw):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * PX * PX, NF), nn.Tanh())
    return AgeNet(body, NF, outputs, 0.25, n_cov, pool, **kw).eval()


def test_agenet_layers_are_the_checkpoints_layers():
    "The state_dict a checkpoint stores: attention 64 wide, covariates through two 32-wide layers, head over both."
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith('body.')}
    assert shapes(agenet('attention', 3, outputs=5)) == {
        'attn.0.weight': (64, NF), 'attn.0.bias': (64,), 'attn.2.weight': (1, 64), 'attn.2.bias': (1,),
        'cov.0.weight': (32, 3), 'cov.0.bias': (32,), 'cov.2.weight': (32, 32), 'cov.2.bias': (32,),
        'head.weight': (5, NF + 32), 'head.bias': (5,)}
    assert shapes(agenet('mean')) == {'head.weight': (1, NF), 'head.bias': (1,)}
    assert shapes(agenet(None, 2, cov_hidden=8)) == {'cov.0.weight': (8, 2), 'cov.0.bias': (8,), 'cov.2.weight': (8, 8),
                                                     'cov.2.bias': (8,), 'head.weight': (1, NF + 8), 'head.bias': (1,)}
    m = agenet('attention', 2.0)
    assert m.n_covariates == 2 and type(m.n_covariates) is int and m.view_pool == 'attention' and m.drop.p == 0.25
    assert isinstance(m.attn[1], nn.Tanh) and isinstance(m.cov[1], nn.ReLU) and isinstance(m.cov[3], nn.ReLU)
    assert agenet('mean').attn is None and agenet('mean').cov is None


@pytest.mark.parametrize('pool', [None, 'mean', 'attention'])
def test_agenet_forward_by_hand(pool):
    m = agenet(pool, n_cov=2, outputs=3, seed=1)
    g = torch.Generator().manual_seed(2)
    x, cov = torch.randn(4, 3, 3, PX, PX, generator=g), torch.randn(4, 2, generator=g)
    with torch.no_grad():
        f = torch.stack([torch.stack([m.body(x[b, j:j + 1])[0] for j in range(3)]) for b in range(4)])   # (B, K, NF)
        if pool == 'attention':
            s = torch.stack([torch.stack([m.attn(f[b, j])[0] for j in range(3)]) for b in range(4)])     # (B, K)
            w = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
            pooled = (w[:, :, None] * f).sum(1)
        else: pooled = f.mean(1)
        want = m.head(torch.cat([pooled, m.cov(cov)], 1))
        if pool: assert torch.allclose(m(x, cov), want, atol=1e-5)
        want1 = m.head(torch.cat([m.body(x[:, 0]), m.cov(cov)], 1))
        assert torch.allclose(m(x[:, 0], cov), want1, atol=1e-5)                      # one image each: no pooling
        plain = agenet(pool, seed=1)
        assert torch.allclose(plain(x[:, 0]), plain.head(plain.body(x[:, 0])), atol=1e-6)
    m.train()
    torch.manual_seed(0); a = m(x[:, 0], cov)
    torch.manual_seed(0); feats = m.drop(m.body(x[:, 0]))
    assert torch.allclose(a, m.head(torch.cat([feats, m.cov(cov)], 1)), atol=1e-6)   # dropout on the image features only


def test_regression_head():
    head = RegressionHead(nn.L1Loss())
    out = torch.tensor([[30.0, 9.0], [50.0, -1.0]], dtype=torch.float64)
    assert head.age(out).dtype == torch.float32 and head.age(out).tolist() == [30.0, 50.0]
    assert head.loss(out, torch.tensor([32, 45])).item() == pytest.approx(3.5)
    assert (head.kind, head.outputs) == ('regression', 1)


def test_distribution_head_bins_and_soft_labels():
    edges = parse_age_bins('10:40:5')
    head = DistributionHead(edges, 4)
    assert head.sigma == 4.0 and head.outputs == 6 and head.centers.tolist() == [12.5, 17.5, 22.5, 27.5, 32.5, 37.5]
    y = torch.tensor([12.0, 25.0, 39.5, 40.0, 1000.0])
    q = head.soft_labels(y)
    cdf = sps.norm.cdf((edges[None, :] - y.numpy()[:, None].astype(float)) / 4)
    p = np.diff(cdf, axis=1)
    want = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    assert q.shape == (5, 6) and np.allclose(q.numpy(), want, atol=1e-6)
    assert np.allclose(q[:4].sum(1).numpy(), 1.0, atol=1e-6) and q[4].abs().sum() == 0        # far outside: nothing to spread
    assert q[1].argmax() in (2, 3) and q[0].argmax() == 0 and q[2].argmax() == 5
    assert torch.allclose(head._edges_t, torch.tensor(edges, dtype=torch.float32))


def test_distribution_head_loss_is_the_kl_divergence_per_subject():
    head = DistributionHead(parse_age_bins('0:30:5'), 3)
    g = torch.Generator().manual_seed(3)
    out, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.tensor([3.0, 14.0, 22.0, 29.0])
    q = head.soft_labels(y).double().numpy()
    p = torch.softmax(out, 1).numpy()
    assert head.loss(out, y).item() == pytest.approx(rel_entr(q, p).sum() / 4, rel=1e-5)
    assert head.loss(torch.log(torch.tensor(q).clamp_min(1e-30)), y).item() == pytest.approx(0.0, abs=1e-5)   # q itself: 0


def summary_by_hand(p, edges):
    "mean, sd (uniform within each bin) and quantiles by walking the bins."
    p = np.asarray(p, float) / np.sum(p)
    c, w = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    mean = (p * c).sum()
    var = (p * (w ** 2 / 12 + (c - mean) ** 2)).sum()
    def q(t):
        acc = 0.0
        for j, pj in enumerate(p):
            if acc + pj >= t and pj > 0: return edges[j] + (t - acc) / pj * w[j]
            acc += pj
        return edges[-1]
    return {'pred': mean, 'pred_sd': math.sqrt(var), 'lo80': q(0.1), 'hi80': q(0.9), 'lo95': q(0.025), 'hi95': q(0.975)}


def test_distribution_head_decoding():
    edges = parse_age_bins('20:60:10')
    head = DistributionHead(edges, 2)
    probs = np.array([[1.0, 2.0, 5.0, 2.0], [0.0, 0.0, 3.0, 1.0], [0.7, 0.1, 0.1, 0.1]])     # not normalised
    s = head.summary(probs)
    assert list(s) == ['pred', 'pred_sd', 'lo80', 'hi80', 'lo95', 'hi95']
    for i, row in enumerate(probs):
        for k, v in summary_by_hand(row, edges).items(): assert s[k][i] == pytest.approx(v, abs=1e-9), (i, k)
    logits = torch.tensor([[0.0, 1.0, 3.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    assert head.probs(logits).dtype == torch.float32 and torch.allclose(head.probs(logits), p.float())
    assert head.age(logits).item() == pytest.approx(float(p[0].numpy() @ head.centers), abs=1e-5)
    assert head.summary(head.probs(logits).numpy())['pred'][0] == pytest.approx(head.age(logits).item(), abs=1e-5)


def test_age_output_decodes_either_head():
    class Fixed(nn.Module):
        def __init__(self, out): super().__init__(); self.out, self.seen = out, []
        def forward(self, x, *args): self.seen.append(args); return self.out.expand(len(x), -1)
    x = torch.zeros(2, 3, PX, PX)
    reg = Fixed(torch.tensor([[41.0, 7.0]]))
    assert AgeOutput(reg)(x).tolist() == [[41.0], [41.0]] and reg.seen == [()] and AgeOutput(reg).centers is None
    head = DistributionHead(parse_age_bins('0:30:10'), 2)
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    dist = AgeOutput(Fixed(logits), head)
    assert dist.centers.tolist() == [5.0, 15.0, 25.0]
    y = dist(x)
    assert y.shape == (2, 1) and torch.allclose(y[:, 0], head.age(logits).expand(2))
    ref = torch.tensor([[0.5, -1.0]])
    m = Fixed(torch.tensor([[3.0]]))
    AgeOutput(m, reference_covariates=ref)(x)
    assert len(m.seen[0]) == 1 and m.seen[0][0].tolist() == [[0.5, -1.0]] * 2            # the reference, one per image
    given = torch.ones(2, 2)
    AgeOutput(m, reference_covariates=ref)(x, given)
    assert m.seen[1][0] is given
    assert set(AgeOutput(m, head, ref).state_dict()) >= {'centers', 'reference'}


def test_parse_age_bins():
    assert parse_age_bins('0:100:2').tolist() == list(range(0, 101, 2))
    assert parse_age_bins('10:14:2').tolist() == [10.0, 12.0, 14.0]                   # 2 bins: the fewest
    assert len(parse_age_bins('0:1000:1')) == 1001                                    # 1000 bins: the most
    assert len(parse_age_bins('0:1:0.1')) == 11 and parse_age_bins(' 5:7.5:0.5')[-1] == 7.5
    for bad in ('0:10:10', '0:1001:1', '0:10:3', '10:0:2', '0:10:0', '0:10:-2', '10:10:1', '0:10', 'a:b:c', '0:10:2:1'):
        with pytest.raises(InputError, match=f'--age-bins {bad!r}'): parse_age_bins(bad)


def test_coverage():
    assert coverage([1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 0.0, 5.0], [1.0, 3.0, 3.0, 6.0]) == 0.5        # both ends count
    assert coverage([2.0], [2.5], [3.0]) == 0.0 and math.isnan(coverage([], [], []))


def test_subject_groups_views_and_batches():
    groups = subject_groups(['3', 1, '1', '3', 'x', 3])
    assert [g.tolist() for g in groups] == [[0, 3, 5], [1, 2], [4]]
    g = torch.Generator().manual_seed(5)
    ref = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:4]
    assert draw_views(6, 4, g).tolist() == ref.tolist()
    assert sorted(draw_views(4, 4, torch.Generator().manual_seed(1)).tolist()) == [0, 1, 2, 3]   # as many as asked: each once
    few = draw_views(2, 5, torch.Generator().manual_seed(7))
    extra = torch.randint(2, (3,), generator=torch.Generator().manual_seed(7))
    assert few.tolist() == [0, 1] + extra.tolist()                                    # every image, then random repeats
    sizes = [np.arange(n) for n in (2, 3, 2, 2, 1, 3, 2)]
    assert view_batches(sizes, range(7), 2) == [[4], [0, 2], [3, 6], [1, 5]]
    assert view_batches(sizes, [6, 0, 1], 5) == [[6, 0], [1]] and view_batches(sizes, [], 3) == []


# ---- agenb.stats: defaults, ends and messages (found by `make mutate`) ----------------------------------------------------

def test_stats_defaults_are_2000_resamples_and_seed_0():
    assert resample_counts(3).shape == (2000, 3) and np.array_equal(resample_counts(3), resample_counts(3, 2000, 0))
    rng = np.random.default_rng(1)
    a, b = rng.uniform(1, 5, 6), rng.uniform(1, 5, 6)
    assert ratio_ci(a, b) == ratio_ci(a, b, 2000, 0, 0.95)
    x, y = np.arange(3.0), np.arange(4.0)
    for got, want in zip(two_sample_resamples(x, y), two_sample_resamples(x, y, 2000, 0)): np.testing.assert_array_equal(got, want)
    cubes = {'a': rng.uniform(0, 5, (1, 6)), 'b': rng.uniform(0, 5, (2, 6))}
    np.testing.assert_array_equal(boot_means(cubes), boot_means(cubes, 2000, 0))
    M = rng.normal(0, 1, (3, 30))
    np.testing.assert_array_equal(max_t(M, M.mean(1), [(0, 1), (0, 2)], df=4), max_t(M, M.mean(1), [(0, 1), (0, 2)], 4, 0))


def test_boot_means_seed_draws_follow_the_subject_draw_whatever_the_other_variants():
    "A one-seed variant draws no seed weights: a two-seed variant after it gets the draw right after the subjects'."
    one, two = np.array([[1.0, 2.0, 6.0]]), np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    M = boot_means({'a': one, 'b': two}, 200, 4)
    w = resample_counts(2, 200, _after_subject_draw(4, 3, 200)) / 2
    np.testing.assert_allclose(M[1], w @ np.array([1.0, 3.0]), atol=1e-12)


def test_mean_ci_of_equal_values_is_that_value_exactly():
    assert mean_ci([0.1] * 3) == (0.1, 0.1, 0.1)                                     # not the rounded mean 0.10000000000000002
    m, lo, hi = mean_ci([1.0, 2.0], n_boot=200)                                      # a spread of exactly 1 year
    assert m == 1.5 and lo < hi


def test_paired_difference_p_of_small_and_one_subject_differences():
    assert paired_difference([1.0, 2.0], [1.0, 1.0], n_boot=400)['p'] == pytest.approx(0.5, abs=0.1)   # d = (0, 1)
    r = paired_difference([0.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0], n_boot=400)     # the first difference is 0
    assert r['p'] < 0.05 and r['diff'] == 3.0
    assert paired_difference([5.0, 5.0], [4.0, 4.0])['p'] == 0.0            # the same difference on every subject
    assert math.isnan(paired_difference([3.0], [2.0])['p'])                      # one subject: nothing to resample, no p


def test_messages_name_where_and_the_subject():
    oof = pd.concat([oof_rows({'1': [1], '2': [2], '3': [1, 2]}, 'a')], ignore_index=True)
    with pytest.raises(InputError, match=r'^out-of-fold predictions: missing column'): subject_errors(oof.drop(columns='age'))
    with pytest.raises(InputError, match=r'^in x: missing column'): subject_errors(oof.drop(columns='age'), 'in x')
    moved = oof.assign(fold=[0, 1, 0, 1])                                            # subject 3 (the last) in two folds
    with pytest.raises(InputError, match=r'^out-of-fold predictions: subject 3 of variant a \(seed 0\) is predicted in 2 folds; '
                                         r'each subject must be out-of-fold in exactly one fold per seed$'):
        subject_errors(moved)
    with pytest.raises(InputError, match=r'^out-of-fold predictions: variant a \(seed 0\) has no prediction'):
        error_cubes(pd.concat([subject_errors(oof), subject_errors(oof_rows({'9': [1]}, 'b'))], ignore_index=True))


def test_check_oof_refuses_a_missing_nullable_integer():
    oof = oof_rows({'1': [1], '2': [2], '3': [3]}).assign(age=pd.array([40, pd.NA, 42], dtype='Int64'))
    with pytest.raises(InputError, match=r'column age is not a finite number in 1 row\(s\), first data row 3'): check_oof(oof)


def test_leaderboard_columns_two_variants_and_two_folds():
    oof = board_oof(seeds=(0,))
    two = oof[oof.variant != 'c'].assign(fold=lambda d: d.fold.clip(upper=1))       # 2 variants, 2 fold runs each
    b = leaderboard(two, baseline='a', n_boot=200)
    assert b.columns.tolist() == [
        'variant', 'rank', 'subject_mae', 'subject_mae_ci_low', 'subject_mae_ci_high', 'image_mae', 'fold_mae_mean', 'fold_mae_sd',
        'seed_mae_sd', 'rmse', 'r', 'n_subjects', 'n_images', 'n_seeds', 'n_fold_runs', 'interval_covers',
        'diff_to_baseline', 'diff_to_baseline_ci_low', 'diff_to_baseline_ci_high', 'p_to_baseline', 'distinguishable_from_baseline',
        'diff_to_best', 'diff_to_best_ci_low', 'diff_to_best_ci_high', 'p_to_best', 'distinguishable_from_best',
        'best', 'baseline', 'n_variants']
    assert b['fold_mae_sd'].notna().all() and (b['n_fold_runs'] == 2).all()
    assert b['p_to_baseline'].notna().sum() == 1 and b['p_to_best'].notna().sum() == 1    # two variants are compared
    assert b.set_index('variant').loc['b', 'distinguishable_from_baseline']
    nob = leaderboard(two, n_boot=200)
    assert nob.columns.tolist() == b.columns.tolist() and nob['diff_to_baseline_ci_low'].isna().all()
    assert nob['diff_to_baseline_ci_high'].isna().all()


def test_leaderboard_correlation_of_small_spreads_and_no_warning_when_constant():
    oof = board_oof(seeds=(0,))
    near = oof.assign(age=50 + (oof.age - 50) / 100, prediction=50 + (oof.prediction - 50) / 100)   # SDs well under 1 year
    b = leaderboard(near, n_boot=200).set_index('variant')
    for v, ev in near.groupby('variant'): assert b.loc[v, 'r'] == pytest.approx(np.corrcoef(ev.prediction, ev.age)[0, 1], abs=1e-9)
    flat = oof.copy()
    flat.loc[flat.variant == 'c', 'prediction'] = 50.0
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                                 # NaN r by the rule, not by numpy's 0/0
        assert math.isnan(leaderboard(flat, n_boot=200).set_index('variant').loc['c', 'r'])
        assert leaderboard(oof.assign(age=50.0), n_boot=200)['r'].isna().all()


def test_leaderboard_ties_keep_the_order_of_the_variants():
    "Variants with the same subject MAE rank in the order they come in (a stable sort): the same board every time."
    base = board_oof(seeds=(0,))
    frames = [base[base.variant == ('a' if k % 2 else 'b')].assign(variant=f'v{k:02d}') for k in range(40)]
    b = leaderboard(pd.concat(frames, ignore_index=True), n_boot=50)
    names = [f'v{k:02d}' for k in range(40)]
    assert b['variant'].tolist() == names[1::2] + names[0::2] and b['best'].iloc[0] == 'v01'


# ---- agenb.exp_jobs and exp_worker: a fold run checked against the protocol, and the out-of-fold coverage -------------

EXP = {'test_subjects': ['90', '91'],
       'folds': [{'fold': 1, 'train_subjects': ['3', '4', '5'], 'val_subjects': ['6'], 'test_subjects': ['1', '2']},
                 {'fold': 2, 'train_subjects': ['1', '2', '5'], 'val_subjects': ['6'], 'test_subjects': ['3', '4']},
                 {'fold': 3, 'train_subjects': ['1', '2', '3'], 'val_subjects': ['4'], 'test_subjects': ['5', '6']}],
       'protocol': {'final': {'val_subjects': ['2', '5']}}}


def fake_run(tmp_path, roles, images=2, preds=None, subject_views=None, name='run'):
    "A finished run folder: split.csv from {subject: split}, predictions.csv of its test images (or `preds`), config.json."
    d = tmp_path / name
    d.mkdir()
    rows = [{'path': f'/d/anon_{s}_{k}.png', 'filename': f'anon_{s}_{k}.png', 'subject': s, 'age': 40.0, 'split': p}
            for s, p in roles.items() for k in range(images)]
    split = pd.DataFrame(rows)
    split.to_csv(d / 'split.csv', index=False)
    if preds is None:
        t = split[split.split == 'test']
        preds = (t.drop_duplicates('subject') if subject_views else t).assign(pred=41.0)
    preds.to_csv(d / 'predictions.csv', index=False)
    (d / 'config.json').write_text(json.dumps({'args': {'subject_views': subject_views}}))
    return d


def fold_roles(k, **change):
    "The roles of fold k's run, with `change` (a role of None: the subject is not in split.csv)."
    f = EXP['folds'][k - 1]
    roles = {**{s: p for p in ('train', 'val', 'test') for s in f[f'{p}_subjects']}, **change}
    return {s: p for s, p in roles.items() if p is not None}


def job(fold=None, final=False, variant='lr=0.1', seed=3):
    return SimpleNamespace(fold=fold, final=final, variant=variant, seed=seed, key=f'{J.slug(variant)}_s{seed}_f{fold}')


def test_development_subjects():
    assert J.development_subjects(EXP) == {'1', '2', '3', '4', '5', '6'}


def test_verify_run_accepts_the_protocols_fold_and_final_runs(tmp_path):
    preds = J.verify_run(EXP, job(2), fake_run(tmp_path, fold_roles(2)))
    assert preds.subject.tolist() == ['3', '3', '4', '4'] and preds.pred.tolist() == [41.0] * 4
    views = J.verify_run(EXP, job(2), fake_run(tmp_path, fold_roles(2), subject_views=3, name='views'))
    assert len(views) == 2                                                           # one row per subject
    final = {'1': 'train', '3': 'train', '4': 'train', '6': 'train', '2': 'val', '5': 'val', '90': 'test', '91': 'test'}
    assert set(J.verify_run(EXP, job(final=True), fake_run(tmp_path, final, name='final')).subject) == {'90', '91'}


@pytest.mark.parametrize('change,msg', [
    ({'90': 'train'}, r"uses 1 of the experiment's test subjects"),
    ({'91': 'val', '90': 'test'}, r"uses 2 of the experiment's test subjects"),
    ({'6': 'train'}, r"its train subjects are not the protocol's \(1 differ\); was split.csv edited\?"),
    ({'5': 'val'}, r"its train subjects are not the protocol's \(1 differ\)"),
    ({'4': 'val'}, r"its val subjects are not the protocol's \(1 differ\)"),
    ({'3': None}, r"its test subjects are not the protocol's \(1 differ\)"),
    ({'1': None}, r"its train subjects are not the protocol's \(1 differ\)")])
def test_verify_run_refuses_a_fold_run_off_the_protocol(tmp_path, change, msg):
    with pytest.raises(J.ProtocolError, match=msg): J.verify_run(EXP, job(2), fake_run(tmp_path, fold_roles(2, **change)))


def test_verify_run_refuses_a_final_run_off_the_protocol(tmp_path):
    good = {'1': 'train', '3': 'train', '4': 'train', '6': 'train', '2': 'val', '5': 'val', '90': 'test', '91': 'test'}
    for i, (change, p) in enumerate((({'6': 'val'}, 'val'), ({'91': 'train'}, 'test'), ({'2': 'train'}, 'val'), ({'1': None}, 'train'),
                                     ({'90': None}, 'test'))):                      # checked in the order test, val, train
        roles = {s: r for s, r in {**good, **change}.items() if r is not None}
        with pytest.raises(J.ProtocolError, match=rf"its {p} subjects are not the protocol's \(1 differ\)"):
            J.verify_run(EXP, job(final=True), fake_run(tmp_path, roles, name=f'r{i}'))


def test_verify_run_refuses_predictions_that_are_not_the_test_images(tmp_path):
    roles = fold_roles(1)
    full = fake_run(tmp_path, roles, name='full')
    preds = pd.read_csv(full / 'predictions.csv', dtype={'subject': str})
    for i, bad in enumerate((preds.iloc[:-1], pd.concat([preds, preds.iloc[:1]]), preds.assign(subject=['1', '1', '1', '3']))):
        with pytest.raises(J.ProtocolError, match=r'predictions.csv does not hold exactly the images of its test subjects'):
            J.verify_run(EXP, job(1), fake_run(tmp_path, roles, preds=bad, name=f'bad{i}'))
    one = preds.drop_duplicates('subject')
    with pytest.raises(J.ProtocolError, match='exactly the subjects of its test subjects'):
        J.verify_run(EXP, job(1), fake_run(tmp_path, roles, preds=one.iloc[:1], subject_views=2, name='views'))
    assert len(J.verify_run(EXP, job(1), fake_run(tmp_path, roles, preds=one, subject_views=2, name='views_ok'))) == 2


def test_verify_run_reads_a_subject_named_like_a_missing_value(tmp_path):
    "split.csv is read as text: a subject 'NA' (a --pattern that allows letters) is that subject, not a missing value."
    exp = {**EXP, 'folds': [{'fold': 1, 'train_subjects': ['NA', '4'], 'val_subjects': ['null'], 'test_subjects': ['1', '2']}]}
    roles = {'NA': 'train', '4': 'train', 'null': 'val', '1': 'test', '2': 'test'}
    assert len(J.verify_run(exp, job(1), fake_run(tmp_path, roles))) == 4


def test_verify_run_reads_ids_as_text(tmp_path):
    exp = {**EXP, 'test_subjects': ['090'], 'folds': [{'fold': 1, 'train_subjects': ['007'], 'val_subjects': ['008'], 'test_subjects': ['009', '010']}]}
    roles = {'007': 'train', '008': 'val', '009': 'test', '010': 'test'}
    assert sorted(J.verify_run(exp, job(1), fake_run(tmp_path, roles)).subject.unique()) == ['009', '010']


def test_fold_frame_and_subject_mae():
    preds = pd.DataFrame({'subject': [7, 7, 8], 'filename': ['a', 'b', 'c'], 'age': [40.0, 40.0, 60.0], 'pred': [42.0, 46.0, 59.0],
                          'path': ['/a', '/b', '/c'], 'other': 1})
    f = J.fold_frame(job(2, variant='v', seed=5), preds)
    assert f.columns.tolist() == [*OOF_COLUMNS, 'path']
    assert f.to_dict('list') == {'variant': ['v'] * 3, 'seed': [5] * 3, 'fold': [2] * 3, 'subject': ['7', '7', '8'], 'file': ['a', 'b', 'c'],
                                 'age': [40.0, 40.0, 60.0], 'prediction': [42.0, 46.0, 59.0], 'path': ['/a', '/b', '/c']}
    # subject 7: images 2 and 6 years off (4) in seed 5, 0 in seed 6: 2; subject 8: 1 and 3: 2; the MAE is 2 over subjects
    other = J.fold_frame(job(2, variant='v', seed=6), preds.assign(pred=[40.0, 40.0, 57.0]))
    assert J.subject_mae(pd.concat([f, other])) == 2.0
    assert J.subject_mae(f) == 2.5                                                    # per subject first: (4 + 1) / 2


def jobs_db(monkeypatch, frames, records=None, exp_dir='E'):
    "exp_worker with the database of `exp_dir` replaced: `frames` {job key: OOF frame or None}, `records` {job key: record}."
    def db(d):
        assert d == exp_dir, d                                                        # the experiment's own database
        return SimpleNamespace(job_oof=lambda key: frames.get(key))
    def record(d, key):
        assert d == exp_dir, d
        return (records or {}).get(key, {'status': 'completed'})
    monkeypatch.setattr(W, 'exp_db', db)
    monkeypatch.setattr(W, 'read_record', record)


def oof_of(fold, subjects, variant='v', seed=0, images=2):
    return pd.DataFrame([{'variant': variant, 'seed': seed, 'fold': fold, 'subject': s, 'file': f'anon_{s}_{i}.png', 'age': 40.0,
                          'prediction': 41.0, 'path': f'/d/anon_{s}_{i}.png'} for s in subjects for i in range(images)])


SPEC = {'folds': 3, 'seeds': [0, 1]}
V = {'name': 'v', 'kind': 'grid', 'options': {}, 'trial': 0}


def all_frames(variant='v', seeds=(0, 1)):
    return {f'{J.slug(variant)}_s{s}_f{k}': oof_of(k, EXP['folds'][k - 1]['test_subjects'], variant, s) for s in seeds for k in (1, 2, 3)}


def test_collect_oof_pools_every_fold_job(monkeypatch):
    frames = {**all_frames(), **all_frames('w x')}
    jobs_db(monkeypatch, frames)
    oof = W.collect_oof('E', EXP, SPEC, [V, {**V, 'name': 'w x'}])
    assert len(oof) == 2 * 2 * 6 * 2 and oof.index.is_unique and oof.columns.tolist() == [*OOF_COLUMNS, 'path']
    assert oof.groupby(['variant', 'seed'])['subject'].nunique().tolist() == [6] * 4
    empty = W.collect_oof('E', EXP, SPEC, [])
    assert empty.empty and empty.columns.tolist() == OOF_COLUMNS


def test_job_oof_refusals_name_the_job(monkeypatch):
    key = 'v_s1_f2'
    good = all_frames()
    for bad, msg in ((None, rf'^the database of E has no out-of-fold predictions of job {key}, which is marked complete; restore'),
                     (good[key].drop(columns='path'), rf'^the out-of-fold predictions of job {key} in the database of E are damaged \(no path column\); restore'),
                     (good[key].drop(columns='fold'), r'damaged \(no fold column\)'),
                     (good[key].drop(columns='subject'), r'damaged \(no subject column\)'),
                     (good[key][good[key].subject != '3'], r'damaged \(1 of the 2 subjects of fold 2 missing, 0 others, 0 images twice\)'),
                     (pd.concat([good[key], oof_of(2, ['5', '90'], seed=1)]), r'\(0 of the 2 subjects of fold 2 missing, 2 others, 0 images twice\)'),
                     (pd.concat([good[key], good[key].iloc[:1]]), r'\(0 of the 2 subjects of fold 2 missing, 0 others, 1 images twice\)')):
        jobs_db(monkeypatch, {**good, key: bad})
        with pytest.raises(W.OOFError, match=msg) as e: W.collect_oof('E', EXP, SPEC, [V])
        assert isinstance(e.value, InputError)                                         # one line, exit 2


def test_collect_oof_refuses_jobs_not_done_and_overlaps(monkeypatch):
    good = all_frames()
    for rec in (None, {'status': 'failed'}, {}):
        jobs_db(monkeypatch, good, {'v_s0_f3': rec})
        with pytest.raises(W.OOFError, match=r'^job v_s0_f3 of variant v is not recorded done in the database of E; restore'):
            W.collect_oof('E', EXP, SPEC, [V])
    # a damaged record of the folds: subject 2 held out by folds 1 and 2, each job consistent with it
    exp = json.loads(json.dumps(EXP))
    exp['folds'][1]['test_subjects'] = ['2', '3', '4']
    jobs_db(monkeypatch, {**good, 'v_s0_f2': oof_of(2, ['2', '3', '4']), 'v_s1_f2': oof_of(2, ['2', '3', '4'], seed=1)})
    with pytest.raises(W.OOFError, match=r'^the OOF predictions of v \(seed 0\) do not cover every development subject exactly once'):
        W.collect_oof('E', exp, SPEC, [V])
    # a spec with fewer folds than the record: the last fold's subjects are never predicted
    jobs_db(monkeypatch, good)
    with pytest.raises(W.OOFError, match=r'^the OOF predictions of v \(seed 0\) do not cover every development subject exactly once'):
        W.collect_oof('E', EXP, {**SPEC, 'folds': 2}, [V])
    # one image path in two fold jobs (two muscles' files under one name)
    jobs_db(monkeypatch, {**good, 'v_s1_f3': good['v_s1_f3'].assign(path=['/d/anon_1_0.png'] + list(good['v_s1_f3'].path[1:]))})
    with pytest.raises(W.OOFError, match=r'of v \(seed 1\) do not cover every development subject exactly once'):
        W.collect_oof('E', EXP, SPEC, [V])


# ---- agenb.exp_protocol, agenb.model, agenb.agegap: ends, defaults and messages (found by `make mutate`) --------------------

def test_protocol_final_split_is_stratified_too_and_the_refusal_says_what_to_do():
    t = protocol_table(48, seed=3)
    protocol, test, *_ = make_protocol(t, protocol_spec(stratify=True, bin_width=30, data={}))
    outer, _ = make_split(t, test_size=0.25, val_size=0, seed=7, stratify=True, bin_width=30)
    dev = t[outer == 'train']
    lab, info = make_split(dev, test_size=0.15, val_size=0, seed=7, stratify=True, bin_width=30)
    plain, _ = make_split(dev, test_size=0.15, val_size=0, seed=7)
    assert info['stratified'] and set(dev.subject[lab == 'test']) != set(dev.subject[plain == 'test'])
    assert protocol['final']['val_subjects'] == natural(dev.subject[lab == 'test'])
    with pytest.raises(InputError, match=r'^0 development subjects are too few for 3 folds \(after setting aside 0 test subjects\); '
                                         r'use fewer folds, a smaller test_size or more data$'):
        make_protocol(t, protocol_spec(data={'min_age': 200}))


def test_draw_views_of_exactly_k_images_is_a_random_order():
    for seed in range(3):
        want = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        assert draw_views(4, 4, torch.Generator().manual_seed(seed)).tolist() == want.tolist()


def test_distribution_head_quietly_in_float64():
    head = DistributionHead(parse_age_bins('20:60:10'), 2)
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.6, 0.3]], dtype=np.float32)
    s = head.summary(probs)
    for i, row in enumerate(probs.astype(float)):
        for k, v in summary_by_hand(row, head.edges).items():
            assert s[k].dtype == np.float64 and s[k][i] == pytest.approx(v, abs=1e-12), (i, k)
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                                  # the softmax over the bins, named
        head.loss(torch.zeros(2, 4), torch.tensor([25.0, 41.0]))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert math.isnan(coverage([], [], []))                                          # an empty group: NaN, no warning


def test_age_gap_statistics_without_numpy_warnings():
    "Groups too small or without spread give NaN by the rules, not through numpy's 0/0 and empty-mean warnings."
    bx = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0]])
    by = np.array([[3.0, 3.0], [0.0, 1.0]])                                             # row 0: no spread, different means
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        d = G._d_rows(bx, by)
        assert math.isnan(d[0]) and d[1] == pytest.approx(d_by_formula(bx[1], by[1]))
        assert math.isnan(G._d_rows(np.ones((1, 3)), np.ones((1, 2)))[0])             # 0 / 0
        assert math.isnan(cohens_d([1.0], [1.0, 2.0, 3.0])) and math.isnan(cohens_d([1.0, 2.0, 3.0], [2.0]))
        for x, y in (([], [1.0, 2.0]), ([1.0], [1.0, 2.0]), ([1.0, 2.0], []), ([1.0, 2.0], [3.0])):
            c = compare_gaps(x, y)
            assert c['note'] and (math.isnan(c['sd_clinical']) or len(x) > 1) and (math.isnan(c['sd_healthy']) or len(y) > 1)


def test_age_gap_statistics_of_two_subjects_and_small_spreads():
    c = compare_gaps([1.0, 2.0], [5.0, 7.0], n_boot=100)
    assert c['sd_clinical'] == pytest.approx(math.sqrt(0.5)) and c['sd_healthy'] == pytest.approx(math.sqrt(2))
    x, y = [0.1, 0.3, 0.2, 0.6], [0.0, 0.2, 0.1]                                        # a pooled SD well under 1
    assert cohens_d(x, y) == pytest.approx(d_by_formula(x, y), abs=1e-12)
    g = subjects_frame({'x': (2, (20, 60), 2.0)})
    s = G._group_summary(g)
    assert s['sd_gap'] == pytest.approx(g.gap.std(ddof=1)) and s['sd_gap_corrected'] == pytest.approx(g.gap_corrected.std(ddof=1))


def test_training_age_range_is_inclusive():
    img = pd.DataFrame({'subject': ['1', '2', '3', '4'], 'age': [30.0, 60.0, 29.9, 60.1], 'pred': [30.0, 60.0, 30.0, 60.0]})
    assert subject_gaps(img, FIT, 'x', train_ages=(30.0, 60.0))['outside_training_ages'].tolist() == [False, False, True, True]
    subj = subjects_frame({HEALTHY: (6, (30, 60), 0.0), 'x': (4, (30, 60), 0.0)})
    subj.loc[subj.group == 'x', 'age'] = [30.0, 60.0, 29.9, 60.1]
    r = agegap_stats(subj, FIT, train_ages=(30.0, 60.0), n_boot=50)
    assert r['groups']['x']['n_outside_training_ages'] == 2


def test_band_edges_belong_to_one_band_for_both_groups():
    "A band is [lo, hi) except the last, [lo, hi]: a subject whose age is an inner edge is counted once, in the upper band."
    x_age, y_age = [10.0, 20.0, 30.0, 40.0, 50.0], [15.0, 25.0, 35.0, 45.0, 55.0, 60.0]    # the median, 35, is a healthy age
    rows = band_table(x_age, np.zeros(5), y_age, np.zeros(6), n_bands=2, min_n=1, n_boot=20)
    assert [r['band'] for r in rows] == ['[10.0, 35.0)', '[35.0, 60.0]']
    assert [(r['n_clinical'], r['n_healthy']) for r in rows] == [(3, 2), (2, 4)]
    rows = band_table(y_age, np.zeros(6), x_age, np.zeros(5), n_bands=2, min_n=1, n_boot=20)   # and as a clinical age
    assert [(r['n_clinical'], r['n_healthy']) for r in rows] == [(2, 3), (4, 2)]


def test_band_needs_enough_subjects_in_each_group():
    x_age, y_age = np.arange(20.0, 80.0, 2.0), np.r_[np.arange(20.0, 50.0, 3.0), 79.0]   # few healthy in the upper band
    rows = band_table(x_age, np.arange(30.0) % 4, y_age, np.arange(11.0) % 3, n_bands=2, min_n=5, n_boot=50)
    assert rows[1]['n_clinical'] >= 5 and rows[1]['n_healthy'] < 5 and rows[1]['note'] and 'p_value' not in rows[1]
    assert rows[0]['note'] is None
    rows = band_table(y_age, np.arange(11.0) % 3, x_age, np.arange(30.0) % 4, n_bands=2, min_n=5, n_boot=50)
    assert rows[1]['n_healthy'] >= 5 and rows[1]['n_clinical'] < 5 and rows[1]['note']


def test_band_table_and_agegap_stats_defaults():
    rng = np.random.default_rng(8)
    x_age, y_age, x_gap, y_gap = rng.uniform(20, 80, 18), rng.uniform(20, 80, 18), rng.normal(2, 3, 18), rng.normal(0, 3, 18)
    assert same(band_table(x_age, x_gap, y_age, y_gap), band_table(x_age, x_gap, y_age, y_gap, 3, 5, 2000, 0))
    subj = subjects_frame({HEALTHY: (20, (20, 70), 0.0), 'ALS': (6, (20, 70), 3.0)})
    r = agegap_stats(subj, FIT)
    assert r['settings'] == {'n_boot': 2000, 'seed': 0, 'n_bands': 3, 'min_band_subjects': 5, 'min_healthy_subjects': 20,
                             'ci_level': 0.95}
    assert r['comparisons']['ALS']['corrected']['n_boot'] == 2000 and len(r['comparisons']['ALS']['age_bands']) == 3


def test_agegap_warnings_in_full():
    subj = subjects_frame({HEALTHY: (10, (50, 80), 0.0), 'young': (10, (18, 40), 5.0)}, seed=3)
    subj.loc[subj.index[-1], 'age'] = 17.0
    c, h = subj[subj.group == 'young'], subj[subj.group == HEALTHY]
    p = sps.mannwhitneyu(c.age, h.age, alternative='two-sided').pvalue
    r = agegap_stats(subj, {'applied': False, 'reason': 'why'}, train_ages=(18.0, 90.0), n_boot=50, min_band=2)
    assert r['warnings'][:4] == [
        "no validation-fitted bias correction (why): the statistics use the raw gap, which depends on age (regression to the "
        "mean); compare groups of similar ages only",
        "the healthy test group has only 10 subjects (fewer than 20): Cohen's d, the p-value and the AUC are very uncertain; "
        "train with more subjects or a larger --test-size",
        f"1 of 10 young subjects are outside the training ages (18.0-90.0 years; theirs 17.0-17.0): the model never saw such "
        "ages, so their gaps mix disease with extrapolation",
        f"the young subjects are younger than the healthy test subjects (mean age {c.age.mean():.1f} vs {h.age.mean():.1f}, "
        f"Mann-Whitney p = {p:.2g}): read the age bands and the age-adjusted difference before the overall one"]


def test_agegap_age_test_needs_two_subjects_per_group_and_equal_means_are_not_older():
    for n_c, n_h in ((2, 6), (6, 2), (6, 1)):
        subj = subjects_frame({HEALTHY: (n_h, (60, 80), 0.0), 'x': (n_c, (20, 30), 0.0)})
        p = agegap_stats(subj, FIT, n_boot=20)['comparisons']['x']['age_difference_p_value']
        if n_h > 1: assert p == sps.mannwhitneyu(subj.age[subj.group == 'x'], subj.age[subj.group == HEALTHY], alternative='two-sided').pvalue
        else: assert math.isnan(p)
    c_age = [41.0, 42.0, 43.0, 44.0, 45.0, 46.0, 47.0, 48.0, 49.0, 95.0]                   # mean 50, mostly below
    h_age = [49.5, 50.5] * 5                                                              # mean 50
    subj = subjects_frame({HEALTHY: (10, (0, 1), 0.0), 'x': (10, (0, 1), 0.0)})
    subj['age'] = h_age + c_age
    w = agegap_stats(subj, FIT, n_boot=20)['warnings']
    assert any(s.startswith('the x subjects are younger than the healthy test subjects (mean age 50.0 vs 50.0') for s in w)


def test_age_adjusted_without_any_residual_is_nan_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                                  # se = 0: p is NaN by the rule, not 0 / 0
        r = age_adjusted([30.0, 50.0, 70.0], [0.0, 0.0, 0.0], [20.0, 40.0, 60.0], [0.0, 0.0, 0.0])
    assert r['difference'] == 0.0 and r['ci'] == [0.0, 0.0] and math.isnan(r['p_value']) and r['note'] is None


def test_band_table_default_needs_five_per_group():
    x_age = np.arange(15) * 4 + 20.0
    rows = band_table(x_age, np.arange(15.0) % 4, x_age + 2, np.arange(15.0) % 3, n_boot=50)    # 5 + 5 in each tertile
    assert len(rows) == 3 and all((r['n_clinical'], r['n_healthy'], r['note']) == (5, 5, None) for r in rows)


def test_job_keys_and_the_jobs_of_a_variant():
    h = lambda s: hashlib.sha1(s.encode()).hexdigest()[:6]
    assert J.slug('lr_0.1-b') == 'lr_0.1-b' and J.slug('lr=0.001') == f'lr-0.001-{h("lr=0.001")}'
    assert J.slug('.a b/') == f'a-b-{h(".a b/")}' and J.slug('==') == f'variant-{h("==")}' and J.slug(7) == f'7-{h("7")}'
    assert J.slug('a=b') != J.slug('a-b') and J.slug('a b') != J.slug('a=b')               # names that differ: keys that differ
    assert J.slug('XL_Lr-2') == 'XL_Lr-2' and J.slug('-X.') == f'X-{h("-X.")}'
    v = {'name': 'lr=0.1', 'kind': 'grid', 'options': {'lr': 0.1}, 'trial': 4}
    jobs = J.variant_jobs('E', {'folds': 3, 'seeds': [7, 9]}, v)
    s = J.slug('lr=0.1')
    assert [(j.key, j.seed, j.fold, j.step) for j in jobs] == [(f'{s}_s{seed}_f{k}', seed, k, i * 3 + k - 1)
                                                               for i, seed in enumerate([7, 9]) for k in (1, 2, 3)]
    for j in jobs:
        assert (j.variant, j.kind, j.options, j.trial, j.final) == ('lr=0.1', 'grid', {'lr': 0.1}, 4, False)
        assert j.dir == Path('E') / 'runs' / j.key and j.split_file == Path('E') / 'splits' / f'fold_{j.fold}.csv'
    finals = J.final_jobs('E', {'folds': 3, 'seeds': [7, 9]}, v)
    assert [(j.key, j.seed, j.fold, j.step, j.final) for j in finals] == [(f'final_{s}_s7', 7, None, None, True),
                                                                          (f'final_{s}_s9', 9, None, None, True)]
    for j in finals:
        assert (j.variant, j.kind, j.options, j.trial) == ('lr=0.1', 'grid', {'lr': 0.1}, 4)
        assert j.dir == Path('E') / 'final' / f'{s}_s{j.seed}' and j.split_file == Path('E') / 'splits' / 'final.csv'


# ---- agenb.runs: a --subject-views run's inference, the distribution head's intervals (view pooling through predict) ------

from agenb.images import Preprocessing, load_images
from agenb.model import build_model
from agenb.options import resolve_options
from agenb import runs as RN


@pytest.fixture(scope='module')
def views_run(tmp_path_factory, synth_root):
    "A --subject-views run folder written by hand: attention pooling, 9 images of 4 subjects (3, 3, 2, 1), test split."
    run = tmp_path_factory.mktemp('views') / 'run_20260101_000000'
    run.mkdir()
    images = sorted((synth_root / 'TA' / 'Healthy' / 'Images').glob('*.png'))
    by = {}
    for p in images: by.setdefault(p.name.split('_')[1], []).append(p)
    subjects = [s for s in by if len(by[s]) >= 3][:4]
    chosen = [p for s, n in zip(subjects, (3, 3, 2, 1)) for p in by[s][:n]]                     # 9 images
    o = resolve_options({'image_dir': str(images[0].parent), 'excel_path': 'x.xlsx', 'arch': 'resnet18', 'image_size': 32,
                         'dropout': 0.2, 'subject_views': 2, 'view_pool': 'attention'})
    prep = Preprocessing(image_size=32)
    torch.manual_seed(0)
    model = build_model('resnet18', pretrained=False, dropout=0.2, init_bias=40.0, view_pool='attention')
    (run / 'config.json').write_text(json.dumps({'args': o.to_dict(), 'preprocessing': prep.to_dict(), 'augmentation': {}}))
    torch.save(RN.make_checkpoint(model.state_dict(), 3, 7.5, o, prep.to_dict()), run / 'best_model.pth')
    order = [chosen[i] for i in (0, 3, 1, 6, 4, 2, 8, 5, 7)]                                    # subjects' images interleaved
    pd.DataFrame({'path': [str(p) for p in order], 'filename': [p.name for p in order],
                  'subject': [p.name.split('_')[1] for p in order], 'age': 40.0, 'split': 'test'}).to_csv(run / 'split.csv', index=False)
    return run


def test_predict_split_of_a_subject_views_run_pools_each_subjects_images(views_run):
    table = RN.read_split(views_run, 'test')
    ck = torch.load(views_run / 'best_model.pth', weights_only=True)
    m = build_model('resnet18', pretrained=False, dropout=0.2, view_pool='attention')
    m.load_state_dict(ck['model']); m.eval()
    prep = Preprocessing(image_size=32)
    x = prep.normalize(load_images(table.path.tolist(), prep).float() / 255)
    first = list(dict.fromkeys(table.subject))
    rows = {s: np.flatnonzero(table.subject.to_numpy() == s) for s in first}
    with torch.no_grad(): want = [float(m(x[rows[s]][None])[0, 0]) for s in first]
    for bs in (1, 64):
        p = RN.predict_split(views_run, 'test', batch_size=bs)
        assert p.subject.tolist() == first and p.filename.tolist() == [table.filename[rows[s][0]] for s in first]
        assert p.n_images.tolist() == [len(rows[s]) for s in first] and p.index.tolist() == list(range(len(first)))
        np.testing.assert_allclose(p.pred.to_numpy(), want, atol=1e-4, rtol=0)
    assert sorted(p.n_images) != [len(rows[first[0]])] * len(first)                     # subjects of different sizes


def views_model(pool='mean', n_cov=0, head=None):
    "An in-memory RunModel of a --subject-views run over a tiny AgeNet (images 8 x 8)."
    torch.manual_seed(1)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh())
    net = AgeNet(body, 6, head.outputs if head else 1, 0.0, n_cov, pool).eval()
    opts = SimpleNamespace(subject_views=2, view_pool=pool, arch='tiny', num_workers=0, excel_path=None)
    return RN.RunModel(run_dir=Path('tiny'), cfg={'args': {}}, options=opts, model=net, prep=Preprocessing(image_size=8),
                       device=torch.device('cpu'), pattern='', augmentation={}, checkpoint=Path('best_model.pth'),
                       checkpoint_sha256='', epoch=1, val_mae=None, bias_correction=None, head=head,
                       covariate_stats={'n_inputs': n_cov} if n_cov else None)


def test_predict_subject_outputs_pools_each_group_with_its_mean_covariates():
    rm = views_model('attention', n_cov=2)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (7, 1, 8, 8), generator=g, dtype=torch.uint8)
    cov = torch.randn(7, 2, generator=g)
    groups = [np.array([0, 4]), np.array([1]), np.array([2, 5, 6]), np.array([3])]
    x = rm.prep.normalize(images.float() / 255)
    with torch.no_grad(): want = torch.cat([rm.model(x[gr][None], cov[gr].mean(0, keepdim=True)) for gr in groups])
    for bs in (1, 2, 64):
        out = RN.predict_subject_outputs(rm, images, groups, bs, cov)
        assert out.shape == (4, 1) and out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-5), bs
    for bad in (None,):
        with pytest.raises(ValueError, match='covariates must be given exactly for a covariate run'):
            RN.predict_subject_outputs(rm, images, groups, 2, bad)
    plain = views_model('mean')
    with pytest.raises(ValueError, match='covariates must be given exactly'): RN.predict_subject_outputs(plain, images, groups, 2, cov)
    with torch.no_grad(): want = torch.cat([plain.model(x[gr][None]) for gr in groups])
    assert torch.allclose(RN.predict_subject_outputs(plain, images, groups), want, atol=1e-5)
    head = DistributionHead(parse_age_bins('0:60:10'), 2)
    dist = views_model('mean', head=head)
    out = RN.predict_subject_outputs(dist, images, groups, 3)
    assert out.shape == (4, 6)
    np.testing.assert_allclose(RN.outputs_to_age(dist, out), head.age(out).double().numpy())
    assert RN.outputs_to_age(plain, torch.tensor([[3.0, 9.0], [4.0, 9.0]])).tolist() == [3.0, 4.0]
    assert RN.outputs_to_age(plain, torch.tensor([[3.0], [4.0]])).dtype == np.float64


def test_predict_outputs_in_batches_with_covariates():
    rm = views_model('mean', n_cov=2)
    rm.options.subject_views = None
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8)
    cov = torch.randn(5, 2, generator=g)
    x = rm.prep.normalize(images.float() / 255)
    with torch.no_grad(): want = rm.model(x, cov)
    for bs in (1, 2, 64): assert torch.allclose(RN.predict_outputs(rm, images, bs, cov), want, atol=1e-5)
    with pytest.raises(ValueError, match='covariates must be given exactly'): RN.predict_outputs(rm, images, 2)
    assert RN.predict_outputs(rm, images[:0], 2, cov[:0]).shape == (0, 1)
    head = DistributionHead(parse_age_bins('0:60:10'), 2)
    assert RN.predict_outputs(views_model('mean', head=head), images[:0]).shape == (0, 6)
    np.testing.assert_allclose(RN.predict_batches(rm, images, 2, cov), want[:, 0].double().numpy(), atol=1e-5)


def test_model_kwargs_and_the_distribution_head_of_options():
    o = SimpleNamespace(dropout=0.3, head='distribution', age_bins='0:90:10', label_sigma=2.0, covariates='sex,bmi',
                        subject_views=3, view_pool=None)
    h = RN.distribution_head(o)
    assert h.edges.tolist() == list(range(0, 91, 10)) and h.sigma == 2.0
    assert RN.model_kwargs(o) == {'dropout': 0.3, 'outputs': 9, 'n_covariates': 4, 'view_pool': 'mean'}
    plain = SimpleNamespace(dropout=0.5, head='regression', covariates=None, subject_views=None, view_pool='attention')
    assert RN.distribution_head(plain) is None and RN.distribution_head(SimpleNamespace()) is None
    assert RN.model_kwargs(plain) == {'dropout': 0.5, 'outputs': 1, 'n_covariates': 0, 'view_pool': None}
    assert RN.model_kwargs(SimpleNamespace(dropout=0.1, subject_views=2, view_pool='attention'))['view_pool'] == 'attention'


def test_interval_tables_and_calibration():
    head = DistributionHead(parse_age_bins('20:60:10'), 2)
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0], [0.25] * 4])
    frame = pd.DataFrame({'subject': ['7', '3', '7', '3'], 'age': [30.0, 50.0, 40.0, 44.0]}, index=[5, 6, 7, 8])
    img, subj = RN.interval_tables(head, frame, probs.tolist())
    assert img.index.tolist() == [0, 1, 2, 3] and img.subject.tolist() == ['7', '3', '7', '3']
    for k, v in head.summary(probs).items(): np.testing.assert_allclose(img[k], v)
    assert subj.subject.tolist() == ['7', '3'] and subj.n_images.tolist() == [2, 2] and subj.age.tolist() == [35.0, 47.0]
    for k, v in head.summary(np.stack([probs[[0, 2]].mean(0), probs[[1, 3]].mean(0)])).items(): np.testing.assert_allclose(subj[k], v)
    _, no_age = RN.interval_tables(head, frame[['subject']], probs)
    assert 'age' not in no_age
    _, none = RN.interval_tables(head, frame.iloc[:0], probs[:0])
    assert none.empty and none.shape[0] == 0
    img = pd.DataFrame({'age': [30.0, 40.0, np.nan, 50.0], 'lo80': [25, 41, 0, 45], 'hi80': [30, 45, 99, 55],
                        'lo95': [20, 35, 0, 40], 'hi95': [35, 45, 99, 60], 'pred_sd': [1.0, 2.0, 3.0, 4.0]})
    c = RN.calibration(img, img.iloc[[0]])
    assert c['nominal'] == {'80': 0.8, '95': 0.95}
    assert c['images'] == {'n': 3, 'coverage_80': 2 / 3, 'coverage_95': 1.0, 'mean_pred_sd': pytest.approx(7 / 3)}
    assert c['subjects'] == {'n': 1, 'coverage_80': 1.0, 'coverage_95': 1.0, 'mean_pred_sd': 1.0}
    e = RN.calibration(img.iloc[:0], img.drop(columns='age'))
    assert e['images'] == e['subjects'] == {'n': 0, 'coverage_80': None, 'coverage_95': None, 'mean_pred_sd': None}


# ---- agenb.predict: a --subject-views run through predict_images and its subject table --------------------------------------

from agenb.files import DEFAULT_PATTERN
from agenb.model import fit_covariates
from agenb.predict import predict_images, subject_table


def views_images(seed=4):
    "uint8 images (8, 1, 8, 8): subject 2 three images, subject 10 two, subject 1 one, and two files without a subject."
    names = [Path(n) for n in ('anon_2_1.png', 'anon_10_1.png', 'x.png', 'anon_2_2.png', 'anon_1_1.png', 'anon_10_2.png',
                               'y.png', 'anon_2_3.png')]
    return torch.randint(0, 256, (len(names), 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8), names


GROUPS = [[0, 3, 7], [1, 5], [2], [4], [6]]            # subjects 2, 10, x.png, 1, y.png: in order of first appearance


def pooled(rm, imgs, groups=GROUPS, cov=None):
    x = rm.prep.normalize(imgs.float() / 255)
    with torch.no_grad():
        return torch.cat([rm.model(x[g][None], *(() if cov is None else (cov[g].mean(0, keepdim=True),))) for g in groups])


def test_predict_images_of_a_subject_views_run_one_row_per_subject():
    rm = views_model('attention')
    rm.pattern = DEFAULT_PATTERN
    imgs, names = views_images()
    with pytest.raises(InputError, match=r"^--tta is not available for a --subject-views run \(it predicts from all of a subject's "
                                         r"images pooled\); drop --tta$"):
        predict_images(rm, names, 3, tta=True, decoded=(imgs, names))
    df, skipped, _ = predict_images(rm, names, 3, decoded=(imgs, names))
    assert df.columns.tolist() == ['path', 'filename', 'subject', 'image_index', 'n_images', 'pred'] and skipped == []
    assert df.filename.tolist() == ['anon_2_1.png', 'anon_10_1.png', 'x.png', 'anon_1_1.png', 'y.png']
    assert df.n_images.tolist() == [3, 2, 1, 1, 1] and df.index.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(df.pred, pooled(rm, imgs)[:, 0].double().numpy(), atol=1e-5)   # files without a subject: alone
    per, _, _ = predict_images(rm, names, 3, decoded=(imgs, names), per_image=True)
    at = [0, 1, 2, 0, 3, 1, 4, 0]
    assert per.filename.tolist() == [n.name for n in names] and per.n_images.tolist() == [[3, 2, 1, 1, 1][k] for k in at]
    np.testing.assert_allclose(per.pred, df.pred.to_numpy()[at], atol=1e-9)
    s = subject_table(df)
    assert s.subject.tolist() == ['1', '2', '10'] and s.n_images.tolist() == [1, 3, 2]          # the images behind each row


def test_predict_images_of_a_subject_views_covariate_run():
    rm = views_model('mean', n_cov=2)
    rm.pattern = DEFAULT_PATTERN
    rm.covariate_stats = fit_covariates(np.array([[20.0], [30.0], [26.0]]), ('bmi',))
    imgs, names = views_images(5)
    bmi = [18.0, 24.0, 31.0, np.nan, 40.0, 22.0, 27.0, 35.0]
    table = pd.DataFrame({'path': [str(n.resolve()) for n in names], 'bmi': bmi})
    df, _, _ = predict_images(rm, names, 2, decoded=(imgs, names), table=table)
    cov = rm.covariates_for(table, 'x')
    np.testing.assert_allclose(df.pred, pooled(rm, imgs, cov=cov)[:, 0].double().numpy(), atol=1e-5)
    assert df.attrs['covariates_imputed'] == 1


def test_predict_images_of_a_subject_views_distribution_run_intervals_of_the_pooled_distribution():
    head = DistributionHead(parse_age_bins('0:60:10'), 2)
    rm = views_model('attention', head=head)
    rm.pattern = DEFAULT_PATTERN
    imgs, names = views_images(6)
    df, _, _ = predict_images(rm, names, 3, decoded=(imgs, names))
    probs = torch.softmax(pooled(rm, imgs), 1).numpy()
    assert df.attrs['probs'].shape == (5, 6) and np.allclose(df.attrs['probs'], probs, atol=1e-5)
    for k, v in head.summary(probs).items(): np.testing.assert_allclose(df[k], v, atol=1e-4, err_msg=k)
    sub = subject_table(df, rm)
    assert sub.subject.tolist() == ['1', '2', '10'] and np.allclose(sub.dist_sd, head.summary(probs[[3, 0, 1]])['pred_sd'], atol=1e-4)


# ---- agenb.predict: an experiment's test subjects stay closed to predict ---------------------------------------------------

from agenb.predict import experiment_of, experiment_test_images


@pytest.fixture()
def closed_exp(tmp_path):
    "An experiment folder (test subjects 3 and 12) over a data folder of five images, and its final split."
    data = tmp_path / 'data'
    data.mkdir()
    for s, k in ((3, 1), (3, 2), (12, 1), (4, 1), (5, 1)):
        (data / f'anon_{s}_{k}.png').write_bytes(bytes([s, k]) * (10 + s + k))
    exp = tmp_path / 'exp'
    (exp / 'splits').mkdir(parents=True)
    (exp / 'experiment.json').write_text(json.dumps({'name': 'e', 'test_subjects': ['3', '12'], 'data': {'image_dir': str(data)}}))
    rows = [(data / f'anon_{s}_{k}.png', str(s), 'test' if s in (3, 12) else 'train') for s, k in ((3, 1), (3, 2), (12, 1), (4, 1), (5, 1))]
    pd.DataFrame({'path': [str(p) for p, _, _ in rows], 'subject': [s for _, s, _ in rows], 'split': [x for _, _, x in rows]}
                 ).to_csv(exp / 'splits' / 'final.csv', index=False)
    return exp, data


def test_experiment_test_images_by_name_in_its_folders_and_by_bytes_anywhere(closed_exp, tmp_path):
    exp, data = closed_exp
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'anon_3_1.png').write_bytes(b'not the same bytes, other size')               # a test name outside its folders
    (other / 'renamed.png').write_bytes((data / 'anon_12_1.png').read_bytes())          # a test image's copy, renamed
    (other / 'same_size.png').write_bytes(b'\0' * (data / 'anon_3_2.png').stat().st_size)   # its size, other bytes
    (other / 'anon_4_1.png').write_bytes((data / 'anon_4_1.png').read_bytes())          # a copy of a training image
    paths = [other / 'renamed.png', data / 'anon_4_1.png', data / 'anon_3_2.png', other / 'anon_3_1.png', data / 'anon_12_1.png',
             other / 'same_size.png', other / 'anon_4_1.png', data / 'anon_5_1.png', data / 'anon_3_1.png']
    hits = experiment_test_images(exp, paths)
    assert list(hits.items()) == [(str(other / 'renamed.png'), '12'), (str(data / 'anon_3_2.png'), '3'),
                                  (str(data / 'anon_12_1.png'), '12'), (str(data / 'anon_3_1.png'), '3')]
    assert experiment_test_images(exp, [other / 'same_size.png', data / 'anon_5_1.png']) == {}


def test_experiment_test_images_with_the_experiments_pattern_and_no_test_subjects(closed_exp):
    exp, data = closed_exp
    rec = json.loads((exp / 'experiment.json').read_text())
    (data / 'img-3-9.png').write_bytes(b'x' * 7)
    (exp / 'experiment.json').write_text(json.dumps({**rec, 'data': {**rec['data'], 'pattern': r'^img-(\d+)-(\d+)\.png$'}}))
    assert experiment_test_images(exp, [data / 'img-3-9.png', data / 'anon_5_1.png']) == {str(data / 'img-3-9.png'): '3'}
    (exp / 'experiment.json').write_text(json.dumps({**rec, 'data': {'image_dir': [str(data / 'x'), str(data)]}}))   # a list of folders
    assert experiment_test_images(exp, [data / 'anon_3_1.png']) == {str(data / 'anon_3_1.png'): '3'}
    (exp / 'experiment.json').write_text(json.dumps({**rec, 'test_subjects': []}))
    assert experiment_test_images(exp, [data / 'anon_3_1.png']) == {}


def test_experiment_of_a_run_folder(tmp_path):
    exp = tmp_path / 'exp'
    for d in ('runs/job/run_1', 'final/job/run_1', 'runs/job/run_1/deeper'): (exp / d).mkdir(parents=True)
    (exp / 'experiment.json').write_text('{}')
    assert experiment_of(exp / 'runs' / 'job' / 'run_1') == exp.resolve() and experiment_of(exp / 'final' / 'job' / 'run_1') == exp.resolve()
    assert experiment_of(exp / 'runs' / 'job' / 'run_1' / 'deeper') is None and experiment_of(tmp_path) is None


def test_predict_split_of_a_subject_views_covariate_run(synth_root, tmp_path):
    "predict_split of a --subject-views --covariates bmi run: each subject's mean covariate inputs join its pooled images."
    from agenb.data import load_dataset
    from agenb.model import covariate_inputs
    img_dir, xlsx = synth_root / 'TA' / 'Healthy' / 'Images', synth_root / 'TA' / 'characteristics.xlsx'
    t = load_dataset(img_dir, xlsx)[0]
    t = t[t.subject.isin(list(dict.fromkeys(t.subject))[:3])].reset_index(drop=True)
    prep = Preprocessing(image_size=32)
    o = resolve_options({'image_dir': str(img_dir), 'excel_path': str(xlsx), 'arch': 'resnet18', 'image_size': 32, 'dropout': 0.2,
                         'covariates': 'bmi', 'subject_views': 2})
    run = tmp_path / 'run_20260101_000002'; run.mkdir()
    (run / 'config.json').write_text(json.dumps({'args': o.to_dict(), 'preprocessing': prep.to_dict(), 'augmentation': {}}))
    raw = t[['bmi']].to_numpy(dtype=float)
    stats = fit_covariates(raw, ('bmi',))
    torch.manual_seed(3)
    model = build_model('resnet18', pretrained=False, dropout=0.2, n_covariates=2, view_pool='mean')
    torch.save(RN.make_checkpoint(model.state_dict(), 1, 5.0, o, prep.to_dict(), covariates=stats), run / 'best_model.pth')
    t.assign(split='test')[['path', 'filename', 'subject', 'age', 'split']].to_csv(run / 'split.csv', index=False)
    p = RN.predict_split(run)
    assert p.columns.tolist() == ['path', 'filename', 'subject', 'age', 'split', 'n_images', 'pred']
    model.eval()
    x = prep.normalize(load_images(list(t.path), prep).float() / 255)
    cov = covariate_inputs(raw, stats)
    rows = [np.flatnonzero(t.subject.to_numpy() == s) for s in dict.fromkeys(t.subject)]
    with torch.no_grad(): want = [float(model(x[r][None], cov[r].mean(0, keepdim=True))[0, 0]) for r in rows]
    np.testing.assert_allclose(p.pred, want, atol=1e-4, rtol=0)


def test_per_subject_and_interval_tables_columns():
    table = pd.DataFrame({'path': list('abcd'), 'subject': ['1', '2', '1', '1']}, index=[7, 8, 9, 10])
    rows = RN.per_subject_rows(table, [np.array([0, 2, 3]), np.array([1])])
    assert rows.columns.tolist() == ['path', 'subject', 'n_images'] and rows.index.tolist() == [0, 1]
    assert rows.path.tolist() == ['a', 'b'] and rows.n_images.tolist() == [3, 1]
    head = DistributionHead(parse_age_bins('20:60:10'), 2)
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    frame = pd.DataFrame({'subject': ['7', '3', '7']}, index=[4, 5, 6])
    img, subj = RN.interval_tables(head, frame, probs)
    assert img.columns.tolist() == ['subject', 'pred', 'pred_sd', 'lo80', 'hi80', 'lo95', 'hi95'] and img.index.tolist() == [0, 1, 2]
    assert subj.n_images.tolist() == [2, 1] and subj.columns.tolist()[:2] == ['subject', 'n_images']
    mix = np.stack([probs.astype(float)[[0, 2]].mean(0), probs.astype(float)[1]])                # mixed in float64
    for k, v in head.summary(mix).items(): np.testing.assert_allclose(subj[k], v, rtol=0, atol=1e-12, err_msg=k)


def test_model_kwargs_of_options_without_the_newer_fields():
    "Options objects of older runs may lack subject_views or view_pool: no views, or mean pooling."
    assert RN.model_kwargs(SimpleNamespace(dropout=0.1)) == {'dropout': 0.1, 'outputs': 1, 'n_covariates': 0, 'view_pool': None}
    assert RN.model_kwargs(SimpleNamespace(dropout=0.1, subject_views=2))['view_pool'] == 'mean'


def test_experiment_test_images_ids_like_missing_values_and_empty_files(tmp_path):
    data, exp = tmp_path / 'data', tmp_path / 'exp'
    data.mkdir(); (exp / 'splits').mkdir(parents=True)
    (data / 'anon_NA_1.png').write_bytes(b'abc')
    (data / 'anon_7_1.png').write_bytes(b'')                                             # an empty test image
    (exp / 'experiment.json').write_text(json.dumps({'name': 'e', 'test_subjects': ['NA', '7'],
                                                     'data': {'image_dir': str(data), 'pattern': r'^anon_(\w+)_(\d+)\.png$'}}))
    pd.DataFrame({'path': [str(data / 'anon_NA_1.png'), str(data / 'anon_7_1.png')], 'subject': ['NA', '7'], 'split': 'test'}
                 ).to_csv(exp / 'splits' / 'final.csv', index=False)
    (tmp_path / 'copy.png').write_bytes(b'abc')
    (tmp_path / 'empty.png').write_bytes(b'')
    assert experiment_test_images(exp, [tmp_path / 'copy.png', tmp_path / 'empty.png']) == {
        str(tmp_path / 'copy.png'): 'NA', str(tmp_path / 'empty.png'): '7'}
