"""nbs/train.ipynb and nbs/report.ipynb: papermill parameters, skipped by nbdev_test, and a real tiny training run."""
import json, sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, run_cmd
from agenb.core import InputError
from agenb.options import OPTION_NAMES
from agenb.launch import run_training, demo_dataset

NBS = ROOT / 'nbs'


def parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(tagged) == 1, f'{path.name}: expected one cell tagged "parameters", found {len(tagged)}'
    return tagged[0]


def test_train_parameters_are_the_trainer_options():
    ns = {}
    exec(parameters_cell(NBS / 'train.ipynb').source, ns)
    names = [k for k in ns if not k.startswith('__')]
    assert names == OPTION_NAMES + ['nproc']
    assert {k: ns[k] for k in OPTION_NAMES} == dict.fromkeys(OPTION_NAMES) and ns['nproc'] == 1   # None: not given


def test_report_parameters():
    ns = {}
    exec(parameters_cell(NBS / 'report.ipynb').source, ns)
    assert [k for k in ns if not k.startswith('__')] == ['run_dir']


def test_nbdev_test_skips_the_front_end_notebooks():
    "nbdev_test would train a model: the notebooks carry `skip_exec: true` frontmatter."
    from nbdev.test import test_nb
    for name in ('train.ipynb', 'report.ipynb'):
        assert test_nb(NBS / name) == (True, 0), name


def test_nbdev_clean_keeps_the_parameters_tag():
    "nbdev_clean keeps only allowed cell metadata: settings.ini must allow `tags` or papermill loses its parameters cell."
    from nbdev.config import get_config
    from nbdev.clean import clean_nb
    keys = get_config(path=ROOT).get('allowed_cell_metadata_keys', '').split()
    for name in ('train.ipynb', 'report.ipynb'):
        nb = json.loads((NBS / name).read_text())
        clean_nb(nb, allowed_cell_metadata_keys=keys)
        tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
        assert tagged, f'nbdev_clean would strip the parameters tag of {name}: settings.ini needs allowed_cell_metadata_keys = tags'


def test_demo_dataset_is_reused_only_when_current(tmp_path):
    "Data the current generator wrote with the same parameters is used as it is; anything else is regenerated, saying why."
    msgs = []
    d = demo_dataset(tmp_path / 'demo', log=msgs.append, preset='test')
    assert Path(d['image_dir']).is_dir() and Path(d['excel_path']).is_file() and msgs[-1].startswith('generating')
    msgs.clear(); demo_dataset(tmp_path / 'demo', log=msgs.append, preset='test')
    assert len(msgs) == 1 and msgs[0].startswith('using')                      # reused, not generated again
    meta = json.loads((tmp_path / 'demo' / 'synth_meta.json').read_text())
    (tmp_path / 'demo' / 'synth_meta.json').write_text(json.dumps({**meta, 'version': 1}))   # written by an older generator
    msgs.clear(); demo_dataset(tmp_path / 'demo', log=msgs.append, preset='test')
    assert msgs[0].startswith('regenerating') and 'version' in msgs[0]


def test_train_notebook_with_papermill(data_args, tmp_path):
    out_dir, out_nb = tmp_path / 'runs', tmp_path / 'out.ipynb'
    params = dict(image_dir=data_args[1], excel_path=data_args[3], arch='resnet18', image_size=64, epochs=2,
                  batch_size=16, pretrained=False, num_workers=2, warmup_epochs=1, lr=1e-3, output_dir=str(out_dir),
                  run_name='nb')
    args = [a for k, v in params.items() for a in ('-p', k, str(v))]
    r = run_cmd([sys.executable, '-m', 'papermill', str(NBS / 'train.ipynb'), str(out_nb), *args, '--cwd', str(tmp_path)],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = out_dir.iterdir()
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'completed'
    assert cfg['source']['entry'] == 'notebook' and cfg['source']['script_name'] == 'nbs/train.ipynb'
    assert cfg['source']['notebook_parameters']['epochs'] == 2 and cfg['source']['notebook_parameters']['nproc'] == 1
    assert set(cfg['args_explicit']) == set(params)                  # what was given, not the loss recipe's values
    assert cfg['args']['lr'] == 1e-3 and cfg['args']['rotation'] == 10.0
    assert (run / 'report.html').is_file()
    text = json.dumps(nbformat.read(out_nb, as_version=4).cells)
    for s in ('Training', 'images per subject', 'epoch    2/2', 'Samples, subjects and ages per split', 'training curves',
              'Test MAE', str(run)):
        assert s in text, s


def test_ddp_launcher_reports_input_errors(tmp_path):
    "nproc > 1: torchrun in a subprocess; an input error on the ranks comes back as one InputError."
    lines = []
    with pytest.raises(InputError, match='nope'):
        run_training({'image_dir': str(tmp_path / 'nope'), 'excel_path': str(tmp_path / 'nope.xlsx'), 'device': 'cpu'}, 2,
                source={'entry': 'notebook'}, log=lines.append)
    assert lines[0].startswith('$ ') and '--nproc_per_node=2' in lines[0]


def test_papermill_engine_agenb_starts_kernels_without_the_tcp_warning(tmp_path):
    "`papermill --engine agenb` (make demo) talks to its kernel over IPC: no 'running over TCP without encryption'."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('print(6 * 7)')],
                                  metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nbformat.write(nb, tmp_path / 'in.ipynb')
    r = run_cmd([sys.executable, '-m', 'papermill', '--engine', 'agenb', str(tmp_path / 'in.ipynb'), str(tmp_path / 'out.ipynb')],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'without encryption' not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in.ipynb', 'out.ipynb']     # no socket files left behind
    assert nbformat.read(tmp_path / 'out.ipynb', as_version=4).cells[0].outputs[0]['text'] == '42\n'
