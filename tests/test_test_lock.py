"""The experiment's test lock: predicting with a variant's fold ensemble refuses the test subjects' images (in the data
folder, or copied anywhere) unless --open-test, which records an opening; other people's images, even with the test
subjects' numbers, are predicted freely; a final that fails or is interrupted is recorded so and not counted."""
import json, shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import agenb
from test_experiment import write_spec, experiment, exp_dir_of


@pytest.fixture(scope='module')
def lock_exp(tmp_path_factory, synth_root):
    "A finished 2-variant x 2-fold x 1-seed experiment (cli engine, no report): the smallest that ranks variants."
    d = tmp_path_factory.mktemp('lock')
    spec = write_spec(d / 'spec.yaml', synth_root, folds=2, baseline=None, report=False)
    r = experiment('run', spec, '--out', d / 'exp', '--workers', '2', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    return exp_dir_of(r)


def openings(exp):
    return json.loads((exp / 'experiment.json').read_text())['test_openings']


def final_split(exp):
    return pd.read_csv(exp / 'splits' / 'final.csv', dtype={'subject': str})


def test_predict_refuses_the_test_subjects_unless_told(lock_exp, synth_root, tmp_path):
    data = synth_root / 'TA' / 'Healthy' / 'Images'
    excel = synth_root / 'TA' / 'characteristics.xlsx'
    n_test = int((final_split(lock_exp).split == 'test').sum())
    before = openings(lock_exp)
    # the experiment's own data folder: refused, one line, nothing written, nothing recorded
    r = experiment('predict', lock_exp, '--variant', 'loss=mae', '--image-dir', data, '--excel-path', excel, '--out', tmp_path / 'p.csv')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith('agenb: error:') and "experiment 'tiny'" in r.stderr and '--open-test' in r.stderr
    assert f'{n_test} of the {len(list(data.glob("*.png")))} images belong to' in r.stderr and 'MAE' not in r.stderr + r.stdout
    assert not (tmp_path / 'p.csv').exists() and openings(lock_exp) == before
    # ... and through agenb.predict (a real process: it forwards to agenb.experiment predict)
    r = agenb('predict', lock_exp, '--variant', 'loss=mae', '--image-dir', data, '--out', tmp_path / 'q.csv', proc=True)
    assert r.returncode == 2 and '--open-test' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert not (tmp_path / 'q.csv').exists() and openings(lock_exp) == before
    # a renamed copy of one test image among development images: still the test set
    split = final_split(lock_exp)
    mixed = tmp_path / 'mixed'; mixed.mkdir()
    for p in split.loc[split.split == 'train', 'path'][:3]: shutil.copy(p, mixed / Path(p).name)
    shutil.copy(split.loc[split.split == 'test', 'path'].iloc[0], mixed / 'scan_0001.png')
    r = experiment('predict', lock_exp, '--variant', 'loss=mae', '--image-dir', mixed, '--out', tmp_path / 'm.csv')
    assert r.returncode == 2 and '1 of the 4 images belong to 1 of the test subjects' in r.stderr, r.stderr[-2000:]
    # on purpose: predicted, and recorded as a completed opening with the variant's OOF standing
    r = experiment('predict', lock_exp, '--variant', 'loss=mae', '--image-dir', data, '--excel-path', excel,
                   '--out', tmp_path / 'p.csv', '--open-test')
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'p.csv').is_file() and 'opening the test set of tiny for loss=mae' in r.stderr
    new = openings(lock_exp)[len(before):]
    assert len(new) == 1, new
    o = new[0]
    assert (o['kind'], o['variant'], o['status'], o['n_test_images']) == ('predict', 'loss=mae', 'completed', n_test)
    assert o['n_variants_compared'] == 2 and o['oof_rank'] in (1, 2) and o['oof_subject_mae'] > 0 and 'oof_mae' not in o
    board = pd.read_csv(lock_exp / 'leaderboard.csv')
    assert o['oof_subject_mae'] == pytest.approx(float(board.set_index('variant').subject_mae['loss=mae']))


def test_other_folders_need_no_flag(lock_exp, tmp_path):
    split = final_split(lock_exp)
    test_ids = sorted(set(split.subject[split.split == 'test']))
    dev = split[split.split.isin(['train', 'val'])]
    before = openings(lock_exp)
    # development subjects only (copies of the experiment's own images)
    only_dev = tmp_path / 'dev'; only_dev.mkdir()
    for p in dev.path: shutil.copy(p, only_dev / Path(p).name)
    # other people who happen to carry the test subjects' numbers (development scans under the test numbers)
    same_ids = tmp_path / 'same_ids'; same_ids.mkdir()
    for s, p in zip(test_ids, dev.drop_duplicates('subject').path):
        shutil.copy(p, same_ids / f'anon_{s}_1.png')
    for folder in (only_dev, same_ids):
        r = experiment('predict', lock_exp, '--variant', 'loss=mse', '--image-dir', folder, '--out', tmp_path / f'{folder.name}.csv')
        assert r.returncode == 0, r.stderr[-3000:]
        df = pd.read_csv(tmp_path / f'{folder.name}.csv', dtype={'subject': str})
        assert len(df) == len(list(folder.glob('*.png'))) and (df.n_models == 2).all()
    assert set(df.subject) == set(test_ids)
    assert openings(lock_exp) == before


def test_failed_and_interrupted_finals_are_recorded_not_counted(lock_exp, monkeypatch):
    import agenb.exp_final as xf
    before = openings(lock_exp)
    finals = json.loads((lock_exp / 'experiment.json').read_text())['finals']
    def fail(*a, **k): raise RuntimeError('injected failure')
    monkeypatch.setattr(xf, 'run_job', fail)
    with pytest.raises(RuntimeError, match='injected failure'):
        xf.run_final(lock_exp, 'loss=mae', engine='cli', log=lambda m: None)
    def stop(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(xf, 'run_job', stop)
    with pytest.raises(KeyboardInterrupt):
        xf.run_final(lock_exp, 'loss=mse', engine='cli', log=lambda m: None)
    new = openings(lock_exp)[len(before):]
    assert [(o['kind'], o['variant'], o['status']) for o in new] == [('final', 'loss=mae', 'failed'), ('final', 'loss=mse', 'interrupted')]
    assert new[0]['error'] == 'RuntimeError: injected failure'
    assert all(o['n_variants_compared'] == 2 and o['oof_rank'] in (1, 2) and 'oof_mae' not in o for o in new)
    exp = json.loads((lock_exp / 'experiment.json').read_text())
    assert exp['finals'] == finals                                    # nothing of theirs is a result
    c = xf.opening_counts(exp)
    done = sum(o['status'] == 'completed' for o in exp['test_openings'])
    assert c['completed'] == done and [o['status'] for o in c['other']][-2:] == ['failed', 'interrupted']
    text = xf.openings_text(exp)
    assert text.startswith(f'test set opened {done} time(s)') and 'did not complete, not counted' in text
    # a process killed -9 leaves 'started': read as interrupted; two completed openings make the warning, which counts only them
    fake = [{'when': 'w1', 'variant': 'loss=mae', 'status': 'completed'}, {'when': 'w2', 'variant': 'loss=mae', 'status': 'completed'},
            {'when': 'w3', 'variant': 'loss=mae', 'status': 'started'}, {'when': 'w4', 'variant': 'loss=mae', 'status': 'failed'}]
    w = xf.openings_warning({'test_openings': fake})
    assert 'has been opened 2 times to completion; report every opening (2 more did not complete' in w
    assert 'w3 final loss=mae (interrupted)' in w and 'w4 final loss=mae (failed)' in w
    assert xf.openings_warning({'test_openings': fake[1:]}) is None


@pytest.mark.slow   # trains the final model (half a minute on 2 cores): make test-all
def test_a_completed_final_records_its_standing_and_subject_level_figures(lock_exp):
    import agenb.exp_final as xf
    before = openings(lock_exp)
    r = xf.run_final(lock_exp, 'loss=mse', engine='cli', log=lambda m: None)
    new = openings(lock_exp)[len(before):]
    assert [(o['kind'], o['variant'], o['status']) for o in new] == [('final', 'loss=mse', 'completed')]
    exp = json.loads((lock_exp / 'experiment.json').read_text())
    fin = exp['finals']['loss=mse']
    assert 'oof_mae' not in fin and 'oof_mae' not in new[0] and fin['opening_id'] == new[0]['id']
    assert fin['n_variants_compared'] == 2 and fin['oof_rank'] == new[0]['oof_rank'] and fin['opening'] == xf.opening_counts(exp)['completed']
    ens = pd.read_csv(lock_exp / fin['ensemble']['dir'] / 'predictions.csv', dtype={'subject': str})
    per = (ens.pred - ens.age).abs().groupby(ens.subject).mean()                 # subjects weigh alike
    assert fin['ensemble']['test_subject_mae'] == pytest.approx(per.mean()) == new[0]['ensemble_test_subject_mae']
    lo, hi = fin['ensemble']['test_subject_mae_ci']
    assert lo <= per.mean() <= hi and fin['ensemble_vs_single']['n'] == len(per) == fin['ensemble']['n_test_subjects']
    assert r['single'][0]['test_subject_mae'] == fin['single_mean']
    lines = xf.final_lines(r, 'loss=mse')
    assert lines[1].startswith('fold ensemble (2 models): test subject MAE') and 'variants compared' in lines[-1]
