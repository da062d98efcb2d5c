"""A command server for tests that run many agenb commands in one unusual process state (tests/test_permissions.py: as
a user who cannot ignore file modes). Started once, it imports agenb's command modules (about 8 s), then forks a fresh
child for each command it is sent: `python -m agenb.<module> ARGS` without the imports, in a process of its own (its
own exit code, stdout and stderr, nothing shared with the next command).

Protocol, one JSON object per line: the test writes {"module", "args", "cwd", "out", "err"} on stdin; the server
answers {"pid": N} when the child is started (so that the test can stop a command that hangs), then {"code": N} when it
has ended, with its stdout and stderr in the files "out" and "err". It ends at end of input. The server itself runs
no command code, so no thread pool exists when it forks."""
import atexit, importlib, importlib.util, json, os, random, sys, threading, traceback

MODULES = ('agenb.data', 'agenb.train', 'agenb.predict', 'agenb.evaluate', 'agenb.report', 'agenb.export')


def child(req):
    "The forked command, ended as a process ends (exit handlers, then os._exit with the command's exit code)."
    code = 1
    try:
        os.chdir(req['cwd'])
        null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)     # the protocol's input is not the command's
        for fd, path in ((1, req['out']), (2, req['err'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.dup2(f, fd); os.close(f)
        sys.argv = [importlib.util.find_spec(req['module']).origin, *req['args']]   # as `python -m` sets them
        sys.path[0] = req['cwd']
        import numpy; numpy.random.seed(); random.seed()                          # a new process's own random state
        from agenb.core import run_cli
        try: run_cli(importlib.import_module(req['module']).main, req['args']); code = 0
        except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    try:
        for t in threading.enumerate():                                         # what interpreter shutdown does
            if t is not threading.current_thread() and not t.daemon: t.join()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for s in (sys.stdout, sys.stderr):
        try: s.flush()
        except Exception: pass
    os._exit(code)


def main():
    for m in MODULES: importlib.import_module(m)
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0: child(req)
        print(json.dumps({'pid': pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({'code': os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == '__main__':
    main()
