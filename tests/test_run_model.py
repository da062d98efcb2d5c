"""A run folder as predict, export and explain read it, in one process: the checkpoint layout, `load_run_model` taking
the preprocessing from config.json, predict's image reading, TTA views, per-subject table and metrics.
`make mutate` runs these against mutated copies of agenb.runs and agenb.predict."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agenb.core import InputError, file_sha256
from agenb.evaluate import regression_metrics
from agenb.images import Augmentation, Preprocessing, load_images
from agenb.model import build_model
from agenb.options import resolve_options
from agenb.predict import (apply_view, metrics_for, parse_subject, predict_images, predict_tensor, read_images,
                           subject_table, tta_views)
from agenb.runs import (CHECKPOINT_VERSION, load_checkpoint, load_run_model, make_checkpoint, predict_batches,
                        predict_split, read_split, run_bias_correction, run_options)

PREP = Preprocessing(image_size=48, roi='crop', roi_box='0.1,0,0.9,1', mask_annotations=True)
AUG = Augmentation(rotation_deg=8, translate=0.1, hflip_p=0.5)
BC = {'fitted_on': 'val', 'n': 9, 'a': 0.8, 'b': 5.0, 'applied': True, 'reason': None}


@pytest.fixture(scope='module')
def run(tmp_path_factory, synth_root):
    "A run folder written by hand: 9 synthetic images, a resnet18 with seeded weights, crop + annotation masking."
    run = tmp_path_factory.mktemp('fake') / 'run_20260101_000000'
    run.mkdir()
    images = sorted((synth_root / 'TA' / 'Healthy' / 'Images').glob('*.png'))[:9]
    o = resolve_options({'image_dir': str(images[0].parent), 'excel_path': 'x.xlsx', 'arch': 'resnet18', 'image_size': 48,
                         'dropout': 0.2, 'roi': 'crop', 'roi_box': '0.1,0,0.9,1', 'mask_annotations': True})
    torch.manual_seed(0)
    model = build_model('resnet18', pretrained=False, dropout=0.2, init_bias=40.0)
    (run / 'config.json').write_text(json.dumps({'args': o.to_dict(), 'preprocessing': PREP.to_dict(),
                                                 'augmentation': AUG.to_dict()}))
    torch.save(make_checkpoint(model.state_dict(), 3, 7.5, o, PREP.to_dict()), run / 'best_model.pth')
    subj = [p.name.split('_')[1] for p in images]
    pd.DataFrame({'path': [str(p) for p in images], 'filename': [p.name for p in images], 'subject': subj,
                  'age': [20.0 + 5 * i for i in range(9)], 'split': ['train'] * 3 + ['val'] * 3 + ['test'] * 3}
                 ).to_csv(run / 'split.csv', index=False)
    (run / 'metrics.json').write_text(json.dumps({'bias_correction': BC}))
    return run


def reference(run, paths, prep=PREP):
    "Predictions of the saved weights, computed here without agenb.runs/agenb.predict."
    ck = torch.load(run / 'best_model.pth', weights_only=True)
    m = build_model('resnet18', pretrained=False, dropout=0.2)
    m.load_state_dict(ck['model']); m.eval()
    x = load_images([str(p) for p in paths], prep).float() / 255
    with torch.no_grad(): return m(prep.normalize(x)).squeeze(1).double().numpy()


def test_load_run_model_takes_everything_from_the_run(run):
    rm = load_run_model(run)
    assert rm.prep == PREP and rm.prep.mask_annotations and rm.prep.roi == 'crop'
    assert (rm.arch, rm.options.image_size, rm.options.dropout, rm.epoch, rm.val_mae) == ('resnet18', 48, 0.2, 3, 7.5)
    assert rm.bias_correction == BC and rm.augmentation == json.loads(json.dumps(AUG.to_dict()))
    assert rm.checkpoint == run / 'best_model.pth' and rm.checkpoint_sha256 == file_sha256(run / 'best_model.pth')
    assert rm.pattern.startswith('^anon_') and not rm.model.training and rm.device == torch.device('cpu')
    saved = torch.load(run / 'best_model.pth', weights_only=True)['model']
    assert all(torch.equal(v, saved[k]) for k, v in rm.model.state_dict().items())
    assert rm.args == json.loads((run / 'config.json').read_text())['args']


def test_preprocessing_of_checkpoint_and_config_must_agree(run, tmp_path):
    other = tmp_path / run.name; shutil.copytree(run, other)
    cfg = json.loads((other / 'config.json').read_text())
    cfg['preprocessing']['mask_annotations'] = False
    (other / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(InputError, match='other preprocessing'): load_run_model(other)
    cfg.pop('preprocessing'); (other / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(InputError, match='no "preprocessing" record'): load_run_model(other)
    # a checkpoint that records no preprocessing (agenb 0.1.0): the config's is used
    cfg['preprocessing'] = PREP.to_dict(); (other / 'config.json').write_text(json.dumps(cfg))
    ck = torch.load(other / 'best_model.pth', weights_only=True); ck['preprocessing'] = None
    torch.save(ck, other / 'best_model.pth')
    assert load_run_model(other).prep == PREP


def test_predictions_use_the_recorded_preprocessing(run):
    rm = load_run_model(run)
    paths = read_split(run).path.tolist()
    want = reference(run, paths)
    got = predict_batches(rm, load_images(paths, rm.prep), batch_size=4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    plain = reference(run, paths, Preprocessing(image_size=48))
    assert np.abs(plain - want).max() > 1e-3                              # the preprocessing changes the numbers
    df, skipped, views = predict_images(rm, [Path(p) for p in paths], batch_size=4)
    np.testing.assert_allclose(df.pred, want, atol=1e-4, rtol=0)
    assert skipped == [] and [v['name'] for v in views] == ['identity'] and 'tta_sd' not in df
    np.testing.assert_allclose(df.corrected, (df.pred - 5.0) / 0.8)
    assert list(df.subject) == [Path(p).name.split('_')[1].lstrip('0') or '0' for p in paths]
    assert list(df.image_index) == [int(Path(p).stem.split('_')[2]) for p in paths]
    assert list(df.filename) == [Path(p).name for p in paths] and list(df.path) == [str(Path(p).resolve()) for p in paths]


def test_predict_split_is_the_saved_split(run):
    for s in ('val', 'test'):
        p = predict_split(run, s, batch_size=2)
        split = read_split(run, s)
        assert list(p.filename) == list(split.filename) and (p.split == s).all()
        np.testing.assert_allclose(p.pred, reference(run, split.path), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="no 'holdout'"): read_split(run, 'holdout')
    assert len(read_split(run)) == 9 and read_split(run).subject.map(type).eq(str).all()


def test_tta_averages_the_views_within_the_training_augmentation(run):
    rm = load_run_model(run)
    paths = read_split(run, 'test').path.tolist()
    views = tta_views(rm.augmentation)
    assert [v['name'] for v in views] == ['identity', 'rotate+4', 'rotate-4', 'shift_x+0.05', 'shift_x-0.05', 'hflip']
    df, _, used = predict_images(rm, [Path(p) for p in paths], batch_size=2, tta=True)
    assert used == views
    x = load_images(paths, rm.prep).float() / 255
    with torch.no_grad():
        per_view = np.stack([rm.model(rm.prep.normalize(apply_view(x, v))).squeeze(1).double().numpy() for v in views], 1)
    np.testing.assert_allclose(df.pred, per_view.mean(1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(df.tta_sd, per_view.std(1), atol=1e-4, rtol=0)
    mean, sd = predict_tensor(rm, load_images(paths, rm.prep), batch_size=2)
    assert sd is None and np.allclose(mean, reference(run, paths), atol=1e-4)


def test_tta_views():
    names = lambda a: [v['name'] for v in tta_views(a)]
    assert names({}) == names(None) == ['identity']
    assert names({'rotation_deg': 20, 'translate': 0.3}) == ['identity', 'rotate+5', 'rotate-5', 'shift_x+0.05', 'shift_x-0.05']
    assert names({'rotation_deg': 3, 'translate': 0.04, 'vflip_p': 0.1}) == [
        'identity', 'rotate+1.5', 'rotate-1.5', 'shift_x+0.02', 'shift_x-0.02', 'vflip']
    v = tta_views({'rotation_deg': 3})[2]
    assert v == {'name': 'rotate-1.5', 'rotation_deg': -1.5, 'shift_x': 0.0, 'shift_y': 0.0, 'hflip': False, 'vflip': False}
    assert tta_views({'translate': 0.04})[1]['shift_x'] == 0.02 and tta_views({'hflip_p': 0.5})[1]['hflip'] is True
    base = dict(rotation_deg=0.0, shift_x=0.0, shift_y=0.0, hflip=False, vflip=False)   # every view, every field
    assert tta_views({'rotation_deg': 2, 'translate': 0.04, 'hflip_p': 0.5, 'vflip_p': 0.1}) == [
        dict(base, name='identity'), dict(base, name='rotate+1', rotation_deg=1.0), dict(base, name='rotate-1', rotation_deg=-1.0),
        dict(base, name='shift_x+0.02', shift_x=0.02), dict(base, name='shift_x-0.02', shift_x=-0.02),
        dict(base, name='hflip', hflip=True), dict(base, name='vflip', vflip=True)]
    assert names({'rotation_deg': 0, 'translate': 0, 'hflip_p': 0, 'vflip_p': 0}) == ['identity']


def test_apply_view():
    x = torch.rand(2, 1, 8, 6, generator=torch.Generator().manual_seed(0))
    ident = tta_views({})[0]
    assert apply_view(x, ident) is x
    flip = apply_view(x, dict(ident, hflip=True))
    torch.testing.assert_close(flip, x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_view(x, dict(ident, vflip=True)), x.flip(-2), atol=1e-5, rtol=0)
    shifted = apply_view(x, dict(ident, shift_x=0.5))
    assert not torch.allclose(shifted, x) and shifted.min() >= 0 and shifted.max() <= 1
    assert not torch.allclose(apply_view(x, dict(ident, rotation_deg=30.0)), x)
    assert not torch.allclose(apply_view(x, dict(ident, shift_y=0.5)), x)


def test_read_images_skips_only_when_asked(run, tmp_path):
    paths = read_split(run, 'test').path.tolist()
    bad = tmp_path / 'anon_99_1.png'; bad.write_bytes(b'not a png')
    with pytest.raises(InputError, match='--skip-bad'): read_images([*paths, bad], Preprocessing(image_size=32))
    x, kept, skipped = read_images([paths[0], bad, paths[1]], Preprocessing(image_size=32), skip_bad=True, num_threads=2)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.uint8 and kept == [Path(paths[0]), Path(paths[1])]
    assert [s['file'] for s in skipped] == [str(bad)] and skipped[0]['reason']
    assert torch.equal(x, load_images(paths[:2], Preprocessing(image_size=32)))
    with pytest.raises(InputError, match='none of the 1 images'): read_images([bad], Preprocessing(image_size=32), skip_bad=True)


def test_parse_subject():
    from agenb.files import DEFAULT_PATTERN
    assert parse_subject('anon_012_3.png', DEFAULT_PATTERN) == ('12', 3)
    assert parse_subject('/a/b/ANON_7_10.PNG', DEFAULT_PATTERN) == ('7', 10)
    assert parse_subject('scan.png', DEFAULT_PATTERN) == (None, None)
    assert parse_subject('p5.png', r'p(\d+)\.png') == ('5', None)
    assert parse_subject('p5_x.png', r'p(\d+)_(\w+)\.png') == ('5', None)
    assert parse_subject('s5_2.png', r's(\d+)_(\d+)\.png') == ('5', 2)             # exactly two groups: the index is read
    assert parse_subject('anon_1_2.png', r'anon_\d+_\d+\.png') == (None, None)      # no subject group: no subject
    with pytest.raises(InputError, match='not a valid regular expression'): parse_subject('x', '(')


def test_subject_table_means_per_subject_in_natural_order():
    df = pd.DataFrame({'subject': pd.array(['10', '2', '10', None, '2', '10'], dtype='string'),
                       'pred': [41.0, 20.0, 42.0, 99.0, 26.0, 52.0], 'corrected': [1.0, 2, 3, 4, 5, 9],
                       'age': [40.0, 20, 40, 70, 20, 40]})
    s = subject_table(df)
    assert list(s.subject) == ['2', '10'] and list(s.n_images) == [2, 3]
    assert list(s.pred) == [23.0, 45.0]                                   # 10's median would be 42
    assert s.pred_sd.tolist() == pytest.approx([np.std([20, 26], ddof=1), np.std([41, 42, 52], ddof=1)])
    assert list(s.pred_min) == [20.0, 41.0] and list(s.pred_max) == [26.0, 52.0]
    assert list(s.corrected) == [3.5, 13 / 3] and list(s.age) == [20.0, 40.0]
    assert list(subject_table(df.drop(columns=['corrected', 'age'])).columns) == [
        'subject', 'n_images', 'pred', 'pred_sd', 'pred_min', 'pred_max']


def test_metrics_for():
    df = pd.DataFrame({'subject': pd.array(['1', '1', '1', '2', '3'], dtype='string'), 'age': [30.0, 30, 30, 50, np.nan],
                       'pred': [31.0, 32, 39, 45, 60], 'corrected': [30.0, 31, 30, 50, 70]})
    m = metrics_for(df, BC)
    assert m['n_images'] == 4 and m['n_images_without_age'] == 1 and m['n_subjects'] == 2 and m['bias_correction'] == BC
    assert m['overall'] == regression_metrics([30, 30, 30, 50], [31, 32, 39, 45])
    assert m['subject_level']['mae'] == pytest.approx((4 + 5) / 2)      # subject 1: mean 34 (median 32)
    assert m['corrected']['mae'] == pytest.approx(1 / 4) and m['corrected_subject_level']['mae'] == pytest.approx(1 / 3 / 2)
    assert m['age_groups'][0]['age_range'] == '30-40' and m['age_groups'][0]['count'] == 3
    plain = metrics_for(df.drop(columns=['corrected']), None)
    assert plain['corrected'] is None and plain['corrected_subject_level'] is None and plain['subject_level']['n'] == 2
    m = metrics_for(df.assign(subject=pd.array(['1', None, '1', '2', '3'], dtype='string')))
    assert m['subject_level'] is None and m['n_subjects'] is None
    assert m['subject_level_note'] == 'subject unknown for some images (file names do not match the pattern)'
    with pytest.raises(InputError, match='no predicted image has an age'): metrics_for(df.assign(age=np.nan))
    assert metrics_for(df, bin_width=5)['age_groups'][0]['age_range'] == '30-35'


def test_checkpoint_layout_and_checks(run, tmp_path):
    o = run_options(run)
    ck = make_checkpoint({'w': torch.ones(2)}, 4, 3.25, o, PREP.to_dict(), {'best_mae': 3.0})
    assert (ck['format'], ck['version'], ck['epoch'], ck['val_mae'], ck['arch'], ck['image_size'], ck['dropout']) == (
        'agenb-checkpoint', 2, 4, 3.25, 'resnet18', 48, 0.2)
    assert ck['preprocessing'] == PREP.to_dict() and ck['train_state'] == {'best_mae': 3.0}
    p = tmp_path / 'c.pth'; torch.save(ck, p)
    back = load_checkpoint(p, 'resnet18', 48)
    assert back['epoch'] == 4 and torch.equal(back['model']['w'], torch.ones(2))
    with pytest.raises(InputError, match="arch='resnet18'"): load_checkpoint(p, arch='resnet34')
    with pytest.raises(InputError, match='image_size=48'): load_checkpoint(p, image_size=64)
    torch.save(dict(ck, version=CHECKPOINT_VERSION + 1), p)
    with pytest.raises(InputError, match='newer agenb'): load_checkpoint(p)
    torch.save([1, 2], p)
    with pytest.raises(InputError, match='not an agenb checkpoint'): load_checkpoint(p)
    torch.save({'weights': 1}, p)
    with pytest.raises(InputError, match='no model weights'): load_checkpoint(p)
    p.write_bytes(b'PK\x03\x04 broken')
    with pytest.raises(InputError, match='truncated'): load_checkpoint(p)
    with pytest.raises(InputError, match='not found'): load_checkpoint(tmp_path / 'missing.pth')


def test_checkpoints_of_agenb_0_1_are_upgraded(tmp_path):
    p = tmp_path / 'old.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'arch': 'resnet18', 'epoch': 5, 'best_mae': 4.5, 'image_size': 64,
                'optimizer': {'s': 1}, 'scheduler': {'t': 2}, 'history': [1], 'unrelated': 0}, p)
    ck = load_checkpoint(p, 'resnet18', 64)
    assert (ck['format'], ck['version'], ck['epoch'], ck['val_mae'], ck['dropout'], ck['preprocessing']) == (
        'agenb-checkpoint', 1, 5, 4.5, None, None)
    assert ck['train_state'] == {'optimizer': {'s': 1}, 'scheduler': {'t': 2}, 'best_mae': 4.5, 'history': [1]}
    torch.save({'model': {}, 'arch': 'resnet18', 'val_mae': 2.0, 'best_mae': 9.0}, p)
    ck = load_checkpoint(p)
    assert ck['val_mae'] == 2.0 and ck['train_state'] is None and ck['epoch'] is None


def test_run_bias_correction_and_options(run, tmp_path):
    assert run_bias_correction(run) == BC
    assert run_bias_correction(tmp_path) is None
    (tmp_path / 'metrics.json').write_text('{"overall": 1}')
    assert run_bias_correction(tmp_path) is None
    (tmp_path / 'metrics.json').write_text('{broken')
    with pytest.raises(InputError, match='not valid JSON'): run_bias_correction(tmp_path)
    o = run_options(run)
    assert (o.arch, o.image_size, o.roi, o.roi_box, o.mask_annotations) == ('resnet18', 48, 'crop', '0.1,0,0.9,1', True)


def test_load_run_model_refuses_what_does_not_fit(run, tmp_path):
    with pytest.raises(InputError, match='no such run folder'): load_run_model(tmp_path / 'nope')
    other = tmp_path / run.name; shutil.copytree(run, other)
    assert load_run_model(other).run_dir == other
    ck = torch.load(other / 'best_model.pth', weights_only=True)
    for key, value, msg in (('arch', 'resnet34', "arch='resnet34'"), ('image_size', 64, 'image_size=64')):
        torch.save(dict(ck, **{key: value}), other / 'best_model.pth')
        with pytest.raises(InputError, match=msg): load_run_model(other)
    torch.save(dict(ck, model={'fc.weight': torch.zeros(1)}), other / 'best_model.pth')
    with pytest.raises(InputError, match=r'weights do not fit a resnet18 \(RuntimeError\)'): load_run_model(other)
    # another run's checkpoint would be reported as this run's (its epoch, hash, bias correction): refused, however named
    for ck_arg in (run / 'best_model.pth', f'../{run.parent.name}/{run.name}/best_model.pth'):
        with pytest.raises(InputError, match='is not in the run folder'): load_run_model(other, ck_arg)
    (other / 'sub').mkdir(); shutil.copy(run / 'best_model.pth', other / 'sub' / 'kept.pth')
    assert load_run_model(other, 'sub/kept.pth').checkpoint.name == 'kept.pth'     # inside the folder: fine


def test_predict_with_another_runs_checkpoint_is_one_line(run, tmp_path):
    from conftest import agenb
    other = tmp_path / run.name; shutil.copytree(run, other)
    imgs = Path(json.loads((run / 'config.json').read_text())['args']['image_dir'])
    r = agenb('predict', other, '--image-dir', imgs, '--out', tmp_path / 'p.csv', '--checkpoint', run / 'best_model.pth')
    assert r.returncode == 2 and 'is not in the run folder' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'p.csv').exists()


def test_subject_table_of_a_distribution_run_is_the_mixture_of_its_images():
    "predict's per-subject rows for a distribution head: image statistics, and the mixture of the images' distributions."
    from types import SimpleNamespace
    from agenb.model import DistributionHead
    head = DistributionHead([0, 10, 20, 30], label_sigma=3.0)                   # bins centred on 5, 15, 25
    df = pd.DataFrame({'subject': ['2', '10', None, '2'], 'pred': [5.0, 15.0, 25.0, 25.0]})
    df.attrs['probs'] = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=float)  # the None row: no subject
    t = subject_table(df, SimpleNamespace(head=head))
    assert t.subject.tolist() == ['2', '10'] and t.n_images.tolist() == [2, 1]
    assert t.pred.tolist() == [15.0, 15.0] and t.pred_sd.iloc[0] == pytest.approx(200 ** 0.5) and np.isnan(t.pred_sd.iloc[1])
    # subject 2: half in the first bin, half in the last: mean 15, variance 0.5*25 + 0.5*625 + 100/12 - 225 (uniform bins);
    # quantiles read off the mixture's CDF (0, .5, .5, 1 at 0, 10, 20, 30); subject 10: all in the middle bin
    assert t.dist_sd.tolist() == pytest.approx([(12.5 + 312.5 + 100 / 12 - 225) ** 0.5, (100 / 12) ** 0.5])
    np.testing.assert_allclose(t[['lo80', 'hi80', 'lo95', 'hi95']].to_numpy(), [[2, 28, 0.5, 29.5], [11, 19, 10.25, 19.75]])
    plain = subject_table(df, SimpleNamespace(head=None))                      # a regression run: no distribution columns
    assert 'dist_sd' not in plain and 'lo80' not in plain and plain.pred.tolist() == [15.0, 15.0]


def test_predict_images_of_a_covariate_run_reads_each_images_own_row(run, tmp_path):
    """A `--covariates bmi,sex` run: every image gets the covariates of its own row of the table (matched by resolved
    path, first row of an image listed twice), standardised with the checkpoint's training statistics; an image that
    is not in the table gets them all imputed; no table is a clear error. A run without bias correction has no
    'corrected' column."""
    from agenb.model import covariate_inputs, fit_covariates
    cov_run = tmp_path / run.name; shutil.copytree(run, cov_run)
    cfg = json.loads((cov_run / 'config.json').read_text()); cfg['args']['covariates'] = 'bmi,sex'
    (cov_run / 'config.json').write_text(json.dumps(cfg))
    stats = fit_covariates(np.array([[20.0, 1.0], [30.0, 0.0], [np.nan, 1.0], [25.0, np.nan]]), ('bmi', 'sex'))
    torch.manual_seed(1)
    model = build_model('resnet18', pretrained=False, dropout=0.2, n_covariates=4)
    torch.save(make_checkpoint(model.state_dict(), 3, 7.5, run_options(cov_run), PREP.to_dict(), covariates=stats),
               cov_run / 'best_model.pth')
    (cov_run / 'metrics.json').unlink()
    rm = load_run_model(cov_run)
    assert rm.covariate_stats == stats and rm.bias_correction is None
    paths = [Path(p) for p in read_split(run).path][:4]
    # the table names the images another way (through '..'), lists the second one twice and leaves out the last one
    other = lambda p: str(p.parent / '..' / p.parent.name / p.name)
    table = pd.DataFrame({'path': [other(paths[0]), other(paths[1]), other(paths[1]), other(paths[2])],
                          'bmi': [18.0, 35.0, 99.0, np.nan], 'sex': ['M', 'F', 'M', 'F']})
    df, _, _ = predict_images(rm, paths, batch_size=3, table=table)
    raw = np.array([[18.0, 1.0], [35.0, 0.0], [np.nan, 0.0], [np.nan, np.nan]])
    x = load_images([str(p) for p in paths], PREP).float() / 255
    m = build_model('resnet18', pretrained=False, dropout=0.2, n_covariates=4)
    m.load_state_dict(torch.load(cov_run / 'best_model.pth', weights_only=True)['model']); m.eval()
    with torch.no_grad(): want = m(PREP.normalize(x), covariate_inputs(raw, stats)).squeeze(1).double().numpy()
    np.testing.assert_allclose(df.pred, want, atol=1e-4, rtol=0)
    with torch.no_grad(): ignored = m(PREP.normalize(x), covariate_inputs(raw[[3, 3, 3, 3]], stats)).squeeze(1).numpy()
    assert np.abs(ignored - want).max() > 1e-3                            # the covariates change the predictions
    assert df.attrs['covariates_imputed'] == 2 and 'corrected' not in df
    with pytest.raises(InputError, match='this run uses --covariates bmi,sex: pass --excel-path'):
        predict_images(rm, paths, table=None)
    torch.save(make_checkpoint(model.state_dict(), 3, 7.5, run_options(cov_run), PREP.to_dict()), cov_run / 'best_model.pth')
    with pytest.raises(InputError, match='has no covariate statistics although the run used --covariates; train the run again'):
        load_run_model(cov_run)


def test_predict_split_of_a_covariate_run_reads_the_runs_own_spreadsheet(synth_root, tmp_path):
    """predict_split (what train's evaluation and export's check use) on a `--covariates sex,bmi` run: the covariates
    of the split's images come from the run's recorded spreadsheet, standardised with the checkpoint's statistics;
    the split defaults to test."""
    from agenb.data import load_dataset
    from agenb.model import covariate_inputs, fit_covariates
    img_dir, xlsx = synth_root / 'TA' / 'Healthy' / 'Images', synth_root / 'TA' / 'characteristics.xlsx'
    t = load_dataset(img_dir, xlsx)[0].head(6)
    prep = Preprocessing(image_size=48)
    o = resolve_options({'image_dir': str(img_dir), 'excel_path': str(xlsx), 'arch': 'resnet18', 'image_size': 48,
                         'dropout': 0.2, 'covariates': 'sex,bmi'})
    run = tmp_path / 'run_20260101_000001'; run.mkdir()
    (run / 'config.json').write_text(json.dumps({'args': o.to_dict(), 'preprocessing': prep.to_dict(), 'augmentation': {}}))
    raw = np.stack([t.sex.map({'M': 1.0, 'F': 0.0}).to_numpy(dtype=float), t.bmi.to_numpy(dtype=float)], 1)
    stats = fit_covariates(raw[:2], ('sex', 'bmi'))
    torch.manual_seed(2)
    model = build_model('resnet18', pretrained=False, dropout=0.2, n_covariates=4)
    torch.save(make_checkpoint(model.state_dict(), 1, 5.0, o, prep.to_dict(), covariates=stats), run / 'best_model.pth')
    t.assign(split=['train'] * 2 + ['val'] * 2 + ['test'] * 2)[['path', 'filename', 'subject', 'age', 'split']].to_csv(
        run / 'split.csv', index=False)
    p = predict_split(run)
    assert list(p.filename) == list(t.filename[4:]) and (p.split == 'test').all()
    model.eval()
    x = prep.normalize(load_images(list(t.path[4:]), prep).float() / 255)
    with torch.no_grad():
        want = model(x, covariate_inputs(raw[4:], stats)).squeeze(1).double().numpy()
        other = model(x, covariate_inputs(raw[[0, 0]], stats)).squeeze(1).double().numpy()
    np.testing.assert_allclose(p.pred, want, atol=1e-4, rtol=0)
    assert np.abs(other - want).max() > 1e-3 or (raw[4:] == raw[[0, 0]]).all()          # the covariates matter


def test_predict_images_of_a_distribution_run(run, tmp_path):
    """A `--head distribution --covariates bmi` run: predict's age is the mean of the predicted distribution over the
    bins, and every image gets its SD and 80%/95% intervals (agenb.runs.interval_tables of the softmax, computed with
    the image's covariates), kept for the subject table."""
    from agenb.model import covariate_inputs, fit_covariates
    from agenb.runs import interval_tables
    dist = tmp_path / run.name; shutil.copytree(run, dist)
    cfg = json.loads((dist / 'config.json').read_text())
    cfg['args'].update(head='distribution', age_bins='0:100:10', label_sigma=2.0, covariates='bmi')
    (dist / 'config.json').write_text(json.dumps(cfg))
    stats = fit_covariates(np.array([[20.0], [30.0]]), ('bmi',))
    torch.manual_seed(4)
    model = build_model('resnet18', pretrained=False, dropout=0.2, outputs=10, n_covariates=2)
    torch.save(make_checkpoint(model.state_dict(), 3, 7.5, run_options(dist), PREP.to_dict(), covariates=stats),
               dist / 'best_model.pth')
    rm = load_run_model(dist)
    assert rm.head is not None and list(rm.head.centers) == [5.0 + 10 * k for k in range(10)]
    paths = [Path(p) for p in read_split(run).path][:5]
    bmi = np.array([[18.0], [24.0], [31.0], [np.nan], [40.0]])
    df, _, _ = predict_images(rm, paths, batch_size=2, table=pd.DataFrame({'path': [str(p) for p in paths], 'bmi': bmi[:, 0]}))
    model.eval()
    with torch.no_grad(): logits = model(PREP.normalize(load_images([str(p) for p in paths], PREP).float() / 255),
                                         covariate_inputs(bmi, stats))
    probs = torch.softmax(logits.double(), 1).numpy()
    np.testing.assert_allclose(df.attrs['probs'], probs, atol=1e-5)
    np.testing.assert_allclose(df.pred, probs @ rm.head.centers, atol=1e-3)
    img, _ = interval_tables(rm.head, df[['subject']], probs)
    for c in ('pred_sd', 'lo80', 'hi80', 'lo95', 'hi95'):
        np.testing.assert_allclose(df[c], img[c], atol=1e-3, err_msg=c)
    assert (df.lo95 <= df.lo80).all() and (df.lo80 < df.pred).all() and (df.pred < df.hi80).all()
    assert subject_table(df, rm).dist_sd.notna().all()


def test_predict_images_skips_only_when_asked_and_keeps_files_without_a_subject(run, tmp_path):
    rm = load_run_model(run)
    good = Path(read_split(run).path[0])
    odd = tmp_path / 'scan.png'; shutil.copy(good, odd)                      # no subject in its name
    bad = tmp_path / 'anon_99_1.png'; bad.write_bytes(b'not a png')
    with pytest.raises(InputError, match='--skip-bad'): predict_images(rm, [good, bad])
    df, skipped, _ = predict_images(rm, [good, odd, bad], skip_bad=True)
    assert list(df.filename) == [good.name, 'scan.png'] and df.subject.isna().tolist() == [False, True]
    assert df.image_index.isna().tolist() == [False, True] and str(df.image_index.dtype) == 'Int64'
    assert df.pred[0] == pytest.approx(df.pred[1], abs=1e-5)                   # the same pixels
    assert [s['file'] for s in skipped] == [str(bad)] and skipped[0]['reason'].startswith('could not read image')


def test_read_split_and_run_bias_correction_edge_cases(run, tmp_path):
    v = read_split(run, 'val')
    assert list(v.columns) == ['path', 'filename', 'subject', 'age', 'split'] and list(v.index) == [0, 1, 2]
    with pytest.raises(InputError, match=r'not a run folder \(no split.csv\)'): read_split(tmp_path)
    for text in ('[1, 2]', '{"bias_correction": "applied"}'):
        (tmp_path / 'metrics.json').write_text(text)
        assert run_bias_correction(tmp_path) is None, text


def test_load_checkpoint_reads_only_weights(run, tmp_path):
    "weights_only: a checkpoint that holds other Python objects is refused; one without a version number is read."
    ck = torch.load(run / 'best_model.pth', weights_only=True)
    torch.save(dict(ck, note=Path('x')), tmp_path / 'odd.pth')
    with pytest.raises(InputError, match='cannot be read as a checkpoint'): load_checkpoint(tmp_path / 'odd.pth')
    torch.save({k: v for k, v in ck.items() if k != 'version'}, tmp_path / 'nov.pth')
    assert load_checkpoint(tmp_path / 'nov.pth')['epoch'] == 3


def test_bias_correction_only_for_the_evaluated_weights(run, tmp_path):
    """metrics.json's bias correction was fitted on best_model.pth's validation predictions: predicting with other
    weights (--checkpoint last.pth) must not output "corrected" ages from it; a copy of the best weights keeps it."""
    other = tmp_path / run.name; shutil.copytree(run, other)
    shutil.copy(other / 'best_model.pth', other / 'checkpoint_epoch_0003.pth')   # the best epoch's periodic copy
    ck = torch.load(other / 'best_model.pth', weights_only=True)
    ck['model'] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck['model'].items()}
    ck['epoch'] = 4
    torch.save(ck, other / 'last.pth')
    images = [Path(p) for p in read_split(other, 'test').path]
    last = load_run_model(other, 'last.pth')
    df, _, _ = predict_images(last, images)
    assert 'corrected' not in df                                                  # was (pred - 5.0) / 0.8
    assert last.bias_correction['applied'] is False and 'best_model.pth' in last.bias_correction['reason']
    assert not last.evaluated
    for name in ('best_model.pth', 'checkpoint_epoch_0003.pth'):
        rm = load_run_model(other, name)
        assert rm.evaluated and rm.bias_correction == BC
        assert 'corrected' in predict_images(rm, images)[0]
