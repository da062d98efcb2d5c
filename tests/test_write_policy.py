"""Issue 18: every command writes only its own files, refuses run folders it does not own and folders that are not
what it expects, and says so in one line; options that cannot work stop before a run folder exists."""
import hashlib, json, shutil
from pathlib import Path

import pytest

from conftest import agenb, TINY


def snapshot(folder):
    "sha256 of every file directly in `folder`."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:') and 'Traceback' not in r.stderr, r.stderr
    for w in words: assert w in lines[0], (w, lines[0])


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, dst)
    return dst


def test_evaluate_predictions_refuses_a_run_folder_as_out(run_copy):
    before = snapshot(run_copy)
    r = agenb('evaluate', '--predictions', run_copy / 'predictions.csv', '--out', run_copy)
    one_line_error(r, 'is a run folder')
    assert snapshot(run_copy) == before


def test_evaluate_run_writes_a_new_folder_and_leaves_the_run_alone(run_copy):
    before = snapshot(run_copy)
    r = agenb('evaluate', run_copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert snapshot(run_copy) == before
    (out,) = (run_copy / 'evaluations').iterdir()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['overall']['mae'] == pytest.approx(json.loads((run_copy / 'metrics.json').read_text())['overall']['mae'], abs=1e-4)


def test_explain_without_out_writes_its_own_folder(run_copy):
    before = snapshot(run_copy)
    r = agenb('explain', run_copy, '--n', '1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert snapshot(run_copy) == before                                   # gradcam files and metrics.json untouched
    (out,) = (run_copy / 'explanations').iterdir()
    assert (out / 'gradcam_best_worst.png').is_file() and (out / 'gradcam.csv').is_file()
    one_line_error(agenb('explain', run_copy, '--out', run_copy), 'is a run folder')


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    d = tmp_path / 'holiday_photos'; d.mkdir(); (d / 'a.txt').write_text('x')
    one_line_error(agenb('report', d), 'is not a run folder')
    assert sorted(p.name for p in d.iterdir()) == ['a.txt']


def test_export_to_an_unusable_folder_is_one_line(run_copy, tmp_path):
    f = tmp_path / 'a_file'; f.write_text('x')
    one_line_error(agenb('export', run_copy, '--out', f), 'exists and is not a folder')
    one_line_error(agenb('export', run_copy, '--out', f / 'sub'), 'cannot create the folder')
    one_line_error(agenb('export', run_copy, '--out', run_copy), 'is a run folder')


def test_predict_refuses_the_files_of_any_run(run_copy, tmp_path, data_args):
    before = snapshot(run_copy)
    r = agenb('predict', run_copy, '--image-dir', data_args[1], '--out', run_copy / 'metrics.csv')
    one_line_error(r, "would overwrite the run's own metrics.json")      # metrics.csv writes metrics.json beside it
    r = agenb('predict', run_copy, '--image-dir', data_args[1], '--out', run_copy / 'predictions.csv')
    one_line_error(r, "would overwrite the run's own predictions.csv")
    assert snapshot(run_copy)['predictions.csv'] == before['predictions.csv']


@pytest.mark.parametrize('flags, words', [
    (['--run-name', 'a/b'], ['plain name']),
    (['--image-size', '16'], ['too small for resnet18']),
    (['--epochs', 'ten'], ["invalid int value: 'ten'"]),
])
def test_train_options_that_cannot_work_stop_before_a_run_folder(data_args, tmp_path, flags, words):
    out = tmp_path / 'runs'
    r = agenb('train', *data_args, *TINY, *flags, '--output-dir', out)
    one_line_error(r, *words)
    assert not out.exists() or not any(out.iterdir())


def test_an_internal_error_is_one_line_with_a_log_and_exit_1(data_args, tmp_path):
    r = agenb('train', *data_args, *TINY, '--epochs', '1', '--output-dir', tmp_path, '--no-report',
              env={'AGENB_FAULT': 'raise:0:1:1'})
    assert r.returncode == 1, r.stderr[-2000:]
    line = [l for l in r.stderr.splitlines() if l.startswith('agenb: internal error')]
    assert len(line) == 1 and 'Traceback' not in r.stderr
    log = Path(line[0].split('traceback in ')[1].split(')')[0])
    assert 'injected fault' in log.read_text()
    (run,) = tmp_path.iterdir()                                            # the run says it failed: not a finished run
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'failed' and 'injected fault' in cfg['error'] and not (run / 'metrics.json').exists()
