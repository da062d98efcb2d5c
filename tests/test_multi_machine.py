"""Experiments across machines: a throw-away PostgreSQL server, two "machines" (two folders, one URL) finishing one
experiment with every job trained once, a machine killed with kill -9 whose job another takes over, a corrupted run
that is set aside and trained again; and, on SQLite, the hung-trainer timeout and the resume checks (agenb version,
data content, --allow-changed-data)."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from agenb.exp_db import ExpDB, default_url
from conftest import ROOT, agenb
from pgserver import new_database, pg_binaries, postgres_server

TINY = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 16, 'num_workers': 1,
        'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0, 'checkpoint_every': 0}


@pytest.fixture(scope='module')
def pg_url():
    "A PostgreSQL server of this module's own (tests/pgserver.py); skips, saying why, on a machine without the binaries."
    if pg_binaries() is None:
        pytest.skip('no PostgreSQL server binaries (initdb, pg_ctl) on this machine: the multi-machine tests need them')
    with postgres_server() as url: yield url


_n = [0]
@pytest.fixture
def db_url(pg_url):
    "A fresh database on the server for each test."
    _n[0] += 1
    return new_database(pg_url, f't{os.getpid()}_{_n[0]}')


def write_spec(path, synth_root, **kw):
    spec = {'name': 'multi', 'data': {'image_dir': str(synth_root / 'TA' / 'Healthy' / 'Images'),
                                      'excel_path': str(synth_root / 'TA' / 'characteristics.xlsx')},
            'base': dict(TINY), 'grid': {'loss': ['mae', 'mse']}, 'baseline': 'loss=mae', 'folds': 2, 'seeds': [1],
            'test_size': 0.2, 'split_seed': 42, 'bootstrap': 200, 'report': False, **kw}
    Path(path).write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
    return Path(path)


def start(*args, **kw):
    "A machine: `python -m agenb.experiment ARGS` in a process group of its own (kill -9 kills it all)."
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **kw.pop('env', {}))
    return subprocess.Popen([sys.executable, '-m', 'agenb.experiment', *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def records(url, folder):
    return ExpDB(url, json.loads((Path(folder) / 'experiment.json').read_text())['id']).jobs()


def board(folder):
    return pd.read_csv(Path(folder) / 'leaderboard.csv').drop(columns=['status'], errors='ignore')


def test_two_machines_one_database(tmp_path, synth_root, db_url):
    "Two folders, one URL, started together: every job trained once in all; both folders and a laptop report the same board."
    spec, store = write_spec(tmp_path / 'spec.yaml', synth_root), tmp_path / 'store'
    a, b = tmp_path / 'machine_a', tmp_path / 'machine_b'
    pa, pb = (start('run', spec, '--out', d, '--storage', db_url, '--engine', 'cli', '--artifacts', store) for d in (a, b))
    ra, rb = finish(pa), finish(pb)
    assert ra.returncode == 0 and rb.returncode == 0, ra.stderr[-2000:] + rb.stderr[-2000:]
    recs = records(db_url, a)
    assert len(recs) == 4 and all(r['status'] == 'completed' for r in recs)
    assert all(len(r['attempts']) == 1 for r in recs), [len(r['attempts']) for r in recs]       # each trained once, in all
    folders = {r['machine']['folder'] for r in recs}
    assert folders <= {str(a.resolve()), str(b.resolve())}
    for r in recs: assert (Path(r['machine']['folder']) / r['run_dir'] / 'predictions.csv').is_file()
    assert json.loads((a / 'experiment.json').read_text())['id'] == json.loads((b / 'experiment.json').read_text())['id']
    for d in (a, b): assert agenb('experiment', 'report', d, '--storage', db_url).returncode == 0
    laptop = agenb('experiment', 'report', 'multi', '--storage', db_url, '--out', tmp_path / 'laptop')   # only the database
    assert laptop.returncode == 0, laptop.stderr
    pd.testing.assert_frame_equal(board(a), board(b)); pd.testing.assert_frame_equal(board(a), board(tmp_path / 'laptop'))
    assert len(board(a)) == 2 and board(a)['subject_mae'].notna().all()
    st = agenb('experiment', 'status', 'multi', '--storage', db_url, '--out', tmp_path / 'laptop')
    assert st.returncode == 0 and 'fold runs: 4 of 4 done' in st.stdout and 'working on it now: nobody' in st.stdout
    # fold models across machines: with machine A's folder gone, B gets them from the artifact store, or says which are missing
    shutil.move(a, tmp_path / 'a_gone')
    imgs = tmp_path / 'new_images'; imgs.mkdir()
    split = pd.read_csv(b / 'splits' / 'final.csv', dtype={'subject': str})
    for p in split.path[split.split == 'train'][:4]: shutil.copy(p, imgs / Path(p).name)
    from_a = [r for r in recs if r['machine']['folder'] == str(a.resolve()) and r['variant'] == 'loss=mae']
    out = tmp_path / 'pred' / 'p.csv'
    r = agenb('experiment', 'predict', b, '--variant', 'loss=mae', '--image-dir', imgs, '--out', out, '--storage', db_url)
    if from_a:
        assert r.returncode == 2 and f'the model of job {from_a[0]["key"]}' in r.stderr and 'give --artifacts' in r.stderr, r.stderr
    r = agenb('experiment', 'predict', b, '--variant', 'loss=mae', '--image-dir', imgs, '--out', out, '--storage', db_url,
              '--artifacts', store)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(out)) == 4 and (pd.read_csv(out)['n_models'] == 2).all()


def test_killed_machine_job_is_taken_over(tmp_path, synth_root, db_url):
    "Machine A killed with kill -9 in its first job: after the lease, machine B takes the job over and finishes everything."
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'loss': ['mae']}, base={**TINY, 'epochs': 3})
    pa = start('run', spec, '--out', tmp_path / 'a', '--storage', db_url, '--engine', 'cli', '--lease', '6')
    for line in pa.stderr:
        if '] start ' in line: break
    deadline = time.time() + 60                                 # its attempt is recorded: a job is running on A
    while time.time() < deadline and not any(r['attempts'] for r in records(db_url, tmp_path / 'a')): time.sleep(0.5)
    os.killpg(pa.pid, signal.SIGKILL); pa.wait(); pa.stderr.close(); pa.stdout.close()
    rb = finish(start('run', spec, '--out', tmp_path / 'b', '--storage', db_url, '--engine', 'cli', '--lease', '6'))
    assert rb.returncode == 0, rb.stderr[-3000:]
    recs = records(db_url, tmp_path / 'b')
    assert len(recs) == 2 and all(r['status'] == 'completed' for r in recs)
    taken = [r for r in recs if any('took_over_from' in x for x in r['attempts'])]
    assert len(taken) == 1 and taken[0]['attempts'][0]['folder'] == str((tmp_path / 'a').resolve())
    assert taken[0]['attempts'][-1]['folder'] == str((tmp_path / 'b').resolve()) and 'took_over_from' in taken[0]['attempts'][-1]
    st = agenb('experiment', 'status', tmp_path / 'b', '--storage', db_url)
    assert 'ended without a word (killed)' in st.stdout and 'fold runs: 2 of 2 done' in st.stdout, st.stdout


# About 85 s of four job trainings on 2 cores: `make test-all` runs it, `make test` does not. The set-aside itself is
# tested in chapter 28 (exp_worker) and a machine killed with kill -9 on PostgreSQL above.
@pytest.mark.slow
def test_corrupted_run_is_set_aside_and_trained_again(tmp_path, synth_root, db_url):
    """A machine killed after its first finished job, whose record was then lost and whose split.csv was edited: the next
    run sets the run folder aside (kept, named in the job's log) and trains the job again; no internal error."""
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'loss': ['mae']})
    out = tmp_path / 'exp'
    p = start('run', spec, '--out', out, '--storage', db_url, '--engine', 'cli')
    for line in p.stderr:
        if '] done ' in line: break
    os.killpg(p.pid, signal.SIGKILL); p.wait(); p.stderr.close(); p.stdout.close()
    db = ExpDB(db_url, json.loads((out / 'experiment.json').read_text())['id'])
    rec = next(r for r in db.jobs() if r['status'] == 'completed')
    run = out / rec['run_dir']
    split = pd.read_csv(run / 'split.csv', dtype={'subject': str})
    split.loc[split.split == 'train', 'split'] = 'val'; split.to_csv(run / 'split.csv', index=False)
    db.put_job({**rec, 'status': 'running'})                     # as if the machine died before it recorded the run
    time.sleep(1)
    r = finish(start('run', spec, '--out', out, '--storage', db_url, '--engine', 'cli', '--lease', '5'))
    assert r.returncode == 0, r.stderr[-3000:]
    new = db.job(rec['key'])
    assert new['status'] == 'completed' and len(new['attempts']) == 2 and new['run_dir'] != rec['run_dir']
    aside = Path(new['set_aside'][0]['run_dir'])
    assert aside.is_dir() and aside.parent.name == 'set_aside' and not run.exists()
    assert 'set aside to' in (out / 'runs' / rec['key'] / 'job.log').read_text()
    assert all(r['status'] == 'completed' for r in db.jobs())


def test_hung_trainer_is_stopped(tmp_path, synth_root):
    "A job past the spec's job_timeout is stopped: failed with a line saying so, the invocation ended (not 'running')."
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'loss': ['mae']}, folds=2, job_timeout=0.05,
                      base={**TINY, 'epochs': 200})
    out = tmp_path / 'exp'
    r = finish(start('run', spec, '--out', out, '--engine', 'cli'), timeout=300)
    assert r.returncode == 1 and "job_timeout of 0.05 min" in r.stderr, r.stderr[-2000:]
    e = json.loads((out / 'experiment.json').read_text())
    assert [x['status'] for x in e['invocations']] == ['failed jobs']
    assert {r['status'] for r in records(default_url(out), out)} == {'failed'}


def test_resume_checks_version_and_data(tmp_path, synth_root):
    """run refuses a changed agenb version, changed data or a weights file replaced under its path with one line, unless
    --allow-changed-data (recorded)."""
    data = tmp_path / 'data'; shutil.copytree(synth_root / 'TA', data / 'TA')
    weights = tmp_path / 'r18.pth'; torch.manual_seed(0); torch.save(torchvision.models.resnet18().state_dict(), weights)
    spec = write_spec(tmp_path / 'spec.yaml', data, grid={'loss': ['mae']},
                      base={**TINY, 'epochs': 1, 'weights': str(weights)}, folds=2)
    out = tmp_path / 'exp'
    assert agenb('experiment', 'run', spec, '--out', out, '--engine', 'cli').returncode == 0
    db = ExpDB(default_url(out), json.loads((out / 'experiment.json').read_text())['id'])
    sha = db.read()['data_fingerprint']['files'][str(weights)]
    kept = weights.read_bytes(); torch.save(torchvision.models.resnet18().state_dict(), weights)   # other weights, same path
    r = agenb('experiment', 'run', spec, '--out', out, '--engine', 'cli')
    assert r.returncode == 2 and f'the file {weights} (content {sha[:12]} -> ' in r.stderr and '--allow-changed-data' in r.stderr, r.stderr
    weights.write_bytes(kept)
    db.update(lambda e: e.update(agenb_version='0.1.0'))
    r = agenb('experiment', 'run', spec, '--out', out, '--engine', 'cli')
    assert r.returncode == 2 and 'agenb 0.1.0 -> ' in r.stderr and '--allow-changed-data' in r.stderr
    assert [l for l in r.stderr.splitlines() if 'error' in l] == [r.stderr.strip().splitlines()[-1]] and 'Traceback' not in r.stderr
    imgs = tmp_path / 'new'; imgs.mkdir()
    split = pd.read_csv(out / 'splits' / 'final.csv', dtype={'subject': str})
    shutil.copy(split.path[split.split == 'train'].iloc[0], imgs)
    args = ('experiment', 'predict', out, '--variant', 'loss=mae', '--image-dir', imgs, '--out', tmp_path / 'p' / 'p.csv')
    r = agenb(*args)                                                         # predict checks too
    assert r.returncode == 2 and 'agenb 0.1.0 -> ' in r.stderr, r.stderr
    assert agenb(*args, '--allow-changed-data').returncode == 0
    assert db.read()['test_openings'] == []                                   # not a test image: nothing opened
    img = sorted((data / 'TA' / 'Healthy' / 'Images').glob('*.png'))[0]
    Image.open(img).convert('L').point(lambda v: 255 - v).save(img)          # one image's content changed
    r = agenb('experiment', 'run', spec, '--out', out, '--engine', 'cli')
    assert r.returncode == 2 and 'the data (images' in r.stderr, r.stderr
    r = agenb('experiment', 'run', spec, '--out', out, '--engine', 'cli', '--allow-changed-data')
    assert r.returncode == 0, r.stderr[-2000:]
    e = db.read()
    assert len(e['allowed_changes']) == 1 and len(e['allowed_changes'][0]['changes']) == 2
    assert e['invocations'][-1]['allowed_changes'] == e['allowed_changes'][0]['changes']
    # the same spec and the changed data in a new folder: not a new experiment made silently
    r = agenb('experiment', 'run', spec, '--out', tmp_path / 'other', '--engine', 'cli', '--storage', default_url(out))
    assert r.returncode == 2
