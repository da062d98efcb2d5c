"""The hang guard: every test has a timeout (pytest-timeout, pytest.ini), and the in-process runner stops a command that
outlives the `timeout` its test gives, so a hang fails one test instead of stalling an xdist worker until CI's limit."""
import signal, subprocess, sys, time

import pytest

import agenb.data as agenb_data
from conftest import ROOT, SLOW_TIMEOUT, agenb


def test_every_test_has_a_timeout(request):
    assert request.config.pluginmanager.hasplugin('timeout'), 'pytest-timeout is not installed (requirements.lock)'
    assert 0 < float(request.config.getini('timeout')) <= 3600


def test_in_process_command_that_hangs_is_stopped_and_named(monkeypatch):
    calls = []
    def hang(argv):
        calls.append(argv); print('started', file=sys.stderr)
        time.sleep(60); calls.append('woke')
    monkeypatch.setattr(agenb_data, 'main', hang)
    outer = signal.getitimer(signal.ITIMER_REAL)[0]   # pytest-timeout's own alarm for this test (signal method)
    handler = signal.getsignal(signal.SIGALRM)
    with pytest.raises(pytest.fail.Exception) as e:
        agenb('data', 'check', '--image-dir', 'somewhere', timeout=1)
    msg = str(e.value)
    assert 'agenb.data check --image-dir somewhere' in msg and 'within 1 s' in msg and 'started' in msg
    assert calls == [['check', '--image-dir', 'somewhere']]   # stopped in its sleep, never woke
    # the test's own alarm is back, with the time it had left
    assert signal.getsignal(signal.SIGALRM) is handler
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (left > 0) == (outer > 0) and left <= outer


def test_in_process_command_within_its_timeout_is_unaffected(monkeypatch):
    def quick(argv): print('done', argv)
    monkeypatch.setattr(agenb_data, 'main', quick)
    outer, handler = signal.getitimer(signal.ITIMER_REAL)[0], signal.getsignal(signal.SIGALRM)
    r = agenb('data', 'x', timeout=30)
    assert r.returncode == 0 and r.stdout == "done ['x']\n"
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    assert signal.getsignal(signal.SIGALRM) is handler and (left > 0) == (outer > 0) and left <= outer


HANGS = '''
import time, pytest

@pytest.mark.timeout(1)
def test_hangs():
    time.sleep(60)

@pytest.mark.slow
def test_slow_gets_the_longer_default(request):
    assert request.node.get_closest_marker('timeout').args == ({slow},)

def test_default(request):
    assert request.node.get_closest_marker('timeout') is None
'''


def test_a_hanging_test_fails_with_its_own_timeout(tmp_path):
    "A per-test @pytest.mark.timeout(N) overrides the default; a slow test gets SLOW_TIMEOUT; the rest, pytest.ini's."
    (tmp_path / 'conftest.py').write_text(   # the suite's hooks, from tests/conftest.py
        f'import runpy; hooks = runpy.run_path({str(ROOT / "tests" / "conftest.py")!r})\n'
        "pytest_configure, pytest_collection_modifyitems = hooks['pytest_configure'], hooks['pytest_collection_modifyitems']\n")
    (tmp_path / 'test_hangs.py').write_text(HANGS.format(slow=SLOW_TIMEOUT))
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-c', ROOT / 'pytest.ini',
                        '--rootdir', tmp_path, tmp_path], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert '1 failed, 2 passed' in r.stdout, r.stdout[-3000:]
    assert 'Timeout (>1.0s) from pytest-timeout' in r.stdout and 'time.sleep(60)' in r.stdout
