"""Defects found by a review of the experiment tool (chapters 23-31), each with the test that failed before its fix."""
import shutil
from pathlib import Path

import openpyxl
import pytest
import yaml

from agenb.exp_spec import load_spec
from agenb.exp_store import local_data, read_table
from conftest import agenb

TINY = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 16, 'num_workers': 1,
        'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0, 'checkpoint_every': 0}


@pytest.fixture(scope='module')
def two_sheets(tmp_path_factory, synth_root):
    "The synthetic data with a second sheet, 'Shifted', whose ages are 30 years more than the first sheet's."
    root = tmp_path_factory.mktemp('sheets')
    shutil.copytree(synth_root / 'TA', root / 'TA')
    xl = root / 'TA' / 'characteristics.xlsx'
    wb = openpyxl.load_workbook(xl)
    ws = wb.copy_worksheet(wb[wb.sheetnames[0]]); ws.title = 'Shifted'
    ages = [i for i, h in enumerate(c.value for c in ws[2]) if h == 'Age']
    for row in ws.iter_rows(min_row=3):
        for i in ages:
            if isinstance(row[i].value, (int, float)): row[i].value += 30
    wb.save(xl)
    return root


def spec(path, root, data=None, **kw):
    s = {'name': 'sheets', 'data': {'image_dir': str(root / 'TA' / 'Healthy' / 'Images'),
                                    'excel_path': str(root / 'TA' / 'characteristics.xlsx'), **(data or {})},
         'base': dict(TINY), 'folds': 2, 'seeds': [1], 'bootstrap': 200, 'report': False, **kw}
    Path(path).write_text(yaml.safe_dump(s, sort_keys=False))
    return Path(path)


@pytest.mark.parametrize('where', ['base', 'grid'])
def test_sheet_is_a_data_option_not_a_variant(tmp_path, two_sheets, where):
    """A grid over `sheet` ranked variants scored against different tables of ages, while the protocol was made from the
    first sheet (the experiment read its table without the sheet). Now `sheet` goes under data: only."""
    kw = {'base': {**TINY, 'sheet': 'Shifted'}} if where == 'base' else {'grid': {'sheet': ['Blad1', 'Shifted']}}
    r = agenb('experiment', 'run', spec(tmp_path / 's.yaml', two_sheets, **kw), '--out', tmp_path / 'exp', timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'sheet is a data option: put it under data:' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'exp').exists()


def test_the_experiment_reads_the_sheet_of_its_data(tmp_path, two_sheets):
    "data: {sheet: ...} is accepted, and the table the protocol is made from holds that sheet's ages."
    first = read_table(local_data(load_spec(spec(tmp_path / 'a.yaml', two_sheets))))
    shifted = read_table(local_data(load_spec(spec(tmp_path / 'b.yaml', two_sheets, data={'sheet': 'Shifted'}))))
    a, b = first.groupby('subject').age.first(), shifted.groupby('subject').age.first()
    assert list(a.index) == list(b.index) and ((b - a - 30).abs() < 1e-9).all()


def test_artifacts_that_cannot_be_made_are_one_line_before_anything_runs(tmp_path, synth_root):
    "--artifacts under a file: refused at once (it was a worker's traceback after the first job had trained)."
    (tmp_path / 'file').write_text('x')
    s = spec(tmp_path / 's.yaml', synth_root, grid={'loss': ['mae']})
    r = agenb('experiment', 'run', s, '--out', tmp_path / 'exp', '--engine', 'cli', '--artifacts', tmp_path / 'file' / 'store', timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('agenb: error: --artifacts') and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'exp').exists()


@pytest.mark.slow   # one fold run
def test_a_worker_that_dies_fails_the_run(tmp_path, synth_root):
    """A worker that stops with an error (here: the artifact store became a file while its job trained) made `run` say
    'not complete ... 0 failed' and exit 0, its job left 'running' in the database. Now: exit 1, the worker named, the job failed."""
    import json, os, subprocess, sys
    from agenb.exp_db import ExpDB, default_url
    from conftest import ROOT
    store, out = tmp_path / 'store', tmp_path / 'exp'
    s = spec(tmp_path / 's.yaml', synth_root, grid={'loss': ['mae']})
    cmd = [sys.executable, '-m', 'agenb.experiment', 'run', str(s), '--out', str(out), '--engine', 'cli', '--artifacts', str(store)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    err = ''
    for line in p.stderr:
        err += line
        if '] start ' in line: break
    shutil.rmtree(store, ignore_errors=True); store.write_text('not a folder')       # the upload after the first job fails
    o, e = p.communicate(timeout=600)
    err += e
    assert p.returncode == 1, err[-3000:]
    assert 'agenb: error: worker 0 ended with exit code' in err
    recs = ExpDB(default_url(out), json.loads((out / 'experiment.json').read_text())['id']).jobs()
    assert recs and recs[0]['status'] == 'failed' and 'the worker stopped' in recs[0]['error']
    assert json.loads((out / 'experiment.json').read_text())['invocations'][-1]['status'] == 'failed workers'
