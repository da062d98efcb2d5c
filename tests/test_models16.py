"""Issue 16: backbones (torchvision, timm), freezing, EMA, SGD/StepLR/OneCycleLR, the distribution head."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import timm

from conftest import TINY, agenb, run_cmd
from agenb.core import InputError
from agenb.model import (build_model, backbone_stages, set_trainable, param_groups, gradcam_target_layer, describe_model,
                         DistributionHead, parse_age_bins, coverage)

ONE = [*TINY, '--epochs', '1', '--no-report', '--gradcam-n', '0', '--image-size', '32']


def _train(data_args, tmp_path, *extra, env=None):
    r = agenb('train', *data_args, *ONE, '--output-dir', tmp_path, *extra, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def _cfg(run):
    return json.loads((run / 'config.json').read_text())


@pytest.mark.parametrize('arch', ['mobilenet_v3_large', 'regnet_y_8gf', 'efficientnet_v2_s', 'timm:test_efficientnet'])
def test_new_backbones_build_freeze_and_gradcam_layer(arch):
    m = build_model(arch, init_bias=40.0).eval()
    feats = {}
    h = gradcam_target_layer(m, arch).register_forward_hook(lambda mod, i, o: feats.setdefault('o', o))
    with torch.no_grad():
        assert tuple(m(torch.randn(2, 3, 32, 32)).shape) == (2, 1)
    h.remove()
    assert feats['o'].ndim == 4
    stages, neck, head = backbone_stages(m, arch)
    info = set_trainable(m, arch, unfreeze_last=1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(head) | set(neck) | set(stages[-1][1])
    assert info['n_trainable_parameters'] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    set_trainable(m, arch, freeze_backbone=True)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(head)


def test_timm_local_weights_and_offline_message(tmp_path):
    src = timm.create_model('test_resnet')          # with its 1000-class classifier, as a downloaded file is
    p = tmp_path / 'test_resnet.pth'
    torch.save(src.state_dict(), p)
    m = build_model('timm:test_resnet', weights=p)
    assert torch.equal(m.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert describe_model(m)['weights_kind'] == 'backbone'


def test_timm_pretrained_offline_is_one_line(data_args, tmp_path):
    r = agenb('train', *data_args, *ONE, '--arch', 'timm:resnet18', '--pretrained', '--output-dir', tmp_path,
              env={'HF_HUB_OFFLINE': '1'}, proc=True)       # huggingface_hub reads HF_HUB_OFFLINE when imported
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith('agenb: error: could not get the pretrained weights of timm model resnet18')
    assert '--weights PATH' in line and '--no-pretrained' in line
    assert not list(tmp_path.iterdir())                      # nothing half-written


def test_bad_model_options_exit_2(data_args, tmp_path):
    from agenb.options import resolve_options
    base = dict(image_dir='d', excel_path='x')
    for extra, words in ((dict(arch='resnet1001'), 'unknown architecture'), (dict(arch='squeezenet1_0'), 'convolution'),
                         (dict(freeze_backbone=True, unfreeze_last=1), 'not both'), (dict(ema_decay=1.0), '--ema-decay'),
                         (dict(arch='vit_b_16', image_size=96), 'only 224'), (dict(arch='timm:nope_net'), 'timm has no model'),
                         (dict(head='distribution', age_bins='0:100:7'), 'whole number')):
        with pytest.raises(InputError, match=words): resolve_options({**base, **extra})
    r = agenb('train', *data_args, *ONE, '--output-dir', tmp_path, '--head', 'distribution', '--age-bins', '30:60:1')
    assert r.returncode == 2 and 'widen --age-bins' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-500:]


def test_freeze_backbone_sgd_step_recorded(data_args, tmp_path):
    run = _train(data_args, tmp_path, '--freeze-backbone', '--optimizer', 'sgd', '--scheduler', 'step', '--step-size', '1',
                 '--step-gamma', '0.5', '--warmup-epochs', '0', '--checkpoint-every', '1')
    cfg = _cfg(run)
    assert cfg['model']['n_trainable_parameters'] == 513 and cfg['model']['fine_tuning']['freeze_backbone'] is True
    t = cfg['training']
    assert t['optimizer'] == 'SGD' and t['optimizer_params']['momentum'] == 0.9 and t['optimizer_params']['nesterov'] is True
    assert (t['lr_scheduler'], t['scheduler_params']) == ('StepLR', {'step_size': 1, 'gamma': 0.5})
    sd = torch.load(run / 'best_model.pth', weights_only=True)['model']
    # frozen BatchNorm layers stayed in eval mode: their running statistics are still the initial ones
    assert torch.equal(sd['layer2.0.bn1.running_mean'], torch.zeros_like(sd['layer2.0.bn1.running_mean']))
    assert json.loads((run / 'history.json').read_text())[0]['lr'] == pytest.approx(1e-3)


def test_unfreeze_last_and_backbone_lr_recorded(data_args, tmp_path):
    run = _train(data_args, tmp_path, '--unfreeze-last', '1', '--backbone-lr-mult', '0.1', '--scheduler', 'onecycle',
                 '--warmup-epochs', '0')
    cfg = _cfg(run)
    ft = cfg['model']['fine_tuning']
    assert ft['trainable_stages'] == ['layer4'] and ft['stages'][0] == 'stem'
    groups = {g['name']: g for g in cfg['training']['param_groups']}
    assert groups['backbone']['base_lr'] == pytest.approx(groups['head']['base_lr'] * 0.1)
    assert groups['backbone']['n_parameters'] + groups['head']['n_parameters'] == cfg['model']['n_trainable_parameters']
    assert cfg['training']['lr_scheduler'] == 'OneCycleLR' and cfg['args']['warmup_epochs'] == 0


def test_ema_is_what_the_best_model_holds(data_args, tmp_path):
    run = _train(data_args, tmp_path, '--ema-decay', '0.9', '--patience', '0')
    best, last = (torch.load(run / f, weights_only=True) for f in ('best_model.pth', 'last.pth'))
    raw = last['train_state']['raw_model']
    assert not torch.allclose(raw['fc.1.weight'], last['model']['fc.1.weight'])       # EMA differs from the raw weights
    for k in best['model']:                                                           # and the best model is the EMA
        assert torch.equal(best['model'][k], last['model'][k]), k
    assert _cfg(run)['training']['ema']['decay'] == 0.9
    preds = pd.read_csv(run / 'predictions.csv')
    r = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[preds.path]
    np.testing.assert_allclose(p.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)   # predict uses the EMA weights



def test_mixup_is_recorded_and_reported_and_bad_mixup_is_one_line(data_args, tmp_path):
    from agenb.report_sections import load_run, training_section
    run = _train(data_args, tmp_path / 'ok', '--mixup', '2', '--mixup-sigma', '5')
    m = _cfg(run)['training']['mixup']
    assert (m['alpha'], m['sigma_years'], m['lam']) == (2.0, 5.0, 'Beta(2, 2), drawn per sample') and 'C-Mixup' in m['partner']
    html = str(training_section(load_run(run)))
    assert 'mixup' in html and 'Beta(2, 2)' in html and 'not comparable with the validation loss' in html
    plain = _train(data_args, tmp_path / 'plain')
    assert _cfg(plain)['training']['mixup'] is None
    r = agenb('train', *data_args, *ONE, '--output-dir', tmp_path / 'bad', '--mixup', '2', '--batch-size', '1')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and '--batch-size >= 2' in r.stderr, r.stderr[-500:]
    assert not (tmp_path / 'bad').exists() or not any((tmp_path / 'bad').iterdir())

@pytest.mark.slow   # a killed run and its resume: make test-all
def test_exact_resume_with_ema(data_args, tmp_path):
    three = [*TINY, '--epochs', '3', '--no-report', '--gradcam-n', '0', '--image-size', '32', '--ema-decay', '0.8']
    full = agenb('train', *data_args, *three, '--output-dir', tmp_path / 'full')
    assert full.returncode == 0, full.stderr[-2000:]
    killed = agenb('train', *data_args, *three, '--output-dir', tmp_path / 'killed', env={'AGENB_FAULT': 'kill:0:2:2'})
    assert killed.returncode != 0
    (run,) = list((tmp_path / 'killed').iterdir())
    resumed = agenb('train', '--resume', run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(d / 'last.pth', weights_only=True) for d in (Path(full.stdout.strip().splitlines()[-1]), run))
    for part in ('model', 'raw_model'):
        sa, sb = (a[part], b[part]) if part == 'model' else (a['train_state'][part], b['train_state'][part])
        for k in sa: assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), (part, k)
    assert a['train_state']['ema_n_averaged'] == b['train_state']['ema_n_averaged']
    ha, hb = (json.loads((d / 'history.json').read_text()) for d in (Path(full.stdout.strip().splitlines()[-1]), run))
    assert [h['val_mae'] for h in ha] == pytest.approx([h['val_mae'] for h in hb], rel=1e-6)


def test_distribution_head_mean_and_interval_coverage_with_known_noise():
    "y = 20 + 50 x + N(0, 5): the learned distribution's intervals cover at about their nominal rates."
    g = torch.Generator().manual_seed(0)
    head = DistributionHead(parse_age_bins('-20:100:2'), 1.0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.ReLU(), torch.nn.Linear(64, head.outputs))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sample = lambda n: (lambda x: (x, 20 + 50 * x[:, 0] + 5 * torch.randn(n, generator=g)))(torch.rand(n, 1, generator=g))
    for step in range(1500):
        x, y = sample(256)
        loss = head.loss(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
    x, y = sample(4000)
    with torch.no_grad(): out = net(x)
    p = head.probs(out)
    assert torch.allclose(head.age(out), p @ torch.tensor(head.centers, dtype=torch.float32), atol=1e-4)
    s = head.summary(p.numpy())
    np.testing.assert_allclose(s['pred'], head.age(out).numpy(), atol=1e-3)
    assert abs(np.mean(np.abs(s['pred'] - (20 + 50 * x[:, 0].numpy())))) < 1.5       # the mean finds the signal
    assert 0.74 <= coverage(y, s['lo80'], s['hi80']) <= 0.86
    assert 0.91 <= coverage(y, s['lo95'], s['hi95']) <= 0.98
    assert 4.0 < np.mean(s['pred_sd']) < 6.5


def test_distribution_run_predict_export_roundtrip(data_args, tmp_path):
    run = _train(data_args, tmp_path, '--head', 'distribution', '--age-bins', '0:100:4', '--label-sigma', '2')
    cfg, m = _cfg(run), json.loads((run / 'metrics.json').read_text())
    assert cfg['model']['output_dim'] == 25 and cfg['model']['output_head']['kind'] == 'distribution'
    cal = m['calibration']
    assert cal['subjects']['n'] == m['subject_level']['n'] and 0 <= cal['subjects']['coverage_80'] <= cal['subjects']['coverage_95'] <= 1
    iv = pd.read_csv(run / 'intervals.csv')
    preds = pd.read_csv(run / 'predictions.csv')
    np.testing.assert_allclose(iv.pred, preds.pred, atol=1e-4)
    assert (iv.lo95 <= iv.lo80).all() and (iv.lo80 <= iv.pred).all() and (iv.pred <= iv.hi80).all() and (iv.hi80 <= iv.hi95).all()
    r = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--excel-path', data_args[3], '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[iv.path]
    np.testing.assert_allclose(p[['pred', 'pred_sd', 'lo80', 'hi95']].to_numpy(), iv[['pred', 'pred_sd', 'lo80', 'hi95']].to_numpy(), atol=1e-3)
    assert {'lo80', 'hi80', 'lo95', 'hi95', 'dist_sd'} <= set(pd.read_csv(tmp_path / 'p_subjects.csv').columns)
    assert 'calibration' in json.loads((tmp_path / 'p_metrics.json').read_text())
    r = agenb('export', run, '--format', 'torchscript', '--out', tmp_path / 'exp')
    assert r.returncode == 0, r.stderr
    from agenb.export import load_exported
    from agenb.predict import read_images
    from agenb.images import Preprocessing
    x = read_images(iv.path[:4], Preprocessing.from_dict(cfg['preprocessing']))[0].float().div(255).numpy()
    age, sd = load_exported(tmp_path / 'exp' / 'model.torchscript.pt', all_outputs=True)(x)
    np.testing.assert_allclose(age, iv.pred[:4], atol=1e-3)
    np.testing.assert_allclose(sd, iv.pred_sd[:4], atol=1e-3)
    card = json.loads((tmp_path / 'exp' / 'model_card.json').read_text())
    assert card['output']['second_output']['name'] == 'age_sd'


def test_timm_regression_run_predict_export_roundtrip(data_args, tmp_path):
    run = _train(data_args, tmp_path, '--arch', 'timm:test_resnet', '--gradcam-n', '1')
    cfg = _cfg(run)
    assert cfg['model']['architecture'] == 'timm:test_resnet' and cfg['model']['source'] == 'timm'
    preds = pd.read_csv(run / 'predictions.csv')
    r = agenb('predict', run, '--image-dir', Path(preds.path[0]).parent, '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / 'p.csv').set_index('path').loc[preds.path]
    np.testing.assert_allclose(p.pred.to_numpy(), preds.pred.to_numpy(), atol=1e-4)
    r = agenb('export', run, '--format', 'torchscript', '--out', tmp_path / 'exp')
    assert r.returncode == 0 and 'max |diff|' in r.stdout, r.stderr
    assert (run / 'gradcam_best_worst.png').is_file()
