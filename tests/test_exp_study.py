"""The Optuna studies of an experiment, read back with Optuna's public API only: fixed variants and the search in two
studies of one storage, options as parameters, the variant name as a user attribute, fold results as intermediate
values, and the subject-level OOF MAE (`oof_subject_mae`) as every trial's value. No training: the workers' jobs make
run folders with made-up predictions, as the trainer leaves them."""
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from agenb.exp_db import ExpDB, default_url, write_local
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

import agenb.exp_worker as worker
from agenb.core import atomic_write_json
from agenb.exp_jobs import is_complete, read_record, variant_jobs
from agenb.exp_store import study_variants
from agenb.exp_worker import collect_oof, finish_job, make_context, release_trials, start_search_trial, worker_loop

SPEC = {'name': 'tiny', 'data': {'image_dir': 'i', 'excel_path': 'e'}, 'base': {'arch': 'resnet18', 'epochs': 1},
        'grid': {'loss': ['mae', 'mse']}, 'baseline': 'loss=mae', 'folds': 3, 'seeds': [1, 2],
        'search': {'trials': 3, 'startup_trials': 2, 'pruner': 'none',
                   'space': {'lr': {'log_uniform': [1.0e-4, 1.0e-2]}, 'loss': {'choice': ['mae', 'huber']}}}}


def make_experiment(d, spec=SPEC, n=9):
    "An experiment folder as setup_experiment leaves it, without data: spec.yaml, experiment.json, K folds of n subjects."
    d = Path(d)
    (d / 'spec.yaml').write_text(yaml.safe_dump(spec))
    K, subs = spec['folds'], [str(i) for i in range(1, n + 1)]
    folds = []
    for k in range(K):
        rest = [x for x in subs if x not in subs[k::K]]
        folds.append({'fold': k + 1, 'test_subjects': subs[k::K], 'val_subjects': rest[:1], 'train_subjects': rest[1:]})
    rec = {'name': spec['name'], 'id': 'abc', 'study_name': f'{spec["name"]}-abc', 'storage': 'default', 'folds': folds,
           'test_subjects': ['99'], 'data': {}}
    ExpDB(default_url(d), 'abc').create(rec, yaml.safe_dump(spec), 'key', 'data')   # the experiment lives in its database
    write_local(d, rec)
    return d


def error(job, subject, image):
    "How far the made-up prediction of an image is off: varies with the variant, seed, subject and image."
    return (int(subject) - 5) * (image + 1) + job.seed + len(job.variant) % 3


def fake_run_job(ctx, job, lock=None):
    "run_job without training: a finished run folder (subject s has s % 3 + 1 images) handed to finish_job."
    f = ctx.exp['folds'][job.fold - 1]
    lab = {s: p for p in ('train', 'val', 'test') for s in f[f'{p}_subjects']}
    split = pd.DataFrame([{'path': f'/i/{s}_{i}.png', 'filename': f'{s}_{i}.png', 'subject': s, 'age': 20.0 + int(s),
                           'split': p} for s, p in lab.items() for i in range(int(s) % 3 + 1)])
    run = job.dir / 'run_1'
    run.mkdir(parents=True)
    split.to_csv(run / 'split.csv', index=False)
    t = split[split.split == 'test'].drop(columns='split')
    t.assign(pred=[a + error(job, s, int(p[-5])) for a, s, p in zip(t.age, t.subject, t.path)]).to_csv(run / 'predictions.csv', index=False)
    (run / 'config.json').write_text(json.dumps({'status': 'completed', 'args': {}}))
    rec = {'key': job.key, 'variant': job.variant, 'kind': job.kind, 'trial': job.trial, 'seed': job.seed, 'fold': job.fold,
           'final': False, 'status': 'pending', 'run_dir': None, 'attempts': [], 'reused': []}
    return finish_job(ctx, job, rec, run, 'new', 0.0)


def by_hand(exp, ctx, name):
    "The subject-level OOF MAE of variant `name`, from its OOF predictions: subjects' image means, over seeds, over subjects."
    v = [v for v in study_variants(ctx.studies, ctx.spec) if v['name'] == name][0]
    oof = collect_oof(exp, ctx.exp, ctx.spec, [v])
    e = oof.assign(e=(oof.prediction - oof.age).abs())
    return e.groupby(['seed', 'subject']).e.mean().groupby('subject').mean().mean(), e.e.mean()


def load(exp):
    "The experiment's studies, as anyone would load them: Optuna's public API and the storage URL."
    url = f'sqlite:///{(exp / "study.db").resolve()}'
    return url, {name: optuna.load_study(study_name=name, storage=url) for name in optuna.get_all_study_names(url)}


@pytest.fixture(scope='module')
def done_exp(tmp_path_factory):
    "A grid of two variants and a search of three trials, two seeds x three folds each, run by one worker."
    exp = make_experiment(tmp_path_factory.mktemp('exp'))
    ctx = make_context(exp)
    events = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, 'run_job', fake_run_job)
        worker_loop(ctx, events.append)
    return exp, ctx, events


def test_fixed_variants_and_search_have_their_own_studies(done_exp):
    exp, ctx, events = done_exp
    url, studies = load(exp)
    assert sorted(studies) == ['tiny-abc', 'tiny-abc-search']
    fixed, search = studies['tiny-abc'], studies['tiny-abc-search']
    for s in (fixed, search):
        assert s.metric_names == ['oof_subject_mae'] and s.direction == optuna.study.StudyDirection.MINIMIZE
    assert sorted(t.user_attrs['variant'] for t in fixed.trials) == ['loss=mae', 'loss=mse']
    assert [t.user_attrs['variant'] for t in search.trials] == ['search-000', 'search-001', 'search-002']
    assert all(t.user_attrs['kind'] == 'search' for t in search.trials)      # TPE sees search trials only
    assert [e['variant'] for e in events if e['event'] == 'trial'] == ['search-000', 'search-001', 'search-002']


def test_fixed_trials_carry_their_options_as_categorical_parameters(done_exp):
    exp, ctx, _ = done_exp
    fixed = load(exp)[1]['tiny-abc']
    for t in fixed.trials:
        assert t.state == TrialState.COMPLETE
        assert t.params == {'loss': t.user_attrs['variant'].split('=')[1]}
        assert t.distributions == {'loss': CategoricalDistribution(['mae', 'mse'])}
        assert sorted(t.intermediate_values) == list(range(6))                 # 2 seeds x 3 folds
        runs = {k: v for k, v in t.user_attrs.items() if k.startswith('run ')}
        assert sorted((v['seed'], v['fold']) for v in runs.values()) == [(s, k) for s in (1, 2) for k in (1, 2, 3)]
        for v in runs.values():
            assert t.intermediate_values[v['step']] == v['value'] and (exp / v['run_dir'] / 'predictions.csv').is_file()


def test_search_trials_carry_the_search_space(done_exp):
    exp, ctx, _ = done_exp
    search = load(exp)[1]['tiny-abc-search']
    for t in search.trials:
        assert t.state == TrialState.COMPLETE and set(t.params) == {'lr', 'loss'}
        assert t.distributions == {'lr': FloatDistribution(1e-4, 1e-2, log=True), 'loss': CategoricalDistribution(['mae', 'huber'])}
        assert sorted(t.intermediate_values) == list(range(6))


def test_trial_value_is_the_subject_level_oof_mae(done_exp):
    exp, ctx, _ = done_exp
    _, studies = load(exp)
    for t in studies['tiny-abc'].trials + studies['tiny-abc-search'].trials:
        subject_mae, image_mae = by_hand(exp, ctx, t.user_attrs['variant'])
        assert t.value == pytest.approx(subject_mae, abs=1e-12)
        assert abs(t.value - image_mae) > 0.05                                 # not the MAE pooled over images
    for t in studies['tiny-abc'].trials:                                        # each fold: its subjects' mean error
        for v in (v for k, v in t.user_attrs.items() if k.startswith('run ')):
            rec = read_record(exp, Path(v['run_dir']).parent.name)
            p = pd.read_csv(exp / v['run_dir'] / 'predictions.csv', dtype={'subject': str})
            per_subject = p.assign(e=(p.pred - p.age).abs()).groupby('subject').e.mean().mean()
            assert v['value'] == pytest.approx(per_subject, abs=1e-12) == rec['mae']


def test_a_dead_workers_search_trial_is_taken_over(tmp_path, monkeypatch):
    "A worker dies after one fold run of its search trial: the next takes the trial over, nothing is retrained."
    monkeypatch.setattr(worker, 'run_job', fake_run_job)
    spec = {**SPEC, 'grid': None, 'baseline': None, 'search': {**SPEC['search'], 'trials': 2}}
    exp = make_experiment(tmp_path, {k: v for k, v in spec.items() if v is not None})
    first = make_context(exp)
    assert start_search_trial(first) == 'search-000'
    v = study_variants(first.studies, first.spec)[0]
    fake_run_job(first, variant_jobs(exp, first.spec, v)[0])
    release_trials(first)                                                      # its claim ends with its process
    second = make_context(exp, worker=1)
    worker_loop(second, lambda e: None)
    search = load(exp)[1]['tiny-abc-search']
    states = [(t.user_attrs['variant'], t.state) for t in search.trials]
    assert states == [('search-000', TrialState.FAIL), ('search-000', TrialState.COMPLETE), ('search-001', TrialState.COMPLETE)]
    assert search.trials[0].params == search.trials[1].params and search.trials[1].user_attrs['reopened_from'] == 0
    assert sorted(search.trials[1].intermediate_values) == list(range(6))
    assert len(list((exp / 'runs').glob('*/run_*'))) == 12                       # 2 trials x 2 seeds x 3 folds, each once
    assert search.best_trial.user_attrs['variant'] in ('search-000', 'search-001')


def test_a_pruned_search_stops_after_the_first_fold(tmp_path, monkeypatch):
    monkeypatch.setattr(worker, 'run_job', fake_run_job)
    spec = {**SPEC, 'grid': None, 'baseline': None, 'search': {**SPEC['search'], 'pruner': {'threshold': {'upper': 0.001}}}}
    exp = make_experiment(tmp_path, {k: v for k, v in spec.items() if v is not None})
    ctx = make_context(exp)
    worker_loop(ctx, lambda e: None)
    _, studies = load(exp)
    assert {n: len(s.trials) for n, s in studies.items()} == {'tiny-abc': 0, 'tiny-abc-search': 3}
    for t in studies['tiny-abc-search'].trials:
        assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [0]
    variants = study_variants(ctx.studies, ctx.spec)
    assert [v['state'] for v in variants] == ['PRUNED'] * 3 and is_complete(ctx.spec, variants)
