"""python -m agenb.export: the bundle reproduces the run's predictions, and its model card says everything."""
import importlib.util, json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import agenb
from agenb.core import file_sha256

HAS_ONNX = importlib.util.find_spec('onnx') is not None and importlib.util.find_spec('onnxruntime') is not None


@pytest.fixture(scope='module')
def bundle(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('bundle')
    r = agenb('export', tiny_run, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / 'model_card.json').read_text()), r


def _test_batch(tiny_run, card):
    "The run's test images prepared exactly as the card says, with PIL only (as a user without agenb would)."
    inp = card['input']
    assert inp['normalisation']['where'].startswith('inside the model')
    run = pd.read_csv(tiny_run / 'predictions.csv')
    resample = getattr(Image.Resampling, inp['preprocessing']['interpolation'].upper())
    x = np.stack([np.asarray(Image.open(p).convert('L').resize((inp['width'], inp['height']), resample),
                             dtype=np.float32)[None] / 255 for p in run.path])
    assert x.shape[1:] == tuple(inp['shape'][1:])
    return x, run.pred.to_numpy()


@pytest.mark.parametrize('fmt', ['torchscript', pytest.param('onnx', marks=pytest.mark.skipif(not HAS_ONNX, reason='onnx/onnxruntime not installed'))])
def test_exported_model_reproduces_predictions(tiny_run, bundle, fmt):
    from agenb.export import load_exported
    out, card, _ = bundle
    assert fmt in card['files']
    f = out / card['files'][fmt]['file']
    assert file_sha256(f) == card['files'][fmt]['sha256']
    x, want = _test_batch(tiny_run, card)
    got = load_exported(f)(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    v = card['verification'][fmt]
    assert v['checked'] and v['ok'] and v['max_abs_diff'] < 1e-4


def test_model_card_has_every_field(tiny_run, bundle):
    out, card, r = bundle
    cfg = json.loads((tiny_run / 'config.json').read_text())
    metrics = json.loads((tiny_run / 'metrics.json').read_text())
    split = pd.read_csv(tiny_run / 'split.csv', dtype={'subject': str})
    assert card['architecture']['arch'] == 'resnet18' and card['architecture']['dropout'] == cfg['args']['dropout']
    inp = card['input']
    assert (inp['channels'], inp['height'], inp['width'], inp['dtype'], inp['range']) == (1, 64, 64, 'float32', [0.0, 1.0])
    assert inp['normalisation']['mean'] == cfg['preprocessing']['mean'] and inp['normalisation']['std'] == cfg['preprocessing']['std']
    assert 'replicated' in inp['grey_to_rgb'] and inp['preprocessing'] == cfg['preprocessing']
    assert card['output']['unit'] == 'years' and card['output']['shape'] == ['batch']
    td = card['training_data']['splits']
    for s in ('train', 'val', 'test'):
        part = split[split.split == s]
        assert td[s]['subjects'] == part.subject.nunique() and td[s]['images'] == len(part)
        assert td[s]['age_min'] == part.age.min() and td[s]['age_max'] == part.age.max()
    tm = card['test_metrics']
    for k, src in (('raw', 'overall'), ('subject_level', 'subject_level'), ('corrected', 'corrected')):
        assert tm[k] == metrics[src], k
    assert card['bias_correction'] == metrics['bias_correction']
    assert card['versions']['torch'] and card['versions']['agenb']
    src = card['source_run']
    assert src['checkpoint_sha256'] == file_sha256(tiny_run / 'best_model.pth') and src['run_name'] == tiny_run.name
    readme = (out / 'README.md').read_text()
    assert 'years' in readme and card['files']['torchscript']['file'] in readme and 'MAE' in readme
    assert 'max |diff|' in r.stdout


def test_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    from agenb.core import run_cli
    from agenb.export import main   # in-process (torch is loaded already); run_cli is what python -m uses
    for argv in ([str(tmp_path / 'nope')], [str(tiny_run), '--out', str(tmp_path / 'b'), '--checkpoint', 'missing.pth']):
        with pytest.raises(SystemExit) as e: run_cli(main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('agenb: error:') and err.count('\n') == 1, err
        assert ('nope' if 'nope' in argv[0] else 'missing.pth') in err


def test_another_checkpoint_is_verified_against_its_own_weights(tiny_run, tmp_path):
    """`--checkpoint last.pth` (weights other than the best model's, which wrote predictions.csv) is verified against
    its own PyTorch model, passes, and its card carries neither the best model's test metrics nor its bias correction."""
    import shutil, torch
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns('export', 'explanations', 'evaluations'))
    ck = torch.load(run / 'last.pth', weights_only=True)
    ck['model']['fc.1.bias'] = ck['model']['fc.1.bias'] + 1.0   # surely not the best model's weights: 1 year older
    torch.save(ck, run / 'last.pth')
    r = agenb('export', run, '--checkpoint', 'last.pth', '--out', tmp_path / 'b')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'above tolerance' not in r.stdout, r.stdout
    card = json.loads((tmp_path / 'b' / 'model_card.json').read_text())
    v = card['verification']
    assert v['against'].startswith('the PyTorch model of last.pth')
    for fmt in card['files']: assert v[fmt]['checked'] and v[fmt]['ok'] and v[fmt]['max_abs_diff'] < 1e-4
    assert card['test_metrics']['raw'] is None and 'best_model.pth' in card['test_metrics']['note']
    assert not (card['bias_correction'] or {}).get('applied')
    # the best model is still checked against predictions.csv
    r = agenb('export', run, '--out', tmp_path / 'best')
    assert r.returncode == 0 and 'above tolerance' not in r.stdout
    assert json.loads((tmp_path / 'best' / 'model_card.json').read_text())['verification']['against'].startswith('predictions.csv')
