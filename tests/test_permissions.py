"""Permission paths, tested as an unprivileged user (issue 29). The suite runs as root, which ignores file modes, so
each command here runs in a child process that cannot: as `nobody` where nobody can run this interpreter, else as
root without the capabilities that bypass file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: dropped from
the bounding set before exec, so the new process never has them); a non-root user runs them as itself. A read-only run
folder, an unwritable output folder, an unreadable image and an unreadable spreadsheet each end in one line on stderr
naming the path, exit code 2, no traceback, and nothing written."""
import ctypes, hashlib, json, os, pwd, select, shutil, signal, stat, subprocess, sys, tempfile, time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, TINY

PR_CAPBSET_DROP, FILE_MODE_CAPS = 24, (1, 2, 3)   # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


def _as_nobody():
    nobody = pwd.getpwnam('nobody')
    def drop():
        os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
    return drop, 'nobody'


def _root_without_file_mode_caps():
    prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: a forked child only calls it
    def drop():
        for cap in FILE_MODE_CAPS:
            if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0: raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')
    return drop, 'root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER'


@pytest.fixture(scope='module')
def area():
    "A folder every user can reach (pytest's own tmp folder is root's, mode 700), removed afterwards."
    d = Path(tempfile.mkdtemp(prefix='agenb-perm-'))
    d.chmod(0o755)
    (d / 'home').mkdir(); (d / 'home').chmod(0o777)   # HOME, TMPDIR and caches of the child
    yield d
    for p in d.rglob('*'):   # make everything removable again
        if not p.is_symlink(): p.chmod(0o777 if p.is_dir() else 0o666)
    shutil.rmtree(d)


@pytest.fixture(scope='module')
def unprivileged(area):
    """(preexec_fn, who): how a child is made unable to ignore file modes; checked on a file of mode 000. Skips, with the
    reason, where no way works."""
    if os.geteuid() != 0: return None, f'uid {os.geteuid()} (not root)'
    secret = area / 'probe'; secret.write_text('x'); secret.chmod(0)
    tried = []
    for way in (_as_nobody, _root_without_file_mode_caps):
        try:
            drop, who = way()
            r = subprocess.run([sys.executable, '-c', f'open({str(secret)!r}).read()'], preexec_fn=drop, cwd=area,
                               capture_output=True, text=True, timeout=60)
        except (KeyError, OSError, subprocess.SubprocessError) as e:
            tried.append(f'{way.__name__}: {type(e).__name__}: {e}'); continue
        if r.returncode != 0 and 'PermissionError' in r.stderr: return drop, who
        tried.append(f'{way.__name__}: the child could read a file of mode 000' if r.returncode == 0 else
                     f'{way.__name__}: {r.stderr.strip().splitlines()[-1:]}')
    pytest.skip('cannot run a child that honours file modes: ' + '; '.join(tried))


@pytest.fixture(scope='module')
def run_as(unprivileged, area):
    """Run `python -m agenb.<module> ARGS` as the unprivileged user; a CompletedProcess. Each command is a process of its
    own, forked by one server started as that user (tests/zygote.py), which imports agenb once for all of them. A
    command still running after 500 s (before the test's own 600 s limit) is killed and fails its test; a server that
    is busy or died fails every later test with a line that says so."""
    drop, who = unprivileged
    home = area / 'home'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONDONTWRITEBYTECODE='1', HOME=str(home),
               TMPDIR=str(home), MPLCONFIGDIR=str(home / 'mpl'), XDG_CACHE_HOME=str(home / 'cache'),
               JUPYTER_RUNTIME_DIR=str(home / 'jupyter'), JUPYTER_DATA_DIR=str(home / 'jupyter'))
    server = subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'zygote.py')], preexec_fn=drop, cwd=home, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
    buf = bytearray()
    def answer(timeout):
        "The server's next line as JSON; None after `timeout` seconds without one (unbuffered: select sees every byte)."
        end = time.monotonic() + timeout
        while b'\n' not in buf:
            if not select.select([server.stdout], [], [], max(0.0, end - time.monotonic()))[0]: return None
            chunk = os.read(server.stdout.fileno(), 4096)
            if not chunk: raise RuntimeError(f'the command server (tests/zygote.py) ended with exit code {server.wait()}')
            buf.extend(chunk)
        line, _, rest = bytes(buf).partition(b'\n'); buf[:] = rest
        return json.loads(line)
    n = [0]
    def run(module, *args):
        n[0] += 1
        out, err = home / f'cmd{n[0]}.out', home / f'cmd{n[0]}.err'
        server.stdin.write((json.dumps({'module': f'agenb.{module}', 'args': [str(a) for a in args], 'cwd': str(home),
                                        'out': str(out), 'err': str(err)}) + '\n').encode())
        started = answer(60)
        if started is None: raise RuntimeError('the command server (tests/zygote.py) did not start the command within 60 s')
        done = answer(500)
        if done is None:
            os.kill(started['pid'], signal.SIGKILL); answer(60)
            pytest.fail(f'agenb.{module} {" ".join(map(str, args))} did not end within 500 s (killed); its stderr:\n'
                        f'{err.read_text()[-3000:]}')
        r = subprocess.CompletedProcess(['agenb.' + module, *map(str, args)], done['code'], out.read_text(), err.read_text())
        r.who = who
        return r
    try:
        assert answer(300) == {'ready': True}
        yield run
    finally:
        server.stdin.close()
        try: server.wait(60)
        except subprocess.TimeoutExpired: os.killpg(server.pid, signal.SIGKILL); server.wait()


def one_line_error(r, *words):
    "Exit code 2, one line on stderr that starts 'agenb: error:' and holds every word, no traceback."
    assert r.returncode == 2, (r.who, r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:') and 'Traceback' not in r.stderr, (r.who, r.stderr[-3000:])
    print(f'as {r.who}: {lines[0]}')   # shown by pytest -rP
    for w in words: assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def denied_line(r, path, *words):
    """`one_line_error` saying that `path` cannot be read for want of permission: the full path once, never cut short
    nor repeated by the system's own message, and what to do, not the advice for a damaged file."""
    line = one_line_error(r, f'{path} cannot be read (permission denied): give your user read access to it', *words)
    assert line.count(str(path)) == 1 and 'Errno' not in line and 'decoded' not in line and 'replace' not in line, line
    return line


def tree(folder):
    "Every path under `folder` with its mode and content hash: what a refusal must leave unchanged."
    out = {}
    for p in sorted(Path(folder).rglob('*')):
        st = p.lstat()
        h = None
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o400: h = hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(folder))] = (stat.filemode(st.st_mode), h)
    return out


def read_only(folder):
    "Every folder under `folder` (and itself) r-x, every file r--: the unprivileged user can read but not write."
    for p in [*Path(folder).rglob('*'), Path(folder)]:
        p.chmod(0o555 if p.is_dir() else 0o444)


@pytest.fixture(scope='module')
def data(area, synth_root):
    "A copy of the synthetic data set (images, spreadsheet) every user may read."
    d = area / 'data'
    shutil.copytree(synth_root / 'TA', d)
    for p in [*d.rglob('*'), d]: p.chmod(0o755 if p.is_dir() else 0o644)
    return d / 'Healthy' / 'Images', d / 'characteristics.xlsx'


@pytest.fixture(scope='module')
def images(area, tiny_run):
    "A folder with copies of the tiny run's test images, readable by everyone."
    d = area / 'test_images'; d.mkdir(); d.chmod(0o755)
    split = pd.read_csv(tiny_run / 'split.csv', dtype={'subject': str})
    for p in split.loc[split.split == 'test', 'path']: shutil.copy(p, d / Path(p).name); (d / Path(p).name).chmod(0o644)
    return d


@pytest.fixture()
def writable(area, request):
    "A fresh folder the unprivileged user may write to."
    d = area / f'w_{request.node.name}'[:80]; d.mkdir(); d.chmod(0o777)
    return d


@pytest.fixture(scope='module')
def copy_run(tiny_run, synth_root, data):
    """copy_run(dst, interrupted=False): a copy of the tiny finished run whose recorded image paths name the readable
    copy of the data (pytest's tmp folder is root's, mode 700); `interrupted`: one with an epoch left to train."""
    def copy(dst, interrupted=False):
        shutil.copytree(tiny_run, dst)
        for f in [*dst.glob('*.csv'), *dst.glob('*.json')]:
            f.write_text(f.read_text().replace(str(synth_root / 'TA'), str(data[0].parents[1])))
        if interrupted:
            cfg = json.loads((dst / 'config.json').read_text()); cfg['status'] = 'interrupted'; cfg['args']['epochs'] += 1
            (dst / 'config.json').write_text(json.dumps(cfg))
        return dst
    return copy


@pytest.fixture(scope='module')
def readable_run(area, copy_run):
    "A read-only copy of the tiny run, shared by the tests that only read it."
    d = copy_run(area / 'run_readable'); read_only(d)
    return d


@pytest.fixture()
def ro_run(area, copy_run, request):
    "A read-only copy of the tiny finished run, for one test."
    d = copy_run(area / f'run_{request.node.name}'[:80]); read_only(d)
    return d


# ---- a read-only run folder -------------------------------------------------------------------------------------------

def test_predict_into_a_read_only_run_folder(run_as, ro_run, images):
    before = tree(ro_run)
    one_line_error(run_as('predict', ro_run, '--image-dir', images, '--out', ro_run / 'new.csv'), ro_run)
    assert tree(ro_run) == before


def test_evaluate_into_a_read_only_run_folder(run_as, ro_run):
    before = tree(ro_run)
    line = one_line_error(run_as('evaluate', ro_run), ro_run, 'is not writable (permission denied)', 'pass --out DIR')
    assert '--out /' not in line and 'evaluations/test_' not in line, line   # the user gave no --out: not named as the culprit
    assert tree(ro_run) == before


def test_report_into_a_read_only_run_folder(run_as, ro_run):
    before = tree(ro_run)
    one_line_error(run_as('report', ro_run), ro_run)   # writes RUN/report.html
    assert tree(ro_run) == before


def test_resume_of_a_read_only_run_folder(run_as, copy_run, area):
    run = copy_run(area / 'resume_ro', interrupted=True); read_only(run)
    before = tree(run)
    one_line_error(run_as('train', '--resume', run, '--no-report'), run)
    assert tree(run) == before


# ---- an unwritable output folder --------------------------------------------------------------------------------------

@pytest.fixture()
def locked(area, request):
    "An existing, empty folder the unprivileged user may read but not write."
    d = area / f'locked_{request.node.name}'[:80]; d.mkdir(); d.chmod(0o555)
    return d


@pytest.mark.parametrize('sub', ['', 'runs'])
def test_train_into_an_unwritable_output_dir(run_as, data, locked, sub):
    img, xlsx = data
    out = locked / sub if sub else locked
    one_line_error(run_as('train', '--image-dir', img, '--excel-path', xlsx, *TINY, '--output-dir', out), '--output-dir', out)
    assert not any(locked.iterdir())


def test_predict_into_an_unwritable_folder(run_as, readable_run, images, locked):
    one_line_error(run_as('predict', readable_run, '--image-dir', images, '--out', locked / 'p.csv'), locked)
    assert not any(locked.iterdir())


def test_export_into_an_unwritable_folder(run_as, readable_run, locked):
    one_line_error(run_as('export', readable_run, '--out', locked / 'bundle'), locked / 'bundle')
    assert not any(locked.iterdir())


# ---- an unreadable image, an unreadable spreadsheet -------------------------------------------------------------------

@pytest.fixture()
def dataset(area, data, request):
    "A private copy of the data set, readable by the unprivileged user, to make one file of it unreadable."
    d = area / f'data_{request.node.name}'[:80]
    shutil.copytree(data[0].parents[1], d)
    return d / 'Healthy' / 'Images', d / 'characteristics.xlsx'


def test_check_an_unreadable_image(run_as, dataset):
    img, xlsx = dataset
    bad = sorted(img.iterdir())[0]; bad.chmod(0)
    denied_line(run_as('data', 'check', '--image-dir', img, '--excel-path', xlsx), bad, 'or remove it from the folder')


def test_train_with_an_unreadable_image(run_as, dataset, writable):
    img, xlsx = dataset
    bad = sorted(img.iterdir())[0]; bad.chmod(0)
    denied_line(run_as('train', '--image-dir', img, '--excel-path', xlsx, *TINY, '--output-dir', writable), bad)
    assert not any(writable.iterdir())   # no run folder


def test_predict_an_unreadable_image(run_as, readable_run, images, writable):
    img = writable / 'imgs'; shutil.copytree(images, img)
    bad = sorted(img.iterdir())[0]; bad.chmod(0)
    denied_line(run_as('predict', readable_run, '--image-dir', img, '--out', writable / 'p.csv'), bad, '--skip-bad')
    assert sorted(p.name for p in writable.iterdir()) == ['imgs']


def test_check_an_unreadable_spreadsheet(run_as, dataset):
    img, xlsx = dataset
    xlsx.chmod(0)
    denied_line(run_as('data', 'check', '--image-dir', img, '--excel-path', xlsx), xlsx)


def test_train_with_an_unreadable_spreadsheet(run_as, dataset, writable):
    img, xlsx = dataset
    xlsx.chmod(0)
    denied_line(run_as('train', '--image-dir', img, '--excel-path', xlsx, *TINY, '--output-dir', writable), xlsx)
    assert not any(writable.iterdir())


def test_check_an_unlistable_image_folder(run_as, dataset):
    img, xlsx = dataset
    img.chmod(0o311)   # may be entered, not listed
    line = one_line_error(run_as('data', 'check', '--image-dir', img, '--excel-path', xlsx), f'image folder {img} cannot be listed '
                          '(permission denied): give your user read access to it')
    assert line.count(str(img)) == 1, line
