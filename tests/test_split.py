"Integration tests of agenb.split: subject-level splits, leakage guard, stratification, k-fold, split files, filtering."
import json, math

import numpy as np
import pandas as pd
import pytest

from agenb.core import InputError
from agenb.split import (SPLITS, apply_filter, check_no_leakage, load_split, make_split, save_split, split_stats)


def table(n_subjects=80, seed=0, age_range=(0, 89.9), ids=None):
    "One row per image like agenb.data.load_dataset: most subjects 3 images, some 1 or 2."
    rng = np.random.default_rng(seed)
    ids = ids or [str(i) for i in range(1, n_subjects + 1)]
    rows = []
    for s in ids:
        age = round(float(rng.uniform(*age_range)), 1)
        for k in range(1, int(rng.choice([1, 2, 3, 3, 3, 3, 3])) + 1):
            rows.append(dict(path=f'/data/anon_{s}_{k}.png', filename=f'anon_{s}_{k}.png', subject=s,
                             image_index=k, age=age, bmi=float(rng.uniform(15, 35)) if rng.random() > 0.15 else np.nan))
    return pd.DataFrame(rows)


def per_subject(t, split):
    "subject -> split (asserting each subject has one split)."
    m = pd.DataFrame({'s': t.subject.values, 'l': np.asarray(split)}).drop_duplicates()
    assert not m.s.duplicated().any()
    return dict(zip(m.s, m.l))


@pytest.mark.parametrize('stratify', [False, True])
def test_no_overlap_many_seeds(stratify):
    t = table(120)
    for seed in range(40):
        sp, info = make_split(t, seed=seed, stratify=stratify, bin_width=20)
        assert sp.index.equals(t.index) and set(sp) == set(SPLITS)
        sets = {k: set(t.subject[sp == k]) for k in SPLITS}
        assert not (sets['train'] & sets['val'] or sets['train'] & sets['test'] or sets['val'] & sets['test'])
        assert set().union(*sets.values()) == set(t.subject)
        assert info['split_method'] == 'by_subject_id' and info['data_leakage_prevention'] is True
        assert info['leakage_check'] == check_no_leakage(t, sp)
        assert info['leakage_check']['subjects'] == {'train': 84, 'val': 12, 'test': 24}
        assert info['stratified'] is stratify and info['stratify_fallback'] is None


def test_seed_config_sizes():
    "1,021 subjects with test 0.2: 205 test subjects, as in the group's config; val_size is a share of all subjects."
    t = table(1021, seed=1)
    sp, info = make_split(t)
    st = split_stats(t, sp)
    assert (st['test_subjects'], st['val_subjects'], st['train_subjects'], st['total_subjects']) == (205, 103, 713, 1021)
    assert st['total_samples'] == len(t) == st['train_samples'] + st['val_samples'] + st['test_samples']
    assert list(st)[:8] == ['total_samples', 'train_samples', 'val_samples', 'test_samples',
                            'train_subjects', 'val_subjects', 'test_subjects', 'total_subjects']
    for k in SPLITS:
        a = st['age_summary'][k]
        assert a['min'] <= a['mean'] <= a['max'] and a['sd'] > 0
    json.dumps(info), json.dumps(st)


@pytest.mark.parametrize('kw', [{}, {'stratify': True}, {'folds': 4, 'fold': 2}, {'folds': 4, 'fold': 1, 'stratify': True},
                                {'method': 'by_image'}])
def test_deterministic_under_row_order(kw, capsys):
    ids = [f'{i:03d}' for i in range(1, 41)] + [f'P{i}' for i in range(1, 21)] + [str(i) for i in range(100, 120)]
    t = table(ids=ids, seed=4)
    sp, info = make_split(t, seed=11, bin_width=30, **kw)
    for r in range(3):
        ts = t.sample(frac=1, random_state=r).reset_index(drop=True)
        sp2, info2 = make_split(ts, seed=11, bin_width=30, **kw)
        key = lambda tt, s: dict(zip(tt.path, s))
        assert key(ts, sp2) == key(t, sp)
        assert info2['split_sha256'] == info['split_sha256'] and info2['subjects_sha256'] == info['subjects_sha256']


def test_seed_changes_split():
    t = table(60)
    assert per_subject(t, make_split(t, seed=1)[0]) != per_subject(t, make_split(t, seed=2)[0])


def test_stratified_bins_populated():
    t = table(150, seed=5)
    bins = (t.age // 10).astype(int)
    sp, info = make_split(t, stratify=True, test_size=0.15, val_size=0.15)
    assert info['stratified'] and info['stratify_fallback'] is None
    assert sum(info['age_bins'].values()) == t.subject.nunique() and len(info['age_bins']) == 9
    for k in SPLITS:
        assert set(bins[sp == k]) == set(bins), k
    # subject counts per bin in test follow the bin sizes (within one subject)
    sb = t.groupby('subject').age.first() // 10
    test_s = set(t.subject[sp == 'test'])
    for b, n in sb.value_counts().items():
        assert abs(sum(1 for s in test_s if sb[s] == b) - 0.15 * n) <= 1.5


@pytest.mark.parametrize('kw,expect', [({}, "age bin '90-100' has 1 subjects"),
                                      ({'folds': 5, 'fold': 0}, 'stratification needs at least 5 per bin'),
                                      ({'val_size': 0.02}, 'scikit-learn could not stratify')])
def test_stratify_fallback_recorded_and_warned(kw, expect, capsys):
    t = table(100, seed=2)
    t = pd.concat([t, pd.DataFrame([dict(path='/x/anon_500_1.png', filename='anon_500_1.png', subject='500',
                                         image_index=1, age=93.0)])], ignore_index=True)
    if 'val_size' in kw: t = t[t.subject != '500']   # all bins big enough, but 2 val subjects < 9 bins
    sp, info = make_split(t, stratify=True, **kw)
    assert info['stratified'] is False and info['stratify_requested'] is True
    assert expect in info['stratify_fallback']
    assert 'agenb: warning: age stratification not possible' in capsys.readouterr().err
    assert info['data_leakage_prevention'] is True  # still a subject split, still checked
    unstrat, _ = make_split(t, **kw)
    assert per_subject(t, sp) == per_subject(t, unstrat)


@pytest.mark.parametrize('stratify', [False, True])
def test_kfold_covers_every_subject_once(stratify):
    t = table(97, seed=3)
    K = 5
    test_of = {}
    for f in range(K):
        sp, info = make_split(t, folds=K, fold=f, stratify=stratify, bin_width=30, val_size=0.1)
        assert info['stratified'] is stratify and info['data_leakage_prevention']
        assert info['leakage_check']['subjects']['val'] == math.ceil(0.1 * 97)
        for s in set(t.subject[sp == 'test']):
            assert s not in test_of, f'subject {s} in test folds {test_of.get(s)} and {f}'
            test_of[s] = f
        assert 17 <= info['leakage_check']['subjects']['test'] <= 22
    assert set(test_of) == set(t.subject)


def test_split_file_round_trip(tmp_path):
    t = table(70, seed=6)
    sp, info = make_split(t, seed=5, stratify=True, bin_width=30)
    f = save_split(t, sp, tmp_path / 'split.csv')
    df = load_split(f)
    assert list(df.columns) == ['path', 'filename', 'subject', 'age', 'split']
    assert df.subject.tolist() == t.subject.tolist() and df.split.tolist() == sp.tolist()
    ts = t.sample(frac=1, random_state=0)
    sp2, info2 = make_split(ts, split_file=f, seed=999, test_size=0.5)   # seed/sizes ignored with a split file
    assert sp2.index.equals(ts.index) and (sp2 == sp.reindex(ts.index)).all()
    assert info2['split_sha256'] == info['split_sha256'] and info2['split_file'] == str(f)
    assert info2['data_leakage_prevention'] and len(info2['split_file_sha256']) == 64
    # a table with fewer subjects than the file (filtered) is fine
    sub = t[t.subject.astype(int) > 10]
    sp3, info3 = make_split(sub, split_file=f)
    assert (sp3 == sp[sub.index]).all() and info3['split_file_extra_subjects'] == 10


def test_split_file_errors(tmp_path):
    t = table(30, seed=7)
    sp, _ = make_split(t)
    f = save_split(t, sp, tmp_path / 'split.csv')
    df = load_split(f)
    df[df.subject != '12'].to_csv(tmp_path / 'missing.csv', index=False)
    with pytest.raises(InputError, match=r"missing\.csv has no entry for subject '12'"):
        make_split(t, split_file=tmp_path / 'missing.csv')
    s = df.subject[df.subject.duplicated()].iloc[0]
    i = df.index[df.subject == s][0]
    df.loc[i, 'split'] = 'train' if df.loc[i, 'split'] != 'train' else 'test'
    df.to_csv(tmp_path / 'mixed.csv', index=False)
    with pytest.raises(InputError, match=rf"mixed\.csv: subject '{s}' has images in"):
        make_split(t, split_file=tmp_path / 'mixed.csv')
    with pytest.raises(InputError, match='does not exist'):
        make_split(t, split_file=tmp_path / 'nope.csv')
    (tmp_path / 'cols.csv').write_text('file,group\na,train\n')
    with pytest.raises(InputError, match=r'cols\.csv has no column'):
        load_split(tmp_path / 'cols.csv')


def test_split_file_keeps_leading_zeros(tmp_path):
    t = table(ids=['007', '7', '08', 'A1', '10', '11', '12', '13', '14', '15'], seed=8)
    sp, _ = make_split(t, test_size=0.2, val_size=0.1)
    save_split(t, sp, tmp_path / 's.csv')
    assert set(load_split(tmp_path / 's.csv').subject) == set(t.subject)
    sp2, _ = make_split(t, split_file=tmp_path / 's.csv')
    assert (sp2 == sp).all()


def test_guard_catches_corrupted_split():
    t = table(40, seed=9)
    sp, _ = make_split(t)
    multi = t.subject.value_counts()
    s = next(x for x in t.subject[sp == 'test'] if multi[x] > 1)
    bad = sp.copy()
    bad[t.index[t.subject == s][0]] = 'train'
    with pytest.raises(InputError, match=rf"data leakage: subject '{s}' has images in more than one split"):
        check_no_leakage(t, bad)
    with pytest.raises(InputError, match='does not cover every row'):
        check_no_leakage(t, sp.drop(sp.index[3]))
    nan = sp.copy(); nan.iloc[0] = None
    with pytest.raises(InputError, match='has split None'):
        check_no_leakage(t, nan)


@pytest.mark.parametrize('kw', [{}, {'stratify': True, 'bin_width': 20}, {'folds': 5, 'fold': 3}])
def test_stable_under_filtering(kw):
    t = table(200, seed=10)
    full, finfo = make_split(t, **kw)
    rng = np.random.default_rng(1)
    drop = set(rng.choice(sorted(set(t.subject)), size=20, replace=False))  # 10% of the subjects
    mask = ~t.subject.isin(drop)
    kept, info = make_split(t, keep=mask, **kw)
    assert kept.index.equals(t.index[mask])
    assert (kept == full[mask]).all()                                  # nobody moved
    assert info['n_subjects_excluded'] == 20 and info['n_subjects_split'] == 200
    assert info['subjects_sha256'] == finfo['subjects_sha256'] and info['leakage_check']['n_subjects'] == 180
    t2, s2 = apply_filter(t, full, mask.to_numpy())
    assert t2.equals(t[mask]) and (s2 == kept).all()
    # a covariate filter (missing BMI drops images, not whole subjects) works the same way
    bmask = t.bmi.notna()
    kb, _ = make_split(t, keep=bmask, **kw)
    assert (kb == full[bmask]).all()


def test_filter_then_split_would_move_subjects():
    "Why keep= exists: splitting the filtered table instead reshuffles many subjects."
    t = table(200, seed=10)
    full, _ = make_split(t)
    mask = t.subject.astype(int) % 10 != 0
    naive, _ = make_split(t[mask])
    moved = (naive != full[mask]).groupby(t.subject[mask]).any().sum()
    assert moved > 20


def test_by_image_only_measures(capsys):
    t = table(60, seed=11)
    sp, info = make_split(t, method='by_image')
    assert "method='by_image' splits images" in capsys.readouterr().err
    assert info['split_method'] == 'by_image' and info['data_leakage_prevention'] is False
    assert info['leakage_check']['ran'] is False and info['leakage_check']['leaking_subjects'] > 0
    assert (sp == 'test').sum() == math.ceil(0.2 * len(t))
    with pytest.raises(InputError, match='data leakage'):
        check_no_leakage(t, sp)
    with pytest.raises(InputError, match='by_subject_id'):
        make_split(t, method='by_image', folds=5)


@pytest.mark.parametrize('kw,msg', [({'test_size': 0}, 'test_size must be between 0 and 1'),
                                    ({'test_size': -0.1}, 'test_size must be between 0 and 1'),
                                    ({'test_size': 0.6, 'val_size': 0.4}, 'leaves no subjects for training'),
                                    ({'val_size': -0.1}, 'val_size must be >= 0'),
                                    ({'test_size': '0.2'}, 'test_size must be a number'),
                                    ({'folds': 1}, 'folds must be an integer >= 2'),
                                    ({'folds': 3, 'fold': 3}, 'fold must be an integer from 0 to 2'),
                                    ({'folds': 500}, 'more than the 20 subjects'),
                                    ({'seed': -1}, 'random_seed must be a non-negative integer'),
                                    ({'stratify': True, 'bin_width': 0}, 'bin_width must be a positive'),
                                    ({'keep': [True] * 3}, 'keep (the filter mask) has 3 entries'),
                                    ({'method': 'random'}, "split method 'random' is unknown")])
def test_bad_options_are_input_errors(kw, msg):
    t = table(20, seed=12)
    with pytest.raises(InputError) as e:
        make_split(t, **kw)
    assert msg in str(e.value)


def test_val_size_zero_and_missing_age():
    t = table(60, seed=13)
    sp, info = make_split(t, val_size=0)
    assert set(sp) == {'train', 'test'} and split_stats(t, sp)['val_samples'] == 0
    t.loc[t.subject == t.subject[5], 'age'] = np.nan
    make_split(t)  # age is not needed without stratification
    sp, info = make_split(t, stratify=True, bin_width=30, keep=t.age.notna())   # split everything, then drop the no-age subject
    assert "age bin 'no age' has 1 subjects" in info['stratify_fallback'] and t.subject[5] not in set(t.subject[sp.index])
    t.loc[t.subject == t.subject[20], 'age'] = np.nan
    full, info = make_split(t, stratify=True, bin_width=30)
    assert info['stratified'] and info['age_bins']['no age'] == 2
    kept, _ = make_split(t, stratify=True, bin_width=30, keep=t.age.notna())
    assert (kept == full[t.age.notna()]).all()


def test_leakage_record_and_message():
    t = table(12, seed=3)
    sp, _ = make_split(t, seed=0)
    subj = {k: set(t.subject[sp == k]) for k in SPLITS}
    assert check_no_leakage(t, sp) == {'ran': True, 'passed': True, 'n_rows': len(t), 'n_subjects': 12,
                                       'subjects': {k: len(v) for k, v in subj.items()},
                                       'shared_subjects': {'train_val': 0, 'train_test': 0, 'val_test': 0}}
    # subjects '2' (8 images) and '10' each sit in two splits: the message names '2' (natural order) and its first 6 rows
    ids = ['10', '10'] + ['2'] * 8 + ['3', '3']
    t2 = pd.DataFrame({'path': [f'/d/anon_{s}_{i}.png' for i, s in enumerate(ids)], 'subject': ids, 'age': 30.0,
                       'filename': [f'anon_{s}_{i}.png' for i, s in enumerate(ids)], 'image_index': range(12)})
    sp2 = pd.Series(['train', 'val'] + ['train'] * 4 + ['test'] * 4 + ['val', 'val'])
    with pytest.raises(InputError) as e: check_no_leakage(t2, sp2)
    msg = str(e.value)
    assert "subject '2' has images" in msg and '2 subject(s) leak' in msg
    assert msg.count('anon_2_') == 6 and 'anon_10_' not in msg and 'anon_2_2.png in train' in msg


def test_keep_mask_forms_and_refusals():
    "The age filter's mask: a Series (any row order), a list of 0/1 or booleans; bad masks are refused by name."
    t = table(20, seed=4)
    want, _ = make_split(t, seed=1)
    young = (t.age < 50).to_numpy()
    for keep in (pd.Series(young, index=t.index)[::-1], young.astype(int).tolist(), list(young)):
        sp, info = make_split(t, seed=1, keep=keep)
        assert list(sp.index) == list(t.index[young]) and (sp == want[young]).all()
        assert info['n_images_excluded'] == int((~young).sum())
    for keep, msg in ((pd.Series(young[:-1], index=t.index[:-1]), 'does not cover every row'),
                      (young[:3], f'has 3 entries but the table has {len(t)} rows'),
                      (np.array(True), f'has 0 entries but the table has {len(t)} rows'),
                      ([2] * len(t), 'must be True/False'), (['yes'] * len(t), 'must be True/False'),
                      (pd.Series([[1]] * len(t), index=t.index), 'must be True/False'),        # unhashable values
                      (np.zeros(len(t), bool), 'removes every image')):
        with pytest.raises(InputError, match=msg): make_split(t, seed=1, keep=keep)


@pytest.mark.parametrize('stratify', [False, True])
def test_folds_partition_the_subjects(stratify):
    "--folds 3: the three test folds are disjoint and hold every subject once (stratified or not)."
    t = table(60, seed=6)
    tests = [set(t.subject[make_split(t, seed=2, folds=3, fold=k, stratify=stratify, bin_width=30)[0] == 'test'])
             for k in range(3)]
    assert all(tests) and not (tests[0] & tests[1] or tests[0] & tests[2] or tests[1] & tests[2])
    assert set().union(*tests) == set(t.subject)


def test_the_split_of_a_table_and_seed_never_changes():
    """A run is reproducible from its config.json alone, so a table and a seed must give the same subjects in every
    agenb version. Pinned for the hold-out split (scikit-learn's GroupShuffleSplit over the image rows grouped by
    subject, for test and then validation) and for a fold of GroupKFold over the same rows: another splitter, other
    rows or another grouping would move subjects (and silently change what a rerun tests on)."""
    t = table(20, seed=5)
    for kw, test, val in (({}, ['2', '3', '15', '18'], ['10', '17']),
                          ({'folds': 4, 'fold': 1}, ['7', '8', '13', '16', '17'], ['5', '18'])):
        m = per_subject(t, make_split(t, seed=3, **kw)[0])
        assert sorted((s for s, l in m.items() if l == 'test'), key=int) == test, kw
        assert sorted((s for s, l in m.items() if l == 'val'), key=int) == val, kw
    t = table(40, seed=5)                  # a stratified fold: StratifiedGroupKFold weighs each subject by its images
    sp, info = make_split(t, seed=3, folds=3, fold=0, stratify=True, bin_width=30)
    assert info['stratified'] and sorted(t.subject[sp == 'test'].unique(), key=int) == [
        '5', '7', '8', '14', '15', '17', '22', '23', '25', '26', '30', '35', '36', '39']


def test_age_bins_are_integer_codes_with_a_stratum_for_missing_ages():
    from agenb.split import _NO_AGE, _age_bins
    b = _age_bins([5, None, 25.0, 9.99, 10], 10)
    assert b.dtype == np.int64 and b.tolist() == [0, _NO_AGE, 2, 0, 1]
