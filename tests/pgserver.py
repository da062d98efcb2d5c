"""A throw-away PostgreSQL server from the binaries on this machine (initdb, pg_ctl), for the multi-machine tests and
bench/multi_machine.py. The server refuses to run as root: under root it runs as the `postgres` (else `nobody`) user."""
import contextlib, glob, os, pwd, shutil, socket, subprocess, tempfile
from pathlib import Path

import sqlalchemy as sa


def pg_binaries():
    "initdb and pg_ctl: on the PATH, or in the usual Debian place; None when this machine has no PostgreSQL server."
    for d in [None, *sorted(glob.glob('/usr/lib/postgresql/*/bin'), reverse=True)]:
        i, c = shutil.which('initdb', path=d), shutil.which('pg_ctl', path=d)
        if i and c: return i, c
    return None


@contextlib.contextmanager
def postgres_server():
    """Start a server of its own on a free port (data in a new folder in the temporary folder, TMPDIR); yields its URL;
    stops it and removes the folder."""
    initdb, pg_ctl = pg_binaries()
    # not under pytest's tmp (mode 700, root's): the server's user must reach it (make integration's TMPDIR is 755)
    d = Path(tempfile.mkdtemp(prefix='agenb_pg_'))
    kw = {}
    if os.geteuid() == 0:
        try: u = pwd.getpwnam('postgres')
        except KeyError: u = pwd.getpwnam('nobody')
        os.chown(d, u.pw_uid, u.pw_gid)
        kw = {'user': u.pw_uid, 'group': u.pw_gid, 'extra_groups': []}
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    run = lambda *a: subprocess.run(a, capture_output=True, text=True, cwd=d, **kw)
    r = run(initdb, '-D', str(d / 'data'), '-U', 'agenb', '--auth=trust', '-E', 'UTF8', '--no-sync')
    if r.returncode: raise RuntimeError(f'initdb failed: {r.stderr}')
    r = run(pg_ctl, '-D', str(d / 'data'), '-l', str(d / 'log'), '-w', '-t', '60', 'start',
            '-o', f'-p {port} -h 127.0.0.1 -k {d} -c fsync=off -c max_connections=200')
    if r.returncode: raise RuntimeError(f'pg_ctl start failed: {r.stderr} {(d / "log").read_text()}')
    try: yield f'postgresql+psycopg2://agenb@127.0.0.1:{port}/postgres'
    finally:
        run(pg_ctl, '-D', str(d / 'data'), '-m', 'immediate', 'stop')
        shutil.rmtree(d, ignore_errors=True)


def new_database(url, name) -> str:
    "CREATE DATABASE `name` on the server of `url`; returns its URL."
    eng = sa.create_engine(url, isolation_level='AUTOCOMMIT')
    with eng.connect() as c: c.execute(sa.text(f'CREATE DATABASE {name}'))
    eng.dispose()
    return url.rsplit('/', 1)[0] + f'/{name}'
