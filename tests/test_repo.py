"""The repository's own promises: agenb/ is exactly what nbs/ exports, notebooks are clean, installs are pinned."""
import os, shutil, subprocess, sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent
# nbdev's test_nb (run in-process by another test) sets IN_TEST=1, which turns nbdev_export into a no-op
ENV = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}


def _copy_repo(tmp_path):
    dst = tmp_path / 'repo'
    dst.mkdir()
    for name in ('settings.ini', 'setup.py'): shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / 'nbs', dst / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copytree(ROOT / 'agenb', dst / 'agenb', ignore=shutil.ignore_patterns('__pycache__'))
    return dst


def _tree(path, pattern):
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.glob(pattern))}


def test_nbdev_export_reproduces_agenb(tmp_path):
    repo = _copy_repo(tmp_path)
    for p in (repo / 'agenb').glob('*.py'):
        if p.name != '__init__.py': p.unlink()
    r = subprocess.run([BIN / 'nbdev_export'], cwd=repo, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert _tree(repo / 'agenb', '*.py') == _tree(ROOT / 'agenb', '*.py')


def test_notebooks_are_clean(tmp_path):
    repo = _copy_repo(tmp_path)
    r = subprocess.run([BIN / 'nbdev_clean'], cwd=repo, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert _tree(repo / 'nbs', '*.ipynb') == _tree(ROOT / 'nbs', '*.ipynb')


def test_ci_calls_make_test_and_installs_are_pinned():
    assert 'make test' in (ROOT / '.ci' / 'run').read_text()
    lock = (ROOT / 'requirements.lock').read_text().splitlines()
    pins = [l for l in lock if l.strip() and not l.startswith('#')]
    assert pins and all('==' in l for l in pins)
    assert 'torch==2.14.1' in pins and 'torchvision==0.29.1' in pins and 'nbdev==2.4.14' in pins


def test_readme_is_generated_from_index():
    import json
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    text = '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown') + '\n'
    assert (ROOT / 'README.md').read_text() == text, 'run make readme'
    assert 'make demo' in text and 'make test' in text


def test_settings_lists_every_package_agenb_imports():
    """Every third-party package imported anywhere in agenb/ (at the top or inside a function) is a requirement in
    settings.ini (`requirements`, or `export_requirements` for the optional export), by its distribution name."""
    import ast, configparser, re
    from importlib.metadata import packages_distributions
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    listed = {re.split(r'[<>=\[ ]', r)[0].lower() for k in ('requirements', 'export_requirements')
              for r in cfg['DEFAULT'][k].split()}
    dist_of = packages_distributions()
    missing = set()
    for path in (ROOT / 'agenb').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for m in mods:
                top = m.split('.')[0]
                if top in sys.stdlib_module_names or top in ('agenb', '__future__'): continue
                dists = {d.lower() for d in dist_of.get(top, [top])}
                if not dists & listed: missing.add(f'{top} ({", ".join(sorted(dists))}) in {path.name}')
    assert not missing, f'imported by agenb but not in settings.ini requirements: {sorted(missing)}'


def _make_integration(tmp_path, fail):
    "make integration on two probe tests (one writes a stray file to the temporary folder, one fails when `fail`)."
    probe = tmp_path / 'probe'
    probe.mkdir(exist_ok=True)
    (probe / 'test_probe.py').write_text(
        "import os, tempfile\n"
        "def test_passes(tmp_path):\n"
        "    (tmp_path / 'passed.bin').write_bytes(b'x')\n"
        "    open(os.path.join(tempfile.gettempdir(), 'stray.log'), 'w').close()\n"
        "def test_maybe_fails(tmp_path):\n"
        "    (tmp_path / 'evidence.txt').write_text('look here')\n"
        "    assert os.environ.get('PROBE_FAIL') != '1'\n")
    root = tmp_path / ('tmp_fail' if fail else 'tmp_pass')
    root.mkdir()
    env = {k: v for k, v in ENV.items() if k not in ('PYTEST_ADDOPTS', 'MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}
    env.update(TMPDIR=str(root), PROBE_FAIL='1' if fail else '0', PYTEST_ADDOPTS='-p no:cacheprovider')
    # -o: never (re)install the venv from inside a test; BIN: this interpreter's; BROWSERS=true: the browser check is
    # satisfied at once (never an apt-get)
    cmd = ['make', '-s', '-o', '.venv/.installed', 'integration', f'BIN={BIN}', f'PYTEST_ARGS={probe}', 'PYTEST_MARKS=',
           'BROWSERS=true']
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return r, root


def test_make_integration_leaves_nothing_in_the_temporary_folder(tmp_path):
    """What the integration tests write to the temporary folder (pytest's base folder, strays of their commands) is
    gone when they pass; when one fails, its folder is kept (and the passed test's is not) and make says where."""
    r, root = _make_integration(tmp_path, fail=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '2 passed' in r.stdout and list(root.iterdir()) == []
    r, root = _make_integration(tmp_path, fail=True)
    assert r.returncode != 0 and '1 failed, 1 passed' in r.stdout
    [kept] = list(root.iterdir())
    assert f'pytest exited with 1; its temporary folder is kept in {kept}' in r.stdout
    assert (kept / 'stray.log').exists()
    names = {p.name for p in kept.rglob('*') if p.is_file()}
    assert 'evidence.txt' in names and 'passed.bin' not in names
