"""Issue 16: one prediction per subject from several of its images (--subject-views, --view-pool) and several muscle
folders of one cohort (--image-dir more than once): training, evaluation, predict, export, resume, DDP, bad input."""
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, agenb, run_cmd, run_dir_of

ONE = [*TINY, '--epochs', '1', '--no-report', '--gradcam-n', '0', '--image-size', '32']


@pytest.fixture(scope='module')
def muscles(tmp_path_factory):
    "The test preset written for two muscles (TA, GM) of one cohort: the same subjects, GM missing some of them."
    root = tmp_path_factory.mktemp('muscles')
    r = agenb('synth', root, '--preset', 'test', '--muscles', 'TA', 'GM', proc=True)
    assert r.returncode == 0, r.stderr
    return root


def _two(root):
    return ['--image-dir', root / 'TA/Healthy/Images', '--image-dir', root / 'GM/Healthy/Images',
            '--excel-path', root / 'TA/characteristics.xlsx', '--excel-path', root / 'GM/characteristics.xlsx']


def _train(args, tmp_path, *extra, env=None):
    r = agenb('train', *args, *ONE, '--output-dir', tmp_path, *extra, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(r), r


def test_synthetic_muscles_share_their_subjects(muscles):
    from agenb.data import load_dataset
    ta, _ = load_dataset(muscles / 'TA/Healthy/Images', muscles / 'TA/characteristics.xlsx')
    gm, _ = load_dataset(muscles / 'GM/Healthy/Images', muscles / 'GM/characteristics.xlsx')
    a, g = ta.groupby('subject').age.first(), gm.groupby('subject').age.first()
    assert set(g.index) < set(a.index)                                  # GM misses some subjects, has no others
    assert (a.loc[g.index] == g).all()                                  # one number, one person: the same age
    meta = json.loads((muscles / 'synth_meta.json').read_text())
    assert meta['version'] >= 3


def test_two_muscles_one_split_by_subject(muscles, tmp_path):
    run, r = _train(_two(muscles), tmp_path)
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['dataset']['image_dir'] == [str((muscles / m / 'Healthy/Images').resolve()) for m in ('TA', 'GM')]
    assert cfg['dataset']['read_summary']['muscle'] == 'TA+GM'
    assert len(cfg['data_fingerprint']['excel_sha256']) == 2
    split = pd.read_csv(run / 'split.csv', dtype={'subject': str})
    assert set(split.path.map(lambda p: Path(p).parts[-4])) == {'TA', 'GM'}
    assert (split.groupby('subject').split.nunique() == 1).all()          # a subject's muscles are in one split
    missing = cfg['dataset']['read_summary']['not_in_every_folder']['GM']
    assert missing and 'subjects not in every muscle folder' in (run / 'train.log').read_text()
    assert f'{len(missing)} without GM' in r.stdout
    again = agenb('train', '--config', run / 'config.json', '--output-dir', tmp_path / 'again')   # reproducible from config.json
    assert again.returncode == 0, again.stderr[-2000:]
    s2 = pd.read_csv(run_dir_of(again) / 'split.csv', dtype={'subject': str})
    assert s2[['path', 'split']].equals(split[['path', 'split']])


def test_muscle_folders_bad_input_exit_2(muscles, tmp_path):
    strict = agenb('train', *_two(muscles), *ONE, '--output-dir', tmp_path, '--strict')
    assert strict.returncode == 2 and 'subjects have no image in GM' in strict.stderr and 'Traceback' not in strict.stderr
    three = agenb('train', *_two(muscles), '--excel-path', muscles / 'TA/characteristics.xlsx', *ONE, '--output-dir', tmp_path)
    assert three.returncode == 2 and '--excel-path was given 3 times for 2 --image-dir' in three.stderr
    twice = agenb('train', '--image-dir', muscles / 'TA/Healthy/Images', '--image-dir', muscles / 'TA/Healthy/Images',
                  '--excel-path', muscles / 'TA/characteristics.xlsx', *ONE, '--output-dir', tmp_path)
    assert twice.returncode == 2 and 'is given more than once' in twice.stderr
    assert not list(tmp_path.glob('run_*'))                               # nothing that looks like a run


def test_subject_view_run_predicts_once_per_subject_and_round_trips(muscles, tmp_path):
    run, _ = _train(_two(muscles), tmp_path, '--subject-views', '3', '--view-pool', 'mean')
    cfg, m = (json.loads((run / f).read_text()) for f in ('config.json', 'metrics.json'))
    assert cfg['training']['subject_views']['k'] == 3 and cfg['model']['view_pool'] == 'mean'
    preds = pd.read_csv(run / 'predictions.csv', dtype={'subject': str})
    test = pd.read_csv(run / 'split.csv', dtype={'subject': str}).query('split == "test"')
    assert len(preds) == preds.subject.nunique() == test.subject.nunique()   # one prediction per test subject
    assert m['prediction_unit'] == 'subject' and m['overall']['n'] == len(preds)
    assert m['overall']['mae'] == pytest.approx(m['subject_level']['mae'])
    # predict: the subject's images from both folders pooled, as the run evaluated them
    out = tmp_path / 'p' / 'p.csv'
    r = agenb('predict', run, *_two(muscles), '--out', out)
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(out, dtype={'subject': str}).set_index('subject').loc[preds.subject]
    np.testing.assert_allclose(p.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)
    assert (p.n_images.to_numpy() == test.groupby('subject').size().loc[preds.subject].to_numpy()).all()
    assert json.loads(out.with_suffix('.json').read_text())['prediction_unit'] == 'subject'
    from agenb.runs import predict_split
    ps = predict_split(run)
    np.testing.assert_allclose(ps.set_index('subject').loc[preds.subject].pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)
    from agenb.exp_final import ensemble_matrix   # an experiment's fold ensemble: each image carries its subject's pooled prediction
    M = ensemble_matrix([run], test.path.tolist(), num_threads=1).iloc[:, 0]
    per = pd.Series(M.to_numpy(), index=test.subject.to_numpy()).groupby(level=0).agg(['mean', 'std'])
    np.testing.assert_allclose(per.loc[preds.subject, 'mean'].to_numpy(), preds.pred.to_numpy(), atol=1e-4)
    assert (per['std'].fillna(0) < 1e-6).all()
    tta = agenb('predict', run, *_two(muscles), '--out', tmp_path / 'q.csv', '--tta')
    assert tta.returncode == 2 and '--tta is not available for a --subject-views run' in tta.stderr
    e = agenb('export', run, '--format', 'torchscript', '--out', tmp_path / 'exp')
    assert e.returncode == 0, e.stderr
    card = json.loads((tmp_path / 'exp' / 'model_card.json').read_text())
    assert card['input']['shape'][:2] == ['batch', 'views'] and card['verification']['torchscript']['ok']
    assert card['verification']['n'] == len(preds)


def test_attention_distribution_covariate_views_round_trip(muscles, tmp_path):
    "Every head with views: the distribution head and covariates through predict and export (ONNX too: any K)."
    ta = ['--image-dir', muscles / 'TA/Healthy/Images', '--excel-path', muscles / 'TA/characteristics.xlsx']
    run, _ = _train(ta, tmp_path, '--subject-views', '2', '--view-pool', 'attention', '--head', 'distribution',
                    '--age-bins', '0:100:4', '--covariates', 'sex,echo_mean')
    preds = pd.read_csv(run / 'predictions.csv', dtype={'subject': str})
    iv = pd.read_csv(run / 'subject_intervals.csv', dtype={'subject': str}).set_index('subject').loc[preds.subject]
    np.testing.assert_allclose(iv.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)
    r = agenb('predict', run, *ta, '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / 'p.csv', dtype={'subject': str}).set_index('subject').loc[preds.subject]
    np.testing.assert_allclose(p[['pred', 'pred_sd', 'lo95']].to_numpy(), iv[['pred', 'pred_sd', 'lo95']].to_numpy(), atol=1e-3)
    from agenb.exp_final import ensemble_matrix   # with the covariates of each image, not their training means
    test = pd.read_csv(run / 'split.csv', dtype={'subject': str}).query('split == "test"')
    M = ensemble_matrix([run], test.path.tolist(), num_threads=1).iloc[:, 0]
    got = pd.Series(M.to_numpy(), index=test.subject.to_numpy()).groupby(level=0).mean().loc[preds.subject]
    np.testing.assert_allclose(got.to_numpy(), preds.pred.to_numpy(), atol=1e-3)
    e = agenb('export', run, '--out', tmp_path / 'exp')
    assert e.returncode == 0, e.stderr
    v = json.loads((tmp_path / 'exp' / 'model_card.json').read_text())['verification']
    assert v['torchscript']['ok'] and v.get('onnx', {'ok': True})['ok'], v


def test_view_batches_of_the_trainer(muscles):
    "A training batch is (B, K, 3, H, W) of one subject's images each; evaluation stacks all of a subject's images."
    from agenb.options import resolve_options
    from agenb.trainer import prepare_data, Trainer, Dist
    from agenb.model import build_model
    o = resolve_options(dict(image_dir=str(muscles / 'TA/Healthy/Images'), excel_path=str(muscles / 'TA/characteristics.xlsx'),
                             arch='resnet18', pretrained=False, image_size=32, subject_views=4, num_workers=1))
    data = prepare_data(o)
    t = Trainer(o, data, Dist('cpu'), build_model('resnet18', view_pool='mean'))
    assert data.n_samples('train') == data.table.subject.iloc[data.idx['train']].nunique()
    (x,), y = t.batch([0, 1], 'train', train=True)
    assert x.shape == (2, 4, 3, 32, 32)
    rows = data.groups['train'][0]
    assert (data.table.subject.iloc[rows] == data.table.subject.iloc[rows[0]]).all()
    assert y[0] == data.table.age.iloc[rows[0]]
    n = len(data.groups['val'][0])
    (xv,), _ = t.batch([0], 'val', train=False)
    assert xv.shape == (1, n, 3, 32, 32)
    assert t.outputs('val').shape == (data.n_samples('val'), 1) and np.isfinite(t.outputs('val')).all()


@pytest.mark.slow   # a killed run and its resume: make test-all
def test_exact_resume_with_subject_views(muscles, tmp_path):
    args = [*_two(muscles), *TINY, '--epochs', '3', '--no-report', '--gradcam-n', '0', '--image-size', '32', '--subject-views', '3']
    full = agenb('train', *args, '--output-dir', tmp_path / 'full')
    assert full.returncode == 0, full.stderr[-2000:]
    killed = agenb('train', *args, '--output-dir', tmp_path / 'killed', env={'AGENB_FAULT': 'kill:0:2:1'})
    assert killed.returncode != 0
    (run,) = list((tmp_path / 'killed').iterdir())
    assert agenb('train', '--resume', run).returncode == 0
    a, b = (torch.load(d / 'last.pth', weights_only=True)['model'] for d in (run_dir_of(full), run))
    for k in a: assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_subject_views_under_torchrun_predict_every_subject(muscles, tmp_path):
    "DDP: subjects sharded over 2 ranks, evaluated over the whole set; rank 0 writes one row per test subject."
    r = run_cmd([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'agenb.train', *map(str, _two(muscles)), *ONE,
                 '--output-dir', str(tmp_path), '--subject-views', '2'], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(r)
    preds = pd.read_csv(run / 'predictions.csv', dtype={'subject': str})
    test = pd.read_csv(run / 'split.csv', dtype={'subject': str}).query('split == "test"')
    assert sorted(preds.subject) == sorted(test.subject.unique())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['world_size'] == 2
    hist = json.loads((run / 'history.json').read_text())
    from agenb.runs import predict_split
    val = predict_split(run, 'val')     # the best model's validation MAE over all validation subjects, both ranks' shards
    assert abs(np.mean(np.abs(val.pred - val.age)) - hist[0]['val_mae']) < 1e-3
