"""The per-run HTML report and the comparison page: self-contained, complete, and rendered for failed runs too."""
import json, re, shutil
from pathlib import Path

import pytest

from conftest import agenb
from agenb.report import external_refs, render_report
from agenb.report_sections import load_run


def copy_run(src, dst):
    "A copy of a run folder without its checkpoints (the report does not read them) and without an old report."
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('*.pth', 'report.html', 'report.md'))
    return dst


def assert_self_contained(html):
    assert external_refs(html) == [], external_refs(html)[:5]
    assert '<script' not in html.lower() and not re.search(r'<link[^>]*href=["\']?https?:', html, re.I)


@pytest.fixture(scope='module')
def rendered(tiny_run, tmp_path_factory):
    "A copy of the shared tiny run, its report rendered by the CLI."
    run = copy_run(tiny_run, tmp_path_factory.mktemp('report') / tiny_run.name)
    r = agenb('report', run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(run / 'report.html')
    return run


def test_trainer_renders_the_report(tiny_run):
    "Every run ends with report.html (the trainer calls render_report); no rendering error was recorded."
    cfg = json.loads((tiny_run / 'config.json').read_text())
    assert (tiny_run / 'report.html').is_file(), cfg.get('report_error')
    assert 'report_error' not in cfg


def test_report_is_complete_and_self_contained(rendered):
    html = (rendered / 'report.html').read_text()
    assert_self_contained(html)
    m = json.loads((rendered / 'metrics.json').read_text())
    assert f'{m["overall"]["mae"]:.3f}' in html                     # the run's test MAE
    curves = (rendered / 'training_curves.png').read_bytes()
    import base64
    assert base64.b64encode(curves).decode()[:200] in html            # the curves image, embedded
    n_img = len(re.findall(r'<img [^>]*src="data:image/png;base64,', html))
    assert n_img >= 1 + 1 + 5 + 2 * 6, n_img                         # curves, age histogram, 5 plots, 12 thumbnails
    for text in ('completed', 'Dataset and split', 'leakage check', 'Training settings', 'CosineAnnealingLR',
                 'Test metrics', 'test, subject level', 'baseline', 'Error per age group', 'Worst 6 test predictions',
                 'true <b>', rendered.name):
        assert text in html, text
    assert 'print(' not in html and 'display(HTML' not in html         # no code shown
    cfg = json.loads((rendered / 'config.json').read_text())
    commit = cfg['environment']['git']['commit']                     # the tests run in a git checkout: a commit exists
    assert isinstance(commit, str) and len(commit) == 40 and commit in html


def test_report_md_summary(rendered):
    md = (rendered / 'report.md').read_text()
    cfg = json.loads((rendered / 'config.json').read_text())
    assert md.startswith(f'# Experiment summary: {rendered.name}')
    for text in ('agenb.train', cfg['script_version'], 'MAE (L1Loss)', f'subjects: {cfg["dataset"]["total_subjects"]}',
                 f'training samples: {cfg["dataset"]["train_samples"]}', 'test MAE'):
        assert text in md, text


def test_report_of_a_failed_run(rendered, tmp_path):
    "A run that failed at epoch 2 has no metrics, predictions or plots: the report still renders and says so."
    run = copy_run(rendered, tmp_path / 'run_failed')
    cfg = json.loads((run / 'config.json').read_text())
    cfg.update(status='failed', error='RuntimeError: injected fault on rank 0', failed_at_epoch=2)
    for k in ('stop_reason', 'finished_at'): cfg.pop(k, None)
    (run / 'config.json').write_text(json.dumps(cfg))
    (run / 'history.json').write_text(json.dumps(json.loads((run / 'history.json').read_text())[:1]))
    for f in ['metrics.json', 'predictions.csv', 'subject_predictions.csv', 'training_curves.png', 'scatter.png',
              'error_hist.png', 'bland_altman.png', 'mae_by_age.png', 'residual_vs_age.png']:
        (run / f).unlink(missing_ok=True)
    out = render_report(run)
    html = out.read_text()
    assert_self_contained(html)
    for text in ('agenb-failed', 'injected fault on rank 0', '1 epoch(s) finished', 'metrics.json: not written',
                 'never reached the test evaluation', 'predictions.csv: not written', 'drawn from history.json'):
        assert text in html, text
    assert 'status: failed: RuntimeError' in (run / 'report.md').read_text()


def test_report_of_a_nearly_empty_folder(tmp_path):
    "Only a config.json saying 'running' (killed before the first epoch): still a report."
    run = tmp_path / 'run_x'; run.mkdir()
    (run / 'config.json').write_text(json.dumps({'status': 'running', 'training': {'epochs': 5}, 'args': {'epochs': 5}}))
    r = agenb('report', run)
    assert r.returncode == 0, r.stderr[-2000:]
    html = (run / 'report.html').read_text()
    assert 'has not recorded an end' in html and 'no epoch finished' in html
    assert_self_contained(html)


def test_compare_page(rendered, tmp_path):
    other = copy_run(rendered, tmp_path / 'run_mse')
    cfg = json.loads((other / 'config.json').read_text())
    cfg['args']['loss'] = 'mse'; cfg['training']['loss_function'] = 'MSE (MSELoss)'
    (other / 'config.json').write_text(json.dumps(cfg))
    hist = json.loads((other / 'history.json').read_text())
    (other / 'history.json').write_text(json.dumps([dict(h, val_mae=h['val_mae'] + 1) for h in hist]))
    out = tmp_path / 'cmp.html'
    r = agenb('report', '--compare', rendered, other, '--out', out)
    assert r.returncode == 0, r.stderr[-2000:]
    html = out.read_text()
    assert_self_contained(html)
    for text in (rendered.name, 'run_mse', 'Settings that differ', 'args.loss', 'MSE (MSELoss)', 'Validation curves'):
        assert text in html, text
    assert re.search(r'<img [^>]*src="data:image/png;base64,', html)


def test_bad_input_is_one_line(tmp_path):
    r = agenb('report', tmp_path / 'nope')
    assert r.returncode == 2 and r.stderr.startswith('agenb: error:') and len(r.stderr.strip().splitlines()) == 1
    r = agenb('report', '--compare', tmp_path)                            # an empty folder: no runs
    assert r.returncode == 2 and 'holds no runs' in r.stderr
    assert load_run(tmp_path).status == 'unknown (no config.json)'
