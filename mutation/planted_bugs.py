"""The four bugs of issue 20 that once survived the suite, planted one at a time in a scratch copy of the working tree;
the tests named for each must fail. `python mutation/planted_bugs.py [N ...]` (default: all four).

Each copy is /tmp/agenb_planted_N with the edit applied to agenb/*.py (the package the tests import: PYTHONPATH points
at the copy, and subprocesses inherit it). Prints one line per bug; exit status 1 if any bug went unnoticed."""
import os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

BUGS = {
    1: ('the trainer fits the bias correction on test predictions instead of validation predictions',
        'agenb/train.py', "write_evaluation(run_dir, frames['test'], frames['val'],",
        "write_evaluation(run_dir, frames['test'], frames['test'],",
        ['tests/test_train.py::test_bias_correction_is_fitted_on_the_runs_validation_predictions']),
    2: ('per-subject aggregation switched from mean to median',
        'agenb/evaluate.py', "'pred': g['pred'].mean()", "'pred': g['pred'].median()",
        ['tests/test_evaluate.py::test_subject_level_uneven']),
    3: ("agenb.predict drops the run's recorded --mask-annotations",
        'agenb/predict.py', 'read_images(paths, rm.prep,',
        "read_images(paths, Preprocessing.from_dict({**rm.prep.to_dict(), 'mask_annotations': False}),",
        ['tests/test_roi.py::test_predict_reproduces_an_roi_run',
         'tests/test_run_model.py::test_predictions_use_the_recorded_preprocessing']),
    4: ('last.pth, history.json and config.json written without the atomic helper',
        'agenb/trainer.py', None, None,
        ['tests/test_trainer_unit.py::test_run_writer_replaces_files_atomically']),
}
NON_ATOMIC = [  # bug 4: three edits
    ("self.config.update(updates); atomic_write_json(self.dir / 'config.json', self.config)",
     "self.config.update(updates); (self.dir / 'config.json').write_text(__import__('json').dumps(self.config))"),
    ("atomic_torch_save(state, self.dir / 'last.pth')", "torch.save(state, self.dir / 'last.pth')"),
    ("atomic_write_json(self.dir / 'history.json', t.history)",
     "(self.dir / 'history.json').write_text(__import__('json').dumps(t.history))"),
]


def plant(n):
    what, path, old, new, tests = BUGS[n]
    dest = Path(f'/tmp/agenb_planted_{n}')
    if dest.exists(): shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns('.git', 'build', 'mutants', '__pycache__', '.venv'))
    f = dest / path
    src = f.read_text()
    edits = NON_ATOMIC if n == 4 else [(old, new)]
    if n == 3: edits.append(('from .images import affine_warp, load_image', 'from .images import affine_warp, load_image, Preprocessing'))
    for o, nw in edits:
        assert src.count(o) == 1, f'bug {n}: {o!r} not found once in {path}; update planted_bugs.py'
        src = src.replace(o, nw)
    f.write_text(src)
    env = dict(os.environ, PYTHONPATH=str(dest), OMP_NUM_THREADS='1')
    r = subprocess.run([PY, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *tests], cwd=dest, env=env,
                       capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    caught = r.returncode == 1 and 'failed' in tail
    print(f'bug {n} ({what}): {"CAUGHT" if caught else "NOT CAUGHT"} by {", ".join(tests)}: {tail}', flush=True)
    return caught


if __name__ == '__main__':
    which = [int(a) for a in sys.argv[1:]] or sorted(BUGS)
    sys.exit(0 if all([plant(n) for n in which]) else 1)
