"""The trainer end to end with the options no other test runs: --stratify, --min-age/--max-age, --folds/--fold,
--split-file, --cache-dir, the huber and smoothl1 losses and the plateau schedule. Each run is checked against an
independent computation: the split module called directly, the loss recomputed from the saved weights."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, agenb, run_dir_of
from agenb.data import load_dataset
from agenb.runs import predict_split, read_split
from agenb.split import make_split

FAST = [*TINY, '--no-report', '--gradcam-n', '0', '--checkpoint-every', '0', '--warmup-epochs', '0']


def train(data_args, out, *extra):
    r = agenb('train', *data_args, *FAST, '--output-dir', out, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(r)
    return run, json.loads((run / 'config.json').read_text())


@pytest.fixture(scope='module')
def table(data_args):
    return load_dataset(data_args[1], data_args[3])[0]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('image_cache')


@pytest.fixture(scope='module')
def huber_run(data_args, tmp_path_factory, cache):
    return train(data_args, tmp_path_factory.mktemp('huber'), '--loss', 'huber', '--scheduler', 'plateau',
                 '--plateau-patience', '0', '--stratify', '--bin-width', '30', '--min-age', '15', '--max-age', '75',
                 '--cache-dir', cache)


@pytest.fixture(scope='module')
def fold_run(data_args, tmp_path_factory, cache, huber_run):   # after huber_run: the cache is warm
    return train(data_args, tmp_path_factory.mktemp('fold'), '--loss', 'smoothl1', '--epochs', '1', '--folds', '3',
                 '--fold', '1', '--cache-dir', cache, '--deterministic')


def per_subject(split_df):
    return dict(zip(split_df.subject.astype(str), split_df.split))


def last_val_loss(run, criterion):
    "The validation loss of the last epoch, recomputed from last.pth's predictions with `criterion`."
    val = predict_split(run, 'val', checkpoint='last.pth')
    return float(criterion(torch.tensor(val.pred.to_numpy()), torch.tensor(val.age.to_numpy())))


def test_huber_loss_and_plateau_schedule(huber_run):
    run, cfg = huber_run
    t = cfg['training']
    assert (t['loss_function'], t['lr_scheduler']) == ('Huber (HuberLoss, delta=1.0)', 'ReduceLROnPlateau')
    assert t['scheduler_params'] == {'mode': 'min', 'factor': 0.5, 'patience': 0} and not cfg['optimizations']['cosine_annealing']
    h = json.loads((run / 'history.json').read_text())
    assert h[-1]['val_loss'] == pytest.approx(last_val_loss(run, torch.nn.HuberLoss()), abs=1e-3)
    assert h[-1]['val_loss'] != pytest.approx(h[-1]['val_mae'], abs=1e-3)     # not the L1 loss under another name
    # plateau patience 0: the rate is halved after the first epoch that is not a new best
    assert [e['lr'] for e in h] == [1e-3, 1e-3]
    lr = torch.load(run / 'last.pth', weights_only=True)['train_state']['optimizer']['param_groups'][0]['lr']
    improved = h[1]['val_mae'] < h[0]['val_mae'] * (1 - 1e-4)                   # ReduceLROnPlateau's relative threshold
    assert lr == pytest.approx(1e-3 if improved else 5e-4)


def test_stratified_split_filtered_by_age_after_splitting(huber_run, table):
    run, cfg = huber_run
    ds = cfg['dataset']
    assert ds['stratified'] is True and ds['stratify_fallback'] is None and (ds['min_age'], ds['max_age']) == (15, 75)
    outside = (table.age < 15) | (table.age > 75)
    assert outside.any() and ds['excluded_by_age_filter'] == int(outside.sum()) == ds['n_images_excluded']
    split = read_split(run)
    assert split.age.between(15, 75).all() and len(split) == int((~outside).sum())
    full, _ = make_split(table, seed=42, stratify=True, bin_width=30)                 # the unfiltered split
    want = per_subject(table.assign(split=full)[~outside])
    assert per_subject(split) == want                                             # kept subjects keep their place


def test_image_cache_is_written_then_read(huber_run, fold_run, cache):
    (_, a), (_, b) = huber_run, fold_run
    assert any(cache.iterdir())
    n_a, n_b = a['dataset']['total_samples'], b['dataset']['total_samples']    # a kept only ages 15-75
    assert n_a < n_b and (a['image_cache']['cache_misses'], a['image_cache']['cache_hits']) == (n_a, 0)
    assert (b['image_cache']['cache_hits'], b['image_cache']['cache_misses']) == (n_a, n_b - n_a)


def test_fold_and_smoothl1(fold_run, table):
    run, cfg = fold_run
    assert cfg['training']['loss_function'] == 'Smooth L1 (SmoothL1Loss, beta=1.0)'
    assert (cfg['dataset']['folds'], cfg['dataset']['fold']) == (3, 1)
    assert (cfg['optimizations']['deterministic'], cfg['optimizations']['deterministic_warn_only']) == (True, True)
    want, _ = make_split(table, seed=42, folds=3, fold=1)
    assert per_subject(read_split(run)) == per_subject(table.assign(split=want))
    h = json.loads((run / 'history.json').read_text())
    assert h[-1]['val_loss'] == pytest.approx(last_val_loss(run, torch.nn.SmoothL1Loss()), abs=1e-3)


def test_split_file_is_reused_exactly(tiny_run, data_args, tmp_path):
    run, cfg = train(data_args, tmp_path, '--epochs', '1', '--split-file', tiny_run / 'split.csv', '--seed', '7')
    from agenb.core import file_sha256
    assert cfg['dataset']['split_file_sha256'] == file_sha256(tiny_run / 'split.csv')
    a, b = read_split(tiny_run), read_split(run)
    assert list(a.filename) == list(b.filename) and list(a.split) == list(b.split)


def test_a_rule_sets_the_scratch_learning_rate_and_the_run_records_why(data_args, tmp_path, monkeypatch):
    """With the from-scratch rule on (agenb.options.SCRATCH; off by default, see 08_options) and no --lr/--warmup-epochs,
    the run trains with the rule's values, and config.json and the report say which rule chose them."""
    from agenb import options
    monkeypatch.setattr(options, 'SCRATCH', {'lr': 2e-3, 'warmup_epochs': 2})
    args = ['--arch', 'resnet18', '--image-size', '64', '--batch-size', '16', '--no-pretrained', '--num-workers', '2',
            '--gradcam-n', '0', '--checkpoint-every', '0']   # TINY without --lr and --warmup-epochs
    r = agenb('train', *data_args, *args, '--output-dir', tmp_path, '--epochs', '1')
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(r)
    cfg = json.loads((run / 'config.json').read_text())
    assert (cfg['args']['lr'], cfg['args']['warmup_epochs'], cfg['args']['pretrained']) == (2e-3, 2, False)
    assert set(cfg['args_rules']) == {'lr', 'warmup_epochs'} and 'from scratch' in cfg['args_rules']['lr']
    assert cfg['training']['learning_rate'] == 2e-3                         # read from the live optimizer
    assert 'rule: training from scratch' in (run / 'report.html').read_text()
    from agenb.options import given_from_config, resolve_options
    assert resolve_options(given_from_config(cfg, {})).lr == 2e-3                  # reproduced from config.json alone
    assert resolve_options(given_from_config(cfg, {'pretrained': True})).lr == 1e-4   # fine-tuning: the recipe


# Out-of-range and contradictory options, and a hand-edited config.json: exit 2, one line naming the flag or key,
# no traceback, and no run folder (each was accepted, or failed inside torch or numpy after the folder existed).
def refused(r, out, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr + r.stdout, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:'), r.stderr
    for n in needles: assert n in lines[0], (n, lines[0])
    assert not Path(out).exists()


@pytest.mark.parametrize('flags,says', [
    (['--max-grad-norm', '-1'], '--max-grad-norm must be >= 0 (0: no clipping'),
    (['--max-grad-norm', 'nan'], "--max-grad-norm: must be a finite number, got 'nan'"),
    (['--lr', 'inf'], "--lr: must be a finite number, got 'inf'"),
    (['--eta-min', '-1'], '--eta-min must be >= 0'),
    (['--scheduler', 'cosine', '--lr', '1e-4', '--eta-min', '1e-3'], '--eta-min 0.001 is above --lr 0.0001'),
    (['--weight-decay', '-1'], '--weight-decay must be >= 0'),
    (['--seed', '-1'], '--seed must be a whole number from 0 to 4294967295'),
    (['--seed', str(2 ** 32)], '--seed must be a whole number from 0 to 4294967295'),
    (['--scheduler', 'plateau', '--plateau-factor', '2'], '--plateau-factor must be in (0, 1)'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be a whole number >= 0'),
    (['--t-max', '0', '--warmup-epochs', '0'], '--t-max must be a whole number of epochs >= 1'),
    (['--patience', '-1'], '--patience must be a whole number >= 0'),
    (['--min-delta', '-1'], '--min-delta must be >= 0'),
    (['--view-pool', 'attention'], '--view-pool attention pools the images of --subject-views'),
    (['--fold', '2'], '--fold picks the test fold of --folds'),
    (['--folds', '5', '--split-file', 'S.csv'], '--folds and --split-file'),
])
def test_bad_or_contradictory_options_are_refused_before_the_run_folder(data_args, tmp_path, flags, says):
    out = tmp_path / 'out'
    refused(agenb('train', *data_args, *FAST, '--output-dir', out, *flags), out, says)


@pytest.mark.parametrize('key,value,says', [('pretrained', 'false', 'true or false'), ('lr', '1e-3', 'a finite number'),
                                            ('seed', 42.5, 'a whole number'), ('epochs', None, 'a whole number')])
def test_hand_edited_config_values_must_have_the_options_type(data_args, tmp_path, key, value, says):
    "config.json's args are typed like the flags: a quoted false is not true, a quoted number not a number."
    from agenb.options import resolve_options
    from agenb.train import parse_command_line
    given = dict(image_dir=data_args[1], excel_path=data_args[3], arch='resnet18', image_size=64, epochs=1, pretrained=False)
    args = resolve_options(given).to_dict()
    good, bad = tmp_path / 'good' / 'config.json', tmp_path / 'bad' / 'config.json'
    for path, a in ((good, args), (bad, {**args, key: value})):
        path.parent.mkdir()
        path.write_text(json.dumps({'args': a, 'args_explicit': sorted(given)}))
    assert parse_command_line(['--config', str(good)])[0] == resolve_options(given)   # the file is otherwise fine
    out = tmp_path / 'out'
    refused(agenb('train', '--config', bad, '--output-dir', out), out, f'"args" key {key!r} must be {says}', 'config.json')
