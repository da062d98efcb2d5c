"""The experiment statistics (agenb.stats) checked as a decision rule must be: by simulation. Out-of-fold predictions
of variants that are all equal must rarely raise a flag (family-wise 5% per column, at most 10% in all), and a variant
whose errors are 30% smaller must be found. Seeded, no training: a few seconds each."""
import numpy as np
import pandas as pd
import pytest

from agenb.stats import flag_rates, leaderboard, simulate_oof, OOF_COLUMNS

N_EXPERIMENTS, N_BOOT = 200, 2000


def test_null_one_seed_rarely_flags():
    "10 equal variants, 40 subjects, 5 folds, 1 seed: any flag in at most 10% of experiments (the old board: 64%)."
    r = flag_rates(N_EXPERIMENTS, N_BOOT, seed=1, n_variants=10, n_subjects=40, n_folds=5, n_seeds=1)
    print('null, 1 seed:', r)
    assert r['any'] <= 0.10 and r['baseline'] <= 0.075 and r['best'] <= 0.075, r


def test_null_with_fold_model_noise_rarely_flags():
    "The same with a random shift per variant, seed and fold (SD 2 years) over 3 seeds (the old board: 74%)."
    r = flag_rates(N_EXPERIMENTS, N_BOOT, seed=2, n_variants=10, n_subjects=40, n_folds=5, n_seeds=3, fold_sd=2.0)
    print('null, fold noise, 3 seeds:', r)
    assert r['any'] <= 0.10, r


def test_a_real_difference_is_found():
    "A variant with 30% smaller per-subject errors than the baseline's: flagged against the baseline in >= 80%."
    r = flag_rates(N_EXPERIMENTS, N_BOOT, seed=3, n_variants=10, n_subjects=100, n_folds=5, n_seeds=2, better='v1')
    print('power:', r)
    assert r['better_found'] >= 0.80, r


def test_subject_only_intervals_would_not_hold_under_fold_noise():
    """Why seeds are resampled: the same fold-noise experiments, with the seeds pooled into one (subject-only
    intervals), flag equal variants far more often than the two-level board does."""
    pooled = sum(bool(leaderboard(simulate_oof(n_seeds=3, fold_sd=2.0, seed=k).assign(seed=0), 'v0', 1000, k)
                      [['distinguishable_from_baseline', 'distinguishable_from_best']].to_numpy().any()) for k in range(60))
    two_level = sum(bool(leaderboard(simulate_oof(n_seeds=3, fold_sd=2.0, seed=k), 'v0', 1000, k)
                         [['distinguishable_from_baseline', 'distinguishable_from_best']].to_numpy().any()) for k in range(60))
    assert pooled > two_level and pooled / 60 > 0.08, (pooled, two_level)


def test_one_measure_ranks_and_compares():
    """Rank, best and every difference use the subject-level MAE: a variant with a smaller image-pooled MAE but a
    larger subject-level MAE ranks below, and no variant is "better than the best"."""
    rows = []
    # subject 1 has 4 images, subjects 2 and 3 one each: a's errors are small on the many images, b's on the few
    for v, errs in (('a', [1, 1, 1, 1, 5, 5]), ('b', [4, 4, 4, 4, 1, 1])):
        for i, (s, e) in enumerate(zip(['1', '1', '1', '1', '2', '3'], errs)):
            rows.append({'variant': v, 'seed': 0, 'fold': int(s) % 2, 'subject': s, 'file': f'f{i}', 'age': 40.0, 'prediction': 40.0 + e})
    b = leaderboard(pd.DataFrame(rows), baseline='a', n_boot=500).set_index('variant')
    assert b.loc["a", "image_mae"] == pytest.approx(14 / 6) and b.loc["b", "image_mae"] == pytest.approx(18 / 6)
    assert b.loc['a', 'subject_mae'] == pytest.approx((1 + 5 + 5) / 3) and b.loc['b', 'subject_mae'] == pytest.approx((4 + 1 + 1) / 3)
    assert b.loc['b', 'rank'] == 1 and b['best'].iloc[0] == 'b'
    assert (b['diff_to_best'] >= 0).all()


def test_refuses_unpaired_and_malformed_tables():
    from agenb.core import InputError
    oof = simulate_oof(n_variants=2, n_subjects=10, seed=0)
    with pytest.raises(InputError, match='variant v1 .seed 0. has no prediction for 1 of the 10 subjects'):
        leaderboard(oof[~((oof['variant'] == 'v1') & (oof['subject'] == '10'))])
    with pytest.raises(InputError, match='missing column'):
        leaderboard(oof.drop(columns=['age']))
    assert list(oof.columns) == OOF_COLUMNS
