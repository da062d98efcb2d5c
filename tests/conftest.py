"""Shared fixtures: a tiny synthetic dataset and one tiny finished run, made once per test session."""
import contextlib, importlib, io, json, os, signal, subprocess, sys, threading, time
from pathlib import Path

import pytest
import torch

from agenb.core import run_cli

# Like OMP_NUM_THREADS=1 in the commands' processes: pytest's two workers (-n 2) share the 2 cores, and a command run in
# this process computes with the same number of threads as one run in a new process.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# A tiny, fast model: every trainer test uses these settings unless it says otherwise.
TINY = ['--arch', 'resnet18', '--image-size', '64', '--epochs', '2', '--batch-size', '16', '--no-pretrained',
        '--num-workers', '2', '--warmup-epochs', '1', '--lr', '1e-3']


def run_cmd(args, timeout=300, env=None, cwd=None):
    "Run a command; returns CompletedProcess with text output (never raises on a non-zero exit)."
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd or ROOT)


@contextlib.contextmanager
def _process_state(env, cwd):
    "os.environ updated by `env` and the working folder `cwd`, both restored afterwards."
    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ.update({'PYTHONUNBUFFERED': '1', **(env or {})})
    os.chdir(cwd or ROOT)
    try: yield
    finally:
        os.chdir(old_cwd); os.environ.clear(); os.environ.update(old_env)


class CommandTimeout(BaseException):
    "Raised into an in-process command when its `timeout` expires; a BaseException, so `run_cli` does not catch it."


@contextlib.contextmanager
def time_limit(seconds):
    """Raise `CommandTimeout` into the code of this block after `seconds` (SIGALRM; the main thread only, where pytest
    and its xdist workers run tests; elsewhere, or with no `seconds`, no limit). The test's own pytest-timeout alarm,
    if set, is restored afterwards with the time it has left, and keeps priority when it comes first."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield; return
    outer_left, outer_every = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:   # the test's own limit comes first: it stops the command
        yield; return
    def expire(signum, frame): raise CommandTimeout(seconds)
    start, outer_handler = time.monotonic(), signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try: yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left: signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3), outer_every)


def in_process(module, *args, env=None, cwd=None, timeout=None):
    """`python -m agenb.<module> ARGS` in this process: `run_cli(main, ARGS)`, the code path of the command line
    without a new interpreter's ~8 s of imports. Returns a CompletedProcess (exit code, stdout, stderr). A command still
    running after `timeout` seconds is stopped and fails the test, naming the command and showing its stderr so far
    (like `run_cmd`, whose subprocess.run raises TimeoutExpired)."""
    mod = importlib.import_module(f'agenb.{module}')
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    code = 0
    try:
        with time_limit(timeout), _process_state(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: run_cli(mod.main, argv)
            except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except CommandTimeout:
        pytest.fail(f'in-process command `agenb.{module} {" ".join(argv)}` did not finish within {timeout} s and was '
                    f'stopped (hang guard); its stderr so far:\n{err.getvalue()[-3000:]}')
    return subprocess.CompletedProcess(['agenb.' + module, *argv], code, out.getvalue(), err.getvalue())


def agenb(module, *args, proc=False, **kw):
    """An agenb command: in this process (`in_process`), or in a new one when `proc` is true or the test injects a
    fault that kills the process (AGENB_FAULT=kill:...). The run fixtures below use real processes. A `timeout` (s)
    holds either way; without one, an in-process command is bounded only by the test's own timeout (pytest.ini)."""
    if proc or 'kill' in (kw.get('env') or {}).get('AGENB_FAULT', ''):
        return run_cmd([sys.executable, '-m', f'agenb.{module}', *map(str, args)], **kw)
    return in_process(module, *args, **kw)


PROBE = str(ROOT / 'tests' / 'train_probe.py')


def probe(*args, nproc=1, **kw):
    "The trainer through tests/train_probe.py (test probes set by AGENB_PROBE_* in `env`), in 1 process or under torchrun."
    launch = [sys.executable, PROBE] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', PROBE]
    return run_cmd([*launch, *map(str, args)], **kw)


def run_dir_of(r):
    "The run folder a finished trainer printed last."
    return Path(r.stdout.strip().splitlines()[-1])


def probe_log(d, drop=('bn',)):
    """{rank: [records]} written by train_probe.py's AGENB_PROBE_LOG, without the keys `drop` (BatchNorm statistics
    after training differ between ranks unless --sync-bn)."""
    read = lambda p: [{k: v for k, v in json.loads(line).items() if k not in drop} for line in p.read_text().splitlines()]
    return {int(p.stem[4:]): read(p) for p in sorted(Path(d).glob('rank*.jsonl'))}


@pytest.fixture(scope='session')
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    r = agenb('synth', root, '--preset', 'test', proc=True)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope='session')
def data_args(synth_root):
    return ['--image-dir', str(synth_root / 'TA' / 'Healthy' / 'Images'),
            '--excel-path', str(synth_root / 'TA' / 'characteristics.xlsx')]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_args):
    "One finished 2-epoch run (resnet18, 64 px) shared by the tests that only read its files."
    out = tmp_path_factory.mktemp('runs')
    r = agenb('train', *data_args, *TINY, '--output-dir', out, '--checkpoint-every', '1', '--keep-checkpoints', '1',
              '--run-name', 'tiny', proc=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    return run_dir


@pytest.fixture(scope='session')
def roi_run(tmp_path_factory, data_args):
    """One finished 1-epoch run with --roi crop --mask-annotations (the crop keeps the label and ticks, so both steps
    change the pixels): predict, export and explain must reproduce it."""
    out = tmp_path_factory.mktemp('roi_runs')
    r = agenb('train', *data_args, *TINY, '--epochs', '1', '--warmup-epochs', '0', '--roi', 'crop', '--roi-box', '0.1,0,0.9,1',
              '--mask-annotations', '--output-dir', out, '--no-report', '--checkpoint-every', '0', '--run-name', 'roi')
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(r)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a long end-to-end test (minutes each): `make test-all` runs it, `make test` '
                            'leaves it out to stay well under 15 minutes on 2 cores')


# The hang guard: pytest.ini gives every test a timeout (pytest-timeout); a test marked slow gets SLOW_TIMEOUT unless it
# sets its own with @pytest.mark.timeout(N).
SLOW_TIMEOUT = 2400


# The order of the files: longest first. `make test` runs with `--dist loadfile --no-loadscope-reorder`: a worker takes
# one whole file at a time, in this order (xdist's default would order the files by their number of tests, and so start
# test_multi_machine.py, 5 tests and about 4 minutes, near the end, where the other worker waits for it). Seconds from
# `pytest --durations=0` on this repository's 2-core machine (2026-12-07), fixtures included; unlisted files are
# shorter and keep their alphabetical order. A stale figure costs a few seconds of balance, never a test.
FILE_SECONDS = {'test_multi_machine.py': 262, 'test_resume.py': 145, 'test_experiment.py': 113,
                'test_hostile_experiment.py': 86, 'test_notebooks.py': 83, 'test_test_lock.py': 77, 'test_stats.py': 77,
                'test_browser.py': 73, 'test_ddp.py': 66, 'test_train_options.py': 60, 'test_permissions.py': 55,
                'test_data.py': 50, 'test_train.py': 42, 'test_agegap.py': 42, 'test_views.py': 37, 'test_models16.py': 36,
                'test_hostile_input.py': 36, 'test_crops.py': 33, 'test_sheet.py': 30, 'test_report.py': 29}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker('slow') and not item.get_closest_marker('timeout'):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))   # stable: a file's own tests keep their order
