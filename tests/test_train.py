"""The trainer end to end: run folder, complete config.json, recipes, reproduction, bad input."""
import json, math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY, agenb

# The complete config of the users' seed document (seed-config-improvements.en.md): agenb writes a superset.
SEED_CONFIG = {
    "script_name": 0, "script_version": 0, "timestamp": 0, "description": 0, "device": 0, "world_size": 0,
    "use_ddp": 0, "gpu_names": 0, "cuda_version": 0, "pytorch_version": 0,
    "dataset": {k: 0 for k in ["image_dir", "excel_path", "total_samples", "train_samples", "val_samples",
                               "test_samples", "train_subjects", "val_subjects", "test_subjects", "total_subjects",
                               "test_size", "val_size", "random_seed", "split_method", "data_leakage_prevention"]},
    "model": {k: 0 for k in ["architecture", "pretrained", "dropout", "output_dim", "task"]},
    "training": {k: 0 for k in ["loss_function", "optimizer", "optimizer_params", "lr_scheduler", "scheduler_params",
                                "warmup_epochs", "max_grad_norm", "epochs", "patience", "batch_size",
                                "effective_batch_size", "learning_rate", "weight_decay", "num_workers", "plot_interval"]},
    "optimizations": {k: 0 for k in ["gradient_clipping", "warmup", "early_stopping", "cosine_annealing"]},
    "output_dir": 0,
}


def missing_keys(template, cfg, prefix=''):
    out = []
    for k, v in template.items():
        if k not in cfg: out.append(prefix + k)
        elif isinstance(v, dict): out += missing_keys(v, cfg[k], prefix + k + '.')
    return out


def test_run_folder_has_every_file(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    for f in ['config.json', 'history.json', 'best_model.pth', 'last.pth', 'training_curves.png', 'predictions.csv',
              'metrics.json', 'split.csv', 'train.log']:
        assert f in names, f
    # checkpoint every epoch, keep only the last one
    assert sorted(n for n in names if n.startswith('checkpoint_epoch_')) == ['checkpoint_epoch_0002.pth']
    assert tiny_run.name.startswith('run_') and tiny_run.name.endswith('_tiny')
    assert not [n for n in names if n.endswith('.tmp')]


def test_config_has_every_seed_key_and_tells_the_truth(tiny_run):
    cfg = json.loads((tiny_run / 'config.json').read_text())
    assert missing_keys(SEED_CONFIG, cfg) == []
    assert cfg['status'] == 'completed' and cfg['epochs_completed'] == 2
    assert (cfg['device'], cfg['world_size'], cfg['use_ddp'], cfg['gpu_names']) == ('cpu', 1, False, [])
    t = cfg['training']
    assert (t['loss_function'], t['optimizer'], t['lr_scheduler']) == ('MAE (L1Loss)', 'AdamW', 'CosineAnnealingLR')
    assert t['scheduler_params'] == {'T_max': 2, 'eta_min': 1e-7}
    assert t['optimizer_params']['betas'] == [0.9, 0.999] and t['learning_rate'] == 1e-3
    assert t['effective_batch_size'] == 16 and t['max_grad_norm'] == 1.0 and t['warmup_epochs'] == 1
    assert cfg['optimizations'] == {**cfg['optimizations'], 'gradient_clipping': True, 'warmup': True,
                                    'early_stopping': True, 'cosine_annealing': True, 'mixed_precision': None}
    ds = cfg['dataset']
    assert ds['split_method'] == 'by_subject_id' and ds['data_leakage_prevention'] is True
    assert ds['train_subjects'] + ds['val_subjects'] + ds['test_subjects'] == ds['total_subjects']
    assert ds['train_samples'] + ds['val_samples'] + ds['test_samples'] == ds['total_samples']
    split = pd.read_csv(tiny_run / 'split.csv')
    assert len(split) == ds['total_samples'] and (split.split == 'test').sum() == ds['test_samples']
    m = cfg['model']
    assert (m['architecture'], m['pretrained'], m['output_dim'], m['task']) == ('resnet18', False, 1, 'age_regression')
    assert cfg['preprocessing']['image_size'] in (64, [64, 64])
    assert cfg['augmentation']['hflip_p'] == 0.0  # flips off by default, and recorded as off
    assert cfg['args']['epochs'] == 2 and 'epochs' in cfg['args_explicit']
    assert cfg['environment']['packages']['torch'] and cfg['data_fingerprint']['excel_sha256']
    # the CPU threads it computed with (the commands run with OMP_NUM_THREADS=1 here): the live count, not a flag
    th = cfg['environment']['threads']
    assert (th['torch_threads'], th['OMP_NUM_THREADS']) == (1, '1') and 'MKL_NUM_THREADS' in th


def test_history_and_predictions(tiny_run):
    h = json.loads((tiny_run / 'history.json').read_text())
    assert [e['epoch'] for e in h] == [1, 2]
    for e in h:
        assert set(e) >= {'train_loss', 'val_loss', 'val_mae', 'val_rmse', 'lr', 'epoch_seconds'}
        assert all(math.isfinite(e[k]) for k in ('train_loss', 'val_mae', 'val_rmse'))
    pred = pd.read_csv(tiny_run / 'predictions.csv')
    cfg = json.loads((tiny_run / 'config.json').read_text())
    assert len(pred) == cfg['dataset']['test_samples']
    metrics = json.loads((tiny_run / 'metrics.json').read_text())
    assert metrics['overall']['n'] == len(pred)


def test_bias_correction_is_fitted_on_the_runs_validation_predictions(tiny_run):
    "metrics.json's correction: n = the validation images, a and b = the least-squares line of the best model's"
    "validation predictions (re-made here in one process), applied to the test predictions as (pred - b) / a."
    from scipy.stats import linregress
    from agenb.runs import predict_split
    cfg = json.loads((tiny_run / 'config.json').read_text())
    m = json.loads((tiny_run / 'metrics.json').read_text())
    val = predict_split(tiny_run, 'val')
    bc = m['bias_correction']
    assert bc['fitted_on'] == 'val' and bc['n'] == cfg['dataset']['val_samples'] == len(val)
    fit = linregress(val.age.to_numpy(float), val.pred.to_numpy(float))
    assert bc['a'] == pytest.approx(fit.slope, abs=1e-4) and bc['b'] == pytest.approx(fit.intercept, abs=1e-3)
    assert m['val']['n'] == len(val) and m['val']['mae'] == pytest.approx(float((val.pred - val.age).abs().mean()), abs=1e-4)
    pred = pd.read_csv(tiny_run / 'predictions.csv')
    assert m['overall']['n'] == len(pred) == cfg['dataset']['test_samples']
    assert m['overall']['mae'] == pytest.approx(float((pred.pred - pred.age).abs().mean()), abs=1e-9)
    if bc['applied']:
        corrected = (pred.pred - bc['b']) / bc['a']
        assert corrected.to_numpy() == pytest.approx(pred.corrected.to_numpy(), abs=1e-6)
        assert m['corrected']['mae'] == pytest.approx(float((corrected - pred.age).abs().mean()), abs=1e-6)
    else:
        assert bc['reason'] and pred.corrected.isna().all() and m['corrected'] is None


def test_best_model_is_the_epoch_of_lowest_val_mae(tiny_run):
    from agenb.runs import predict_split
    h = json.loads((tiny_run / 'history.json').read_text())
    best = min(h, key=lambda e: e['val_mae'])                       # the first of equal minima (min_delta 0)
    ck = torch.load(tiny_run / 'best_model.pth', weights_only=True)
    assert (ck['epoch'], ck['val_mae']) == (best['epoch'], best['val_mae'])
    cfg = json.loads((tiny_run / 'config.json').read_text())
    assert (cfg['best_epoch'], cfg['best_val_mae']) == (best['epoch'], best['val_mae'])
    val = predict_split(tiny_run, 'val')                              # the saved weights are that epoch's
    assert float((val.pred - val.age).abs().mean()) == pytest.approx(best['val_mae'], abs=1e-4)


def test_checkpoints_load_safely(tiny_run):
    ck = torch.load(tiny_run / 'best_model.pth', weights_only=True)
    assert ck['arch'] == 'resnet18' and ck['image_size'] == 64 and 'fc.1.weight' in ck['model']
    assert ck['format'] == 'agenb-checkpoint' and ck['train_state'] is None     # weights only: the one layout
    last = torch.load(tiny_run / 'last.pth', weights_only=True)
    assert last['format'] == 'agenb-checkpoint' and last['epoch'] == 2
    assert len(last['train_state']['history']) == 2 and last['train_state']['rng'] and last['train_state']['optimizer']


def test_reproduce_from_config(tiny_run, tmp_path):
    r = agenb('train', '--config', tiny_run / 'config.json', '--output-dir', tmp_path, '--no-report')
    assert r.returncode == 0, r.stderr[-2000:]
    new = Path(r.stdout.strip().splitlines()[-1])
    assert new.parent == tmp_path and new != tiny_run
    h0 = json.loads((tiny_run / 'history.json').read_text())
    h1 = json.loads((new / 'history.json').read_text())
    assert [e['epoch'] for e in h1] == [e['epoch'] for e in h0] == [1, 2]   # a rerun that stops early is no reproduction
    for a, b in zip(h0, h1, strict=True):
        for k in ('train_loss', 'val_loss', 'val_mae', 'val_rmse', 'lr'):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    assert (pd.read_csv(new / 'split.csv').split == pd.read_csv(tiny_run / 'split.csv').split).all()


def test_mse_recipe_is_train_py(data_args, tmp_path):
    r = agenb('train', *data_args, *TINY, '--epochs', '1', '--loss', 'mse', '--output-dir', tmp_path, '--no-report')
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((Path(r.stdout.strip().splitlines()[-1]) / 'config.json').read_text())
    t = cfg['training']
    assert (t['loss_function'], t['optimizer'], t['lr_scheduler']) == ('MSE (MSELoss)', 'Adam', 'ReduceLROnPlateau')
    assert t['scheduler_params'] == {'mode': 'min', 'factor': 0.5, 'patience': 10}
    assert cfg['optimizations']['cosine_annealing'] is False and cfg['optimizations']['gradient_clipping'] is False


def _no_run_left(out):
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize('extra,needle', [
    (['--loss', 'l3'], '--loss'),
    (['--arch', 'vgg99'], 'vgg99'),
    (['--pretrained'], '--weights'),
    (['--weights', '/nonexistent/w.pth'], 'not found'),
    (['--val-size', '0'], '--val-size'),
])
def test_bad_flags_exit_2_without_a_run(data_args, tmp_path, extra, needle):
    out = tmp_path / 'runs'
    r = agenb('train', *data_args, *TINY, '--output-dir', out, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:') and needle in lines[0], r.stderr
    assert _no_run_left(out)


def test_bad_config_and_resume(tmp_path):
    bad = tmp_path / 'config.json'; bad.write_text('{not json')
    r = agenb('train', '--config', bad)
    assert r.returncode == 2 and 'not valid JSON' in r.stderr and 'Traceback' not in r.stderr
    bad.write_text(json.dumps({'args': {'image_dir': 'x', 'colour': 'red'}}))
    r = agenb('train', '--config', bad)
    assert r.returncode == 2 and 'colour' in r.stderr
    r = agenb('train', '--resume', tmp_path)
    assert r.returncode == 2 and 'config' in r.stderr and 'Traceback' not in r.stderr


def test_missing_data_exit_2(tmp_path):
    r = agenb('train', '--image-dir', tmp_path / 'nope', '--excel-path', tmp_path / 'x.xlsx', '--output-dir', tmp_path / 'runs')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _no_run_left(tmp_path / 'runs')
