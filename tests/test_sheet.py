"""A workbook whose table is not on its first sheet: `--sheet` for train and predict, recorded in config.json, used by
every later reader of the run's data, and a one-line hint when it is missing."""
import json
from pathlib import Path

import pytest
from openpyxl import load_workbook

from conftest import TINY, agenb, run_dir_of


@pytest.fixture(scope='module')
def notes_first(tmp_path_factory, synth_root):
    "The synthetic cohort's characteristics.xlsx with a sheet of notes put before its table."
    wb = load_workbook(synth_root / 'TA' / 'characteristics.xlsx')
    table = wb.active.title
    wb.create_sheet('Notes', 0)['A1'] = 'TA study, scanned 2024; ages in years'
    path = tmp_path_factory.mktemp('sheet') / 'workbook.xlsx'
    wb.save(path)
    return ['--image-dir', str(synth_root / 'TA' / 'Healthy' / 'Images'), '--excel-path', str(path)], table


@pytest.fixture(scope='module')
def sheet_run(tmp_path_factory, notes_first):
    args, table = notes_first
    r = agenb('train', *args, *TINY, '--epochs', '1', '--sheet', table, '--output-dir', tmp_path_factory.mktemp('runs'))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(r)


def test_train_without_sheet_names_the_other_sheets(notes_first, tmp_path):
    args, table = notes_first
    r = agenb('train', *args, *TINY, '--output-dir', tmp_path / 'out')
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sheet 'Notes'" in lines[0], lines
    assert f"pass --sheet with one of '{table}'" in lines[0], lines[0]
    assert not (tmp_path / 'out').exists()


def test_sheet_is_recorded_and_read(sheet_run, notes_first):
    _, table = notes_first
    cfg = json.loads((sheet_run / 'config.json').read_text())
    assert cfg['args']['sheet'] == table
    assert cfg['dataset']['read_summary']['sheet'] == table
    assert cfg['dataset']['read_summary']['n_images'] > 0


def test_predict_reads_the_runs_sheet_unless_told(sheet_run, notes_first, tmp_path):
    args, _ = notes_first
    r = agenb('predict', sheet_run, *args, '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / 'p_metrics.json').read_text())
    assert m['n_images'] == len((tmp_path / 'p.csv').read_text().splitlines()) - 1 > 0, m
    r = agenb('predict', sheet_run, *args, '--sheet', 'Notes', '--out', tmp_path / 'q.csv')
    assert r.returncode == 2 and "sheet 'Notes'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'q.csv').exists()


def test_config_reproduction_reads_the_recorded_sheet(sheet_run, tmp_path):
    r = agenb('train', '--config', sheet_run / 'config.json', '--epochs', '1', '--output-dir', tmp_path / 'again')
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run_dir_of(r) / 'config.json').read_text())
    assert cfg['args']['sheet'] == json.loads((sheet_run / 'config.json').read_text())['args']['sheet']
