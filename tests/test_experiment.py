"""agenb.experiment end to end on tiny synthetic data: the protocol (OOF coverage, test subjects never used),
kill and resume, two workers on one study, a pruned search, final and its test-set openings, bad specs."""
import json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from agenb.exp_db import ExpDB, default_url
from conftest import ROOT, agenb

# Tiny fold runs: 32 px, one epoch, no report or Grad-CAM (the experiment's own report is still rendered).
TINY = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 16, 'num_workers': 1,
        'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0, 'checkpoint_every': 0}


def write_spec(path, synth_root, **kw):
    spec = {'name': 'tiny', 'data': {'image_dir': str(synth_root / 'TA' / 'Healthy' / 'Images'),
                                     'excel_path': str(synth_root / 'TA' / 'characteristics.xlsx')},
            'base': dict(TINY), 'grid': {'loss': ['mae', 'mse']}, 'baseline': 'loss=mae', 'folds': 3, 'seeds': [1],
            'test_size': 0.2, 'split_seed': 42, 'bootstrap': 200, **kw}
    spec = {k: v for k, v in spec.items() if v is not None}
    Path(path).write_text(yaml.safe_dump(spec, sort_keys=False))
    return Path(path)


def experiment(*args, timeout=900, **kw):
    return agenb('experiment', *args, timeout=timeout, **kw)


def exp_dir_of(r):
    "The experiment folder: the last line on stdout."
    return Path(r.stdout.strip().splitlines()[-1])


def job_records(exp):
    "The experiment's job records, from its database (the folder's study.db)."
    return ExpDB(default_url(exp), json.loads((exp / 'experiment.json').read_text())['id']).jobs()


def read_csv(p):
    return pd.read_csv(p, dtype={'subject': str})


def dev_images(exp, dest):
    "A folder of copies of the experiment's development images only (predict refuses its test subjects' images)."
    split = read_csv(exp / 'splits' / 'final.csv')
    dest.mkdir(parents=True, exist_ok=True)
    for p in split.path[split.split.isin(['train', 'val'])]: shutil.copy(p, dest / Path(p).name)
    return dest


def study_of(exp, search=False):
    "The experiment's study of fixed variants (or of its search), through Optuna's public API."
    e = json.loads((exp / 'experiment.json').read_text())
    return optuna.load_study(study_name=e['search_study_name' if search else 'study_name'], storage=f'sqlite:///{(exp / "study.db").resolve()}')


@pytest.fixture(scope='module')
def grid_exp(tmp_path_factory, synth_root):
    "A finished 2-variant x 3-fold x 1-seed grid (cli engine, two workers)."
    d = tmp_path_factory.mktemp('exp')
    spec = write_spec(d / 'spec.yaml', synth_root)
    r = experiment('run', spec, '--out', d / 'exp', '--workers', '2', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    assert exp_dir_of(r) == d / 'exp'
    return d / 'exp'


def test_grid_pools_oof_predictions_without_test_subjects(grid_exp):
    exp = grid_exp
    for f in ('spec.yaml', 'experiment.json', 'study.db', 'oof_predictions.csv', 'leaderboard.csv', 'report.html'):
        assert (exp / f).is_file(), f
    e = json.loads((exp / 'experiment.json').read_text())
    test, folds = set(e['test_subjects']), e['folds']
    dev = set().union(*(f['test_subjects'] for f in folds))
    assert test and dev and not test & dev and e['test_openings'] == []
    oof = read_csv(exp / 'oof_predictions.csv')
    assert list(oof.columns) == ['variant', 'seed', 'fold', 'subject', 'file', 'age', 'prediction']
    assert sorted(oof.variant.unique()) == ['loss=mae', 'loss=mse']
    for v, g in oof.groupby('variant'):
        per = g.groupby('subject').fold.unique()
        assert set(per.index) == dev and all(len(x) == 1 for x in per)          # every development subject once
        assert not g.file.duplicated().any()
        for f in folds:                                                          # ... from the fold that held it out
            assert set(g.subject[g.fold == f['fold']]) == set(f['test_subjects'])
    recs = job_records(exp)
    assert len(recs) == 6 and all(r['status'] == 'completed' and len(r['attempts']) == 1 for r in recs)
    for r in recs:                                                               # normal run folders, no test subject
        run = exp / r['run_dir']
        cfg = json.loads((run / 'config.json').read_text())
        assert cfg['status'] == 'completed' and (run / 'best_model.pth').is_file() and (run / 'history.json').is_file()
        split = read_csv(run / 'split.csv')                                     # dropped like the age filter drops rows
        assert not set(split.subject) & test and set(split.split) == {'train', 'val', 'test'}
        assert not set(read_csv(run / 'predictions.csv').subject) & test
        assert cfg['dataset']['excluded_by_split_file']['subjects'] == len(test)
    board = read_csv(exp / 'leaderboard.csv')
    need = ['variant', 'subject_mae', 'subject_mae_ci_low', 'subject_mae_ci_high', 'image_mae', 'fold_mae_mean', 'fold_mae_sd',
            'diff_to_best', 'diff_to_best_ci_low', 'diff_to_best_ci_high', 'p_to_best', 'diff_to_baseline', 'p_to_baseline',
            'distinguishable_from_best', 'distinguishable_from_baseline', 'interval_covers']
    assert [c for c in need if c not in board.columns] == [] and len(board) == 2
    assert (board.subject_mae_ci_low <= board.subject_mae).all() and (board.subject_mae <= board.subject_mae_ci_high).all()
    for _, b in board.iterrows():                                               # the one measure, recomputed from the OOF file
        g = oof[oof.variant == b.variant].assign(e=lambda d: (d.prediction - d.age).abs())
        assert abs(g.groupby('subject').e.mean().mean() - b.subject_mae) < 1e-9
        assert abs(g.e.mean() - b.image_mae) < 1e-9
    trials = study_of(exp).get_trials()
    assert sorted(t.user_attrs['variant'] for t in trials) == ['loss=mae', 'loss=mse']
    assert sorted(t.params['loss'] for t in trials) == ['mae', 'mse'] and all(set(t.params) == {'loss'} for t in trials)
    for t in trials:
        assert t.state == optuna.trial.TrialState.COMPLETE and sorted(t.intermediate_values) == [0, 1, 2]
        assert len([k for k in t.user_attrs if k.startswith('run ')]) == 3
        assert abs(t.value - board.set_index('variant').subject_mae[t.user_attrs['variant']]) < 1e-9   # one measure
    html = (exp / 'report.html').read_text()
    assert '<script' not in html.lower() and 'Leaderboard' in html and 'Subjects per fold' in html
    assert not re.findall(r'<img [^>]*src="(?!data:)', html)


def test_status(grid_exp):
    r = experiment('status', grid_exp, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'fold runs: 6 of 6 done' in r.stdout and 'complete' in r.stdout and 'test set opened 0 time(s)' in r.stdout


def alive_with(text):
    "Process ids whose command line contains `text`."
    out = []
    for p in Path('/proc').iterdir():
        if p.name.isdigit():
            try: cmd = (p / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
            except OSError: continue
            if text in cmd and 'pytest' not in cmd: out.append(int(p.name))
    return out


@pytest.mark.slow   # minutes of fold runs: make test-all
def test_killed_run_resumes_without_retraining(tmp_path, synth_root, grid_exp):
    "Killed after its first finished job, run again: the same results as the uninterrupted grid, nothing retrained."
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'loss': ['mae']}, baseline=None, report=False)
    out = tmp_path / 'exp'
    cmd = [sys.executable, '-m', 'agenb.experiment', 'run', str(spec), '--out', str(out), '--workers', '2', '--engine', 'cli']
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    line = ''
    for line in p.stderr:                                  # tqdm and job lines; kill after the first finished job
        if '] done ' in line: break
    p.kill(); p.wait(); p.stderr.close()
    assert '] done ' in line
    deadline = time.time() + 120                           # workers and their trainers follow it (PR_SET_PDEATHSIG)
    while alive_with(str(out)) and time.time() < deadline: time.sleep(1)
    assert alive_with(str(out)) == []
    first = [r for r in job_records(out) if r['status'] == 'completed']
    assert len(first) >= 1
    stamp = {r['key']: (out / r['run_dir'] / 'best_model.pth').stat().st_mtime_ns for r in first}
    r = experiment('run', spec, '--out', out, '--workers', '2', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {x['key']: x for x in job_records(out)}
    assert len(recs) == 3 and all(x['status'] == 'completed' for x in recs.values())
    for key, t in stamp.items():                           # finished before the kill: reused, never retrained
        assert recs[key]['run_dir'] == [x for x in first if x['key'] == key][0]['run_dir']
        assert len(recs[key]['attempts']) == 1 and (out / recs[key]['run_dir'] / 'best_model.pth').stat().st_mtime_ns == t
    for x in recs.values():                                # one completed run folder per job
        runs = [d for d in (out / 'runs' / x['key']).glob('run_*') if json.loads((d / 'config.json').read_text()).get('status') == 'completed']
        assert len(runs) == 1
    a = read_csv(grid_exp / 'oof_predictions.csv').query('variant == "loss=mae"').sort_values(['variant', 'file']).reset_index(drop=True)
    b = read_csv(out / 'oof_predictions.csv').sort_values(['variant', 'file']).reset_index(drop=True)
    assert a[['variant', 'fold', 'subject', 'file']].equals(b[['variant', 'fold', 'subject', 'file']])
    assert (a.prediction - b.prediction).abs().max() < 1e-4     # the same results as an uninterrupted experiment
    assert not (out / 'report.html').exists()                  # report: false in the spec
    for t in study_of(out).get_trials():
        assert sorted(t.intermediate_values) == [0, 1, 2]


@pytest.mark.slow   # minutes of fold runs: make test-all
def test_two_workers_share_one_sqlite_study(tmp_path, synth_root):
    "Two run processes on one folder and study: every job runs exactly once."
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, folds=2, baseline=None, report=False)
    out = tmp_path / 'exp'
    cmd = [sys.executable, '-m', 'agenb.experiment', 'run', str(spec), '--out', str(out), '--workers', '1', '--engine', 'cli']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for _ in range(2)]
    res = [p.communicate(timeout=900) for p in ps]
    for p, (o, e) in zip(ps, res):
        assert p.returncode == 0, e[-3000:]
        assert Path(o.strip().splitlines()[-1]) == out
    recs = job_records(out)
    assert len(recs) == 4 and all(r['status'] == 'completed' for r in recs)
    assert sum(len(r['attempts']) for r in recs) == 4                      # each job run exactly once
    assert len(list((out / 'runs').glob('*/run_*'))) == 4
    trials = study_of(out).get_trials()
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len(json.loads((out / 'experiment.json').read_text())['invocations']) == 2


@pytest.mark.slow   # minutes of fold runs: make test-all
def test_search_records_pruned_trials(tmp_path, synth_root):
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, folds=2, grid=None, baseline=None,
                      search={'trials': 3, 'space': {'lr': {'log_uniform': [1.0e-4, 1.0e-2]}, 'loss': {'choice': ['mae', 'huber']}},
                              'pruner': {'threshold': {'upper': 0.001}}}, report=False)   # every fold MAE is above 0.001: pruned
    r = experiment('run', spec, '--out', tmp_path / 'exp', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    exp = tmp_path / 'exp'
    trials = study_of(exp, search=True).get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert all(len(t.intermediate_values) == 1 and set(t.params) == {'lr', 'loss'} for t in trials)
    assert len(job_records(exp)) == 3                                        # the second fold of each was not run
    assert 'pruned' in r.stderr
    board = read_csv(exp / 'leaderboard.csv')
    assert sorted(board.status) == ['pruned'] * 3 and board.subject_mae.isna().all()
    assert not (exp / 'report.html').exists()
    r = experiment('report', exp, timeout=300)
    assert r.returncode == 0 and exp_dir_of(r) == exp / 'report.html', r.stderr[-2000:]
    html = (exp / 'report.html').read_text()
    assert 'Search history' in html and 'Parameter importances' in html and '<script' not in html.lower()


@pytest.mark.slow   # minutes of fold runs: make test-all
def test_final_records_every_opening(grid_exp, synth_root):
    e0 = json.loads((grid_exp / 'experiment.json').read_text())
    r = experiment('final', grid_exp, '--variant', 'loss=mae')                 # the default engine: papermill
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'fold ensemble (3 models): test subject MAE' in r.stdout and 'test set opened 1 time(s)' in r.stdout
    e = json.loads((grid_exp / 'experiment.json').read_text())
    assert [o['variant'] for o in e['test_openings']] == ['loss=mae'] and e['test_openings'][0]['status'] == 'completed'
    fin = e['finals']['loss=mae']
    run = grid_exp / fin['single'][0]['run_dir']
    assert (run / 'train.ipynb').is_file()                                               # the executed notebook is kept
    split = read_csv(run / 'split.csv')
    dev = set().union(*(f['test_subjects'] for f in e0['folds']))
    assert set(split.subject[split.split == 'test']) == set(e0['test_subjects'])       # the test set, at last
    assert set(split.subject[split.split.isin(['train', 'val'])]) == dev
    ens = read_csv(grid_exp / fin['ensemble']['dir'] / 'predictions.csv')
    assert set(ens.subject) == set(e0['test_subjects']) and fin['ensemble']['n_models'] == 3
    assert abs((ens.pred - ens.age).abs().mean() - fin['ensemble']['test_image_mae']) < 1e-6
    assert abs((ens.pred - ens.age).abs().groupby(ens.subject).mean().mean() - fin['ensemble']['test_subject_mae']) < 1e-6
    assert 'WARNING: the test set was opened' not in (grid_exp / 'report.html').read_text()
    r = experiment('final', grid_exp, '--variant', 'loss=mae', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'opened 2 times' in r.stderr
    e = json.loads((grid_exp / 'experiment.json').read_text())
    assert len(e['test_openings']) == 2
    rec = next(r for r in job_records(grid_exp) if r['key'] == f'final_{run.parent.name}')
    assert len(rec['attempts']) == 1 and len(rec['reused']) == 1                       # the final model is not retrained
    assert 'WARNING: the test set was opened 2 times' in (grid_exp / 'report.html').read_text()
    r = experiment('final', grid_exp, '--variant', 'loss=l1', timeout=120)
    assert r.returncode == 2 and "no variant named 'loss=l1'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ensemble_predict(grid_exp, synth_root, tmp_path):
    from agenb.core import InputError
    from agenb.exp_final import ensemble_predict
    with pytest.raises(InputError, match='pass --open-test'):          # the data folder holds the test subjects
        ensemble_predict(grid_exp, 'loss=mse', synth_root / 'TA' / 'Healthy' / 'Images')
    img = dev_images(grid_exp, tmp_path / 'Healthy' / 'Images')   # a cohort folder: the spreadsheet's block
    df = ensemble_predict(grid_exp, 'loss=mse', img, synth_root / 'TA' / 'characteristics.xlsx')
    assert len(df) == len(list(img.glob('*.png'))) and (df.n_models == 3).all() and (df.model_sd >= 0).all()
    assert df.age.notna().all() and abs(df.error - (df.pred - df.age)).max() < 1e-9


@pytest.mark.parametrize('patch,msg', [
    ({'grdi': {'loss': ['mae']}}, "unknown key 'grdi'"),
    ({'grid': {'loss': ['mae', 'l2']}}, "--loss 'l2' is not one of"),
])
def test_bad_spec_is_one_line_and_runs_nothing(tmp_path, synth_root, patch, msg):
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, **patch)
    r = experiment('run', spec, '--out', tmp_path / 'exp', timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith('agenb: error:') and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'exp').exists()


def test_bad_command_lines(tmp_path):
    for args, msg in ((['run', tmp_path / 'nope.yaml'], 'does not exist'), (['status', tmp_path], 'has no experiment.json'),
                      (['run', 'x.yaml', '--wrkers', '2'], 'unrecognized arguments')):
        r = experiment(*args, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_example_specs_are_valid():
    from agenb.exp_spec import load_spec
    specs = sorted((ROOT / 'examples').glob('*.yaml'))
    assert specs
    for p in specs:
        s = load_spec(p)
        assert s['static'] or s['search'], p


def test_predict_with_an_experiment_variant_is_the_fold_ensemble(grid_exp, synth_root, tmp_path):
    "`python -m agenb.predict EXP_DIR --variant NAME` predicts with the variant's fold models (mean and spread)."
    images = dev_images(grid_exp, tmp_path / 'dev')      # the test subjects' images need --open-test (tests/test_test_lock.py)
    r = agenb('predict', grid_exp, '--variant', 'loss=mae', '--image-dir', images, '--out', tmp_path / 'ens.csv')
    assert r.returncode == 0, r.stderr[-2000:]
    df = read_csv(tmp_path / 'ens.csv')
    assert len(df) == len(list(images.glob('*.png'))) and (df.n_models == 3).all() and (df.model_sd >= 0).all()
    r = agenb('predict', grid_exp, '--image-dir', images, '--out', tmp_path / 'x.csv')
    assert r.returncode == 2 and 'add --variant' in r.stderr
