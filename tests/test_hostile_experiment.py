"""Hostile experiment specs, folders and storages (issue 29): each ends in exit code 2 and one line naming the file,
key, option or folder, with no traceback, and leaves every file as it was (no half-made experiment folder); or,
where the input is valid, it works. Then a property: any spec, however broken, is read or refused in one line.
Most cases need no training; those that read an experiment share one tiny finished experiment (copied per test)."""
import asyncio, hashlib, json, os, shutil, socket, sqlite3, tempfile, threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from agenb.core import InputError
from agenb.exp_db import ExpDB, default_url
from agenb.exp_spec import DISTRIBUTIONS, PRUNERS, load_spec, read_spec_yaml, check_spec, trainer_options
from conftest import agenb

TINY = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 16, 'num_workers': 1,
        'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0, 'checkpoint_every': 0}
PROGRESS = ('reading the data:',)   # what `run` may say before it refuses (it says which data it reads first)


def spec_dict(synth_root, **kw):
    s = {'name': 'hostile', 'data': {'image_dir': str(synth_root / 'TA' / 'Healthy' / 'Images'),
                                     'excel_path': str(synth_root / 'TA' / 'characteristics.xlsx')},
         'base': dict(TINY), 'grid': {'loss': ['mae']}, 'folds': 2, 'seeds': [1], 'test_size': 0.2, 'split_seed': 42,
         'bootstrap': 200, 'report': False, **kw}
    return {k: v for k, v in s.items() if v is not None}


def write_spec(path, synth_root, text=None, **kw):
    Path(path).write_text(text if text is not None else yaml.safe_dump(spec_dict(synth_root, **kw), sort_keys=False))
    return Path(path)


def tree(root):
    "{relative path: sha256 of the file, or 'dir'} of everything under `root`: the state a refusal must not change."
    root, out = Path(root), {}
    for p in sorted(root.rglob('*')):
        out[str(p.relative_to(root))] = 'dir' if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(r, *needles):
    "Exit 2; one error line, the last, naming every needle; nothing else but progress; no traceback."
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('agenb: error:'), r.stderr
    assert all(l.startswith(PROGRESS) for l in lines[:-1]), r.stderr
    assert 'Traceback' not in r.stderr + r.stdout and 'internal error' not in r.stderr
    for n in needles: assert n in lines[-1], (n, lines[-1])


def experiment(*args, **kw):
    return agenb('experiment', *map(str, args), **kw)


# ---- the spec: refused before anything is made ----------------------------------------------------------------

def refuse_spec(tmp_path, spec, *needles, **kw):
    before = tree(tmp_path)
    r = experiment('run', spec, '--out', tmp_path / 'exp', '--engine', 'cli', **kw)
    assert_refused(r, *needles)
    assert tree(tmp_path) == before and not (tmp_path / 'exp').exists()
    return r


def test_alias_bomb_is_refused_unexpanded(tmp_path, synth_root):
    "A few hundred bytes of nested aliases would expand into gigabytes (also in an error message's repr): counted, never expanded."
    ok = yaml.safe_dump(spec_dict(synth_root), sort_keys=False)
    bomb = ['description:', '  - &a0 [x, x, x, x, x, x, x, x, x]']
    bomb += [f'  - &a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']' for i in range(1, 9)]    # 9**9 x's from ~700 bytes
    text = '\n'.join(bomb) + '\n' + ok.replace('seeds:\n- 1\n', 'seeds: *a8\n')
    assert 'seeds: *a8' in text
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, text)
    refuse_spec(tmp_path, spec, str(spec), 'expands to more than 100000 values')


def test_huge_grid_is_refused_before_it_is_built(tmp_path, synth_root):
    "10^6 grid points: refused from the product of the list lengths, not after building (and name-checking) them all."
    n = list(range(1, 101))
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'epochs': n, 'batch_size': n, 'image_size': n})
    refuse_spec(tmp_path, spec, 'grid', '1000000 variants', 'more than 1000')


def test_duplicate_keys_are_refused(tmp_path, synth_root):
    "Two grid: keys: YAML would keep the second and drop the first without a word."
    text = yaml.safe_dump(spec_dict(synth_root), sort_keys=False) + 'grid: {loss: [mse]}\n'
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, text)
    refuse_spec(tmp_path, spec, str(spec), "the key 'grid' is given twice (also at line")


@pytest.mark.parametrize('patch,key', [
    ({'seeds': [1, 2 ** 32]}, 'seeds'), ({'seeds': [-1]}, 'seeds'), ({'split_seed': 99999999999}, 'split_seed'),
    ({'search': {'trials': 3, 'seed': 2 ** 32 - 2, 'space': {'lr': {'log_uniform': [1e-4, 1e-2]}}}}, 'search.seed'),
])
def test_seeds_out_of_range_are_refused(tmp_path, synth_root, patch, key):
    "numpy seeds are 0 .. 2**32 - 1 (the i-th search trial's sampler takes seed + i): refused when read, nothing made."
    refuse_spec(tmp_path, write_spec(tmp_path / 'spec.yaml', synth_root, **patch), f'{key}: must be a whole number from 0 to')


def test_bootstrap_count_is_bounded(tmp_path, synth_root):
    "10^9 resamples would train every fold run, then run out of memory in the leaderboard."
    refuse_spec(tmp_path, write_spec(tmp_path / 'spec.yaml', synth_root, bootstrap=10 ** 9), 'bootstrap', 'from 100 to 100000')


def test_missing_weights_are_refused(tmp_path, synth_root):
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'weights': ['no/such/r18.pth']})
    refuse_spec(tmp_path, spec, str(spec), 'variant weights=no/such/r18.pth', '--weights no/such/r18.pth: file not found')


def test_relative_weights_reach_every_job_as_an_absolute_path(tmp_path, synth_root):
    """A relative weights: path is resolved where `run` starts (like data:), recorded in the folder's experiment.json,
    and every job (which runs in a folder of its own) gets the absolute path, whatever folder the worker is in."""
    from agenb.exp_worker import job_options
    from agenb.exp_store import local_data
    (tmp_path / 'w').mkdir(); (tmp_path / 'w' / 'r18.pth').write_bytes(b'weights')
    spec_path = write_spec(tmp_path / 'spec.yaml', synth_root, base={**TINY, 'weights': 'w/r18.pth'})
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        spec = load_spec(spec_path)
        data = local_data(spec)
        os.chdir(tempfile.gettempdir())                              # a job's own working folder
        job = SimpleNamespace(key='k', variant='loss=mae', options={'loss': 'mae'}, seed=1, fold=1, final=False,
                              dir=tmp_path / 'exp' / 'runs' / 'k', split_file=tmp_path / 'exp' / 'splits' / 'fold_1.csv')
        g = job_options(tmp_path / 'exp', {'name': 'hostile', 'id': 'x', 'data': data}, spec, job)
    finally: os.chdir(old)
    assert spec['base']['weights'] == 'w/r18.pth'                     # the spec (and its identity) keeps what was written
    assert g['weights'] == str(tmp_path / 'w' / 'r18.pth') and Path(g['weights']).is_file() and 'paths' not in g


def test_covariate_that_is_not_a_column_is_refused_before_the_experiment_exists(tmp_path, synth_root):
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, grid={'covariates': ['sex', 'grip']})
    refuse_spec(tmp_path, spec, str(spec), 'variant covariates=grip', "no covariate column 'grip'")


# ---- a property: any spec is read, or refused in one line ----------------------------------------------------

TYPES = trainer_options()
OPTS = sorted(TYPES)
GOOD = {'loss': ['mae', 'mse', 'huber', 'l2'], 'arch': ['resnet18', 'resnet8'], 'covariates': ['sex', 'bmi,sex', 'age', 'sex,,bmi'],
        'weights': ['/nonexistent/w.pth'], 'scheduler': ['cosine', 'onecycle', 'none'], 'head': ['regression', 'distribution']}
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=10), st.sampled_from(['mae', '1e-4', 'x' * 300, 'search-1', 'a/b', 'loss=mae', '', '2020-01-01']))
junk = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(OPTS)),
                                                                                       c, max_size=3)), max_leaves=8)


def mostly(good):
    "`good` five times in six, else anything at all."
    return st.integers(0, 5).flatmap(lambda i: junk if i == 0 else good)


def value(name):
    t = TYPES.get(name)
    return mostly(st.sampled_from(GOOD[name]) if name in GOOD else st.booleans() if t is bool else st.integers(-1, 40) if t is int
                  else st.floats(-0.5, 2.0) if t is float else st.text(max_size=6))


options = st.lists(st.sampled_from(OPTS + ['seed', 'image_dir', 'nope']), max_size=3).flatmap(
    lambda ks: st.fixed_dictionaries({k: value(k) for k in ks}))
grid = st.lists(st.sampled_from(['loss', 'lr', 'dropout', 'epochs', 'covariates', 'weights']), min_size=1, max_size=2).flatmap(
    lambda ks: st.fixed_dictionaries({k: mostly(st.lists(value(k), min_size=1, max_size=3)) for k in ks}))
variant = options.flatmap(lambda d: mostly(st.fixed_dictionaries({'name': mostly(st.sampled_from(['a', 'b', 'search-x', 'a/b'])),
                                                                   **{k: st.just(v) for k, v in d.items()}})))
dist = st.sampled_from(DISTRIBUTIONS + ('normal',)).flatmap(lambda k: mostly(st.fixed_dictionaries(
    {k: mostly(st.lists(mostly(st.floats(-1, 3) | st.sampled_from(['mae', 'huber', 1, 4])), max_size=3))})))
space = st.lists(st.sampled_from(['lr', 'dropout', 'loss', 'epochs', 'weights']), min_size=1, max_size=3).flatmap(
    lambda ks: st.fixed_dictionaries({k: dist for k in ks}))
pruner = mostly(st.one_of(st.sampled_from(list(PRUNERS) + ['medain']),
                          st.fixed_dictionaries({'median': mostly(st.fixed_dictionaries({}, optional={'n_startup_trials': mostly(st.integers(-1, 5))}))}),
                          st.fixed_dictionaries({'threshold': mostly(st.fixed_dictionaries({}, optional={'upper': mostly(st.floats(0, 10))}))})))
search = mostly(st.fixed_dictionaries({'trials': mostly(st.integers(-1, 200_000)), 'space': mostly(space)},
                                      optional={'pruner': pruner, 'seed': mostly(st.integers(-1, 2 ** 33)), 'startup_trials': mostly(st.integers(-1, 20))}))
spec_strategy = st.fixed_dictionaries(
    {'name': mostly(st.sampled_from(['x', 'a.b-1'])), 'data': mostly(st.just({'image_dir': 'i', 'excel_path': 'e'}))},
    optional={'description': mostly(st.text(max_size=20)), 'base': mostly(options), 'grid': mostly(grid),
              'variants': mostly(st.lists(variant, max_size=3)), 'baseline': mostly(st.sampled_from(['a', 'loss=mae', 'base'])),
              'folds': mostly(st.integers(-2, 2000)), 'seeds': mostly(st.lists(st.integers(-2, 2 ** 33), max_size=3)),
              'test_size': mostly(st.floats(0, 1)), 'val_size': mostly(st.floats(0, 1)), 'split_seed': mostly(st.integers(-1, 2 ** 33)),
              'stratify': mostly(st.booleans()), 'bin_width': mostly(st.floats(-1, 1e6)), 'search': search,
              'bootstrap': mostly(st.integers(0, 10 ** 10)), 'report': mostly(st.booleans()), 'job_timeout': mostly(st.floats(-1, 20000)),
              'grdi': junk})
PROPS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _spec_or_one_line(read):
    "`read()` gives a checked spec or an InputError (made one line by the command line); never another exception."
    try: s = read()
    except InputError as e:
        assert str(e).strip() and len(str(e)) < 3000
        return None
    assert isinstance(s, dict) and (s['static'] or s['search']) and len(s['static']) <= 1000
    return s


@PROPS
@given(raw=spec_strategy)
def test_any_spec_is_checked_or_refused_in_one_line(raw):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / 'spec.yaml'
        p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding='utf-8')
        _spec_or_one_line(lambda: load_spec(p))


@PROPS
@given(text=st.text(alphabet='{}[]:,&*!|>-#\'"\n ab1.<%?@`~\\', max_size=120))
def test_any_yaml_text_is_checked_or_refused_in_one_line(text):
    _spec_or_one_line(lambda: check_spec(read_spec_yaml('name: x\n' + text)))


# ---- folders and storage --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def finished(tmp_path_factory, synth_root):
    "One tiny finished experiment (1 variant x 1 seed x 2 folds), read by the tests below through copies."
    d = tmp_path_factory.mktemp('hostile_exp')
    r = experiment('run', write_spec(d / 'spec.yaml', synth_root), '--out', d / 'exp', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / 'exp' / 'leaderboard.csv').is_file() and (d / 'exp' / 'oof_predictions.csv').is_file()
    return d / 'exp'


def copy_exp(finished, tmp_path):
    "A copy of the finished experiment without its model files (nothing below reads them)."
    return Path(shutil.copytree(finished, tmp_path / 'exp', ignore=shutil.ignore_patterns('*.pth')))


def exp_id(exp): return json.loads((exp / 'experiment.json').read_text())['id']


def test_out_at_a_run_folder_is_refused_before_anything_is_written(tmp_path, synth_root, finished):
    exp = copy_exp(finished, tmp_path)
    run, spec = next((exp / 'runs').glob('*/run_*')), write_spec(tmp_path / 'spec.yaml', synth_root)
    before = tree(tmp_path)
    assert_refused(experiment('run', spec, '--out', run, '--engine', 'cli'), f'--out {run} is a run folder')
    assert tree(tmp_path) == before


@pytest.mark.parametrize('url,msg', [
    ('nope://x', 'cannot open the storage nope://x'), ('sqlite://', 'is an in-memory database'),
    ('sqlite:////nonexistent/dir/x.db', 'cannot reach the storage sqlite:////nonexistent/dir/x.db'),
    ('postgresql+psycopg2://u:secret@127.0.0.1:1/db', 'cannot reach the storage postgresql+psycopg2://u:***@127.0.0.1:1/db'),
])
def test_bad_storage_is_refused_before_anything_is_made(tmp_path, synth_root, url, msg):
    if 'psycopg2' in url: pytest.importorskip('psycopg2')
    spec = write_spec(tmp_path / 'spec.yaml', synth_root)
    before = tree(tmp_path)
    r = experiment('run', spec, '--out', tmp_path / 'exp', '--engine', 'cli', '--storage', url)
    assert_refused(r, msg)
    assert 'secret' not in r.stderr and tree(tmp_path) == before and not (tmp_path / 'exp').exists()


@pytest.fixture
def silent_server():
    "A TCP server that accepts every connection and never answers: the port."
    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16)
    held, stop = [], threading.Event()
    def serve():
        s.settimeout(0.2)
        while not stop.is_set():
            try: held.append(s.accept()[0])
            except OSError: pass
    t = threading.Thread(target=serve, daemon=True); t.start()
    yield s.getsockname()[1]
    stop.set(); t.join(5)
    for c in held: c.close()
    s.close()


def test_storage_that_never_answers_ends_in_one_line(tmp_path, synth_root, silent_server):
    """A server that accepts the connection and never answers: the connect timeout ends the command (a new process,
    with a wall-clock limit, so that a hang fails this test instead of stalling the suite)."""
    pytest.importorskip('psycopg2')
    url = f'postgresql+psycopg2://agenb@127.0.0.1:{silent_server}/db'
    spec = write_spec(tmp_path / 'spec.yaml', synth_root)
    before = tree(tmp_path)
    r = experiment('run', spec, '--out', tmp_path / 'exp', '--storage', url, '--engine', 'cli', proc=True, timeout=120,
                   env={'PGCONNECT_TIMEOUT': '2'})
    assert_refused(r, f'cannot reach the storage {url}', 'timeout')
    assert tree(tmp_path) == before and not (tmp_path / 'exp').exists()


@pytest.mark.parametrize('name', ['oof_predictions.csv', 'leaderboard.csv', 'splits/final.csv', 'new.csv', 'runs/p.csv'])
def test_predict_does_not_write_into_an_experiment(tmp_path, finished, name):
    exp = copy_exp(finished, tmp_path)
    (tmp_path / 'img').mkdir()
    before = tree(tmp_path)
    r = experiment('predict', exp, '--variant', 'loss=mae', '--image-dir', tmp_path / 'img', '--out', exp / name)
    assert_refused(r, f'--out {exp / name} is in the experiment folder {exp}', 'not overwritten')
    assert tree(tmp_path) == before


@pytest.mark.parametrize('record,msg', [
    ([1, 2], 'holds a JSON list, not an object'), ('x', 'holds a JSON str'), ({'format': 2, 'id': 5}, "its 'id' is int"),
    ('DATA', "its 'data' is int"), ('STORAGE', "its 'storage' is list"),
])
@pytest.mark.parametrize('verb', ['status', 'report'])
def test_experiment_json_of_the_wrong_shape(tmp_path, finished, record, msg, verb):
    exp = copy_exp(finished, tmp_path)
    good = json.loads((exp / 'experiment.json').read_text())
    record = {**good, 'data': 3} if record == 'DATA' else {**good, 'storage': []} if record == 'STORAGE' else record
    (exp / 'experiment.json').write_text(json.dumps(record))
    before = tree(tmp_path)
    assert_refused(experiment(verb, exp), str(exp / 'experiment.json'), msg)
    assert tree(tmp_path) == before


def drop_trials(exp):
    "The study's trials gone (the experiment's own rows kept): what an emptied or replaced study leaves."
    with sqlite3.connect(exp / 'study.db') as c:
        for t in ('trial_params', 'trial_values', 'trial_intermediate_values', 'trial_user_attributes',
                  'trial_system_attributes', 'trial_heartbeats', 'trials'):
            c.execute(f'DELETE FROM {t}')


@pytest.mark.parametrize('damage,msg', [
    ('trials', 'has lost 1 variant(s) that'), ('jobs', '2 of its 2 fold runs are no longer recorded done'),
    ('empty', 'holds no record of experiment'), ('missing', 'study.db is missing'),
])
def test_emptied_study_is_an_error_and_the_leaderboard_is_kept(tmp_path, finished, damage, msg):
    exp = copy_exp(finished, tmp_path)
    if damage in ('trials', 'jobs'): drop_trials(exp)
    if damage == 'jobs':
        with sqlite3.connect(exp / 'study.db') as c: c.execute('DELETE FROM agenb_jobs')
    if damage == 'empty': (exp / 'study.db').write_bytes(b'')
    if damage == 'missing': (exp / 'study.db').unlink()
    before = tree(tmp_path)
    for verb in ('status', 'report'):
        assert_refused(experiment(verb, exp), msg, *(('loss=mae', 'leaderboard.csv is kept') if damage in ('trials', 'jobs') else ()))
        assert tree(tmp_path) == before                                   # leaderboard.csv (and all else) as it was


def test_truncated_predictions_csv_changes_nothing_in_the_report(tmp_path, finished):
    """`report` reads each job's out-of-fold predictions from the database, where the job put them when its run passed
    the protocol check: a run's predictions.csv truncated since changes no number (and the report's kernel leaves no
    stray KeyboardInterrupt line on stderr: a new process, whose stderr holds the kernel's too)."""
    exp = copy_exp(finished, tmp_path)
    p = next((exp / 'runs').glob('*_f1/run_*/predictions.csv'))
    p.write_text(p.read_text().splitlines()[0] + '\n')
    board, oof = (exp / 'leaderboard.csv').read_bytes(), (exp / 'oof_predictions.csv').read_bytes()
    r = experiment('report', exp, proc=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(w in r.stderr for w in ('KeyboardInterrupt', 'ERROR', 'Traceback')) and (exp / 'report.html').is_file(), r.stderr
    assert (exp / 'leaderboard.csv').read_bytes() == board and (exp / 'oof_predictions.csv').read_bytes() == oof


def test_damaged_predictions_in_the_database_name_the_job(tmp_path, finished):
    exp = copy_exp(finished, tmp_path)
    db = ExpDB(default_url(exp), exp_id(exp))
    rec = next(r for r in db.jobs() if r['fold'] == 1)
    oof = db.job_oof(rec['key'])
    db.put_job(rec, oof[oof.subject != oof.subject.iloc[0]])                 # one held-out subject gone
    before = tree(tmp_path)
    assert_refused(experiment('report', exp), f'the out-of-fold predictions of job {rec["key"]}', '1 of the', 'restore the database')
    assert tree(tmp_path) == before


def test_report_kernel_is_not_interrupted_at_shutdown():
    "jupyter_client sends SIGINT before shutting a kernel down; the report's kernel manager does not (no stray line)."
    from agenb.core import IPCKernelManager
    from agenb.report import QuietKernelManager
    calls = []
    async def interrupt(self): calls.append(1)
    old = IPCKernelManager._async_interrupt_kernel
    IPCKernelManager._async_interrupt_kernel = interrupt        # the parent's interrupt, recorded instead of sent
    try:
        km = QuietKernelManager()
        km.shutting_down = True; asyncio.run(km._async_interrupt_kernel())
        assert calls == []
        km.shutting_down = False; asyncio.run(km._async_interrupt_kernel())
        assert calls == [1]                                      # an interrupt asked for while it runs still goes
    finally: IPCKernelManager._async_interrupt_kernel = old


@pytest.mark.parametrize('key,says', [('max_grad_norm', '--max-grad-norm must be >= 0 (0: no clipping'),
                                      ('weight_decay', '--weight-decay must be >= 0')])
def test_trainer_option_out_of_range_in_base_is_refused(tmp_path, synth_root, key, says):
    "The spec's options go through the trainer's own checks: refused when read, not as an internal error of every job."
    spec = write_spec(tmp_path / 'spec.yaml', synth_root, base={**TINY, key: -1})
    refuse_spec(tmp_path, spec, str(spec), 'variant loss=mae', says)
