"""Integration tests of `python -m agenb.data check`: the synthetic data set reads with the right counts, and
every kind of bad input gives exit code 2 and one line naming the problem."""
import json, shutil, subprocess, sys, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import Workbook
from PIL import Image

from agenb.data import load_dataset
from agenb.synth import generate

HDR = ['Number', 'Age', 'Length (cm)', 'Weight (kg)', 'Sex']


def check(*args):
    return subprocess.run([sys.executable, '-m', 'agenb.data', 'check', *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('agenb: error:'), r.stderr
    assert 'Traceback' not in r.stderr
    for n in needles: assert n in lines[0], (n, lines[0])


def make(root, healthy, patho=(), files=('anon_1_1.png', 'anon_1_2.png', 'anon_2_1.png')):
    "A tiny data set in the real layout; returns (image_dir, xlsx)."
    d = Path(root) / 'TA' / 'Healthy' / 'Images'
    d.mkdir(parents=True)
    for f in files: Image.fromarray(np.full((6, 7), 90, np.uint8)).save(d / f)
    wb = Workbook(); ws = wb.active; ws.title = 'Blad1'
    ws['A1'], ws['G1'] = 'Healthy', 'Pathological'
    for j, h in enumerate(HDR): ws.cell(2, 1 + j, h); ws.cell(2, 7 + j, h)
    for i, r in enumerate(healthy):
        for j, v in enumerate(r): ws.cell(3 + i, 1 + j, v)
    for i, r in enumerate(patho):
        for j, v in enumerate(r): ws.cell(3 + i, 7 + j, v)
    x = Path(root) / 'TA' / 'characteristics.xlsx'
    wb.save(x)
    return d, x


GOOD = [(1, 30.5, 170, 70, 'M'), (2, 8.0, 130, 28, 'F')]


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp('s') / 'data'
    return d, generate(d, preset='test', seed=1, workers=1)


def test_synthetic_dataset_passes_check_with_right_counts(synth):
    d, meta = synth
    for cohort in ('Healthy', 'Pathological'):
        r = check('--image-dir', d / 'TA' / cohort / 'Images', '--excel-path', d / 'TA/characteristics.xlsx', '--json')
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        c = meta['counts']['TA'][cohort]
        assert (s['n_subjects'], s['n_images'], s['n_masks']) == (c['subjects'], c['images'], c['images'])
        assert (s['cohort'], s['muscle'], s['sheet'], s['table_format']) == (cohort, 'TA', 'Blad1', 'two_header_rows')
        assert s['unmatched_images'] == [] and s['subjects_without_images'] == [] and s['subjects_missing_age'] == []
    # the readable summary
    r = check('--image-dir', d / 'TA/Healthy/Images', '--excel-path', d / 'TA/characteristics.xlsx', '--strict')
    assert r.returncode == 0 and f"Subjects:    {meta['counts']['TA']['Healthy']['subjects']}" in r.stdout
    assert 'Subjects per decade' in r.stdout


def test_table_matches_generator(synth):
    d, meta = synth
    t, s = load_dataset(d / 'TA/Healthy/Images', d / 'TA/characteristics.xlsx')
    lat = pd.read_csv(d / 'synth_latents.csv')
    lat = lat[lat.cohort == 'Healthy'].set_index('filename')
    assert np.allclose(t.age.values, lat.loc[t.filename, 'age'].values)
    assert t.subject.tolist() == [str(v) for v in lat.loc[t.filename, 'subject']]
    assert list(t.index) == list(range(len(t))) and t.mask_path.notna().all()
    # deterministic order regardless of listing order: sorted by numeric subject, then index
    keys = list(zip(t.subject.astype(int), t.image_index))
    assert keys == sorted(keys)
    bmi_raw = (t.weight_kg / (t.height_cm / 100) ** 2).groupby(t.subject).first()
    assert s['bmi_implausible'] == int(((bmi_raw < 10) | (bmi_raw > 60)).sum())


def test_unmatched_reported_and_strict(tmp_path):
    d, x = make(tmp_path, GOOD + [(3, 50, 170, 70, 'M')], files=('anon_1_1.png', 'anon_2_1.png', 'anon_9_1.png'))
    r = check('--image-dir', d, '--excel-path', x, '--json')
    assert r.returncode == 0
    s = json.loads(r.stdout)
    assert s['unmatched_images'] == ['anon_9_1.png'] and s['subjects_without_images'] == ['3']
    assert_error(check('--image-dir', d, '--excel-path', x, '--strict'), 'anon_9_1.png', 'without images')


def test_blank_age_is_reported_and_excluded(tmp_path):
    d, x = make(tmp_path, [(1, 30.5, 170, 70, 'M'), (2, None, 130, 28, 'F')])
    s = json.loads(check('--image-dir', d, '--excel-path', x, '--json').stdout)
    assert s['subjects_missing_age'] == ['2'] and s['n_images'] == 2
    assert_error(check('--image-dir', d, '--excel-path', x, '--strict'), 'blank age')


def test_missing_image_dir(tmp_path):
    d, x = make(tmp_path, GOOD)
    assert_error(check('--image-dir', tmp_path / 'nope', '--excel-path', x), 'nope', 'does not exist', '--image-dir')


def test_missing_excel(tmp_path):
    d, x = make(tmp_path, GOOD)
    assert_error(check('--image-dir', d, '--excel-path', tmp_path / 'missing.xlsx'), 'missing.xlsx', 'does not exist')


def test_text_file_renamed_xlsx(tmp_path):
    d, x = make(tmp_path, GOOD)
    x.write_text('Number,Age\n1,30\n')
    assert_error(check('--image-dir', d, '--excel-path', x), 'characteristics.xlsx', 'not a readable Excel')


def test_corrupt_zip(tmp_path):
    d, x = make(tmp_path, GOOD)
    x.write_bytes(x.read_bytes()[:300])
    assert_error(check('--image-dir', d, '--excel-path', x), 'characteristics.xlsx', 'not a readable Excel')


def test_zip_that_is_not_a_workbook(tmp_path):
    d, x = make(tmp_path, GOOD)
    with zipfile.ZipFile(x, 'w') as z: z.writestr('hello.txt', 'hi')
    assert_error(check('--image-dir', d, '--excel-path', x), 'not a readable Excel')


def test_cohort_block_missing(tmp_path):
    d, x = make(tmp_path, GOOD)
    assert_error(check('--image-dir', d, '--excel-path', x, '--cohort', 'Foo'),
                 "no block 'Foo'", "'Healthy' (A-E)", "'Pathological' (G-K)", '--cohort')


def test_default_cohort_not_a_block(tmp_path):
    d, x = make(tmp_path, GOOD)
    other = tmp_path / 'TA' / 'Controls' / 'Images'
    shutil.copytree(d, other)
    assert_error(check('--image-dir', other, '--excel-path', x), "'Controls'", '--cohort')


def test_sheet_missing(tmp_path):
    d, x = make(tmp_path, GOOD)
    assert_error(check('--image-dir', d, '--excel-path', x, '--sheet', 'Sheet9'), "no sheet 'Sheet9'", "'Blad1'")


def test_id_column_missing(tmp_path):
    d, x = make(tmp_path, GOOD)
    p = tmp_path / 'plain.csv'
    p.write_text('who,Age\n1,30\n2,8\n')
    assert_error(check('--image-dir', d, '--excel-path', p), 'plain.csv', 'no subject ID column', "'who'", '--id-col')
    assert_error(check('--image-dir', d, '--excel-path', x, '--id-col', 'Nummer'), "no subject ID column 'Nummer'",
                 "block 'Healthy'")
    assert check('--image-dir', d, '--excel-path', p, '--id-col', 'who').returncode == 0


def test_age_column_missing(tmp_path):
    d, x = make(tmp_path, GOOD)
    p = tmp_path / 'plain.xlsx'
    pd.DataFrame({'Number': [1, 2], 'Years': [30, 8]}).to_excel(p, index=False)
    assert_error(check('--image-dir', d, '--excel-path', p), 'plain.xlsx', 'no age column', "'Years'", '--age-col')
    assert check('--image-dir', d, '--excel-path', p, '--age-col', 'Years').returncode == 0


@pytest.mark.parametrize('bad', ['abc', -3, 130])
def test_bad_age_lists_excel_rows(tmp_path, bad):
    d, x = make(tmp_path, [(1, 30.5, 170, 70, 'M'), (2, bad, 130, 28, 'F')])
    # subject 2 is on spreadsheet row 4 (two header rows)
    assert_error(check('--image-dir', d, '--excel-path', x), "'Age' (column B)", 'row 4', repr(bad),
                 'between 0 and 120')


def test_same_subject_two_ages(tmp_path):
    d, x = make(tmp_path, GOOD + [(1, 31.0, 170, 70, 'M')])
    assert_error(check('--image-dir', d, '--excel-path', x), 'subject 1', 'rows 3 and 5', 'different ages')
    # a repeated row with the same age is fine
    d2, x2 = make(tmp_path / 'b', GOOD + [(1, 30.5, 170, 70, 'M')])
    s = json.loads(check('--image-dir', d2, '--excel-path', x2, '--json').stdout)
    assert s['duplicate_rows'] == 1 and s['n_subjects'] == 2


def test_no_image_matches_pattern(tmp_path):
    d, x = make(tmp_path, GOOD, files=('scan1.png', 'scan2.png'))
    assert_error(check('--image-dir', d, '--excel-path', x), 'matches the pattern', 'anon_', 'scan1.png', '--pattern')
    r = check('--image-dir', d, '--excel-path', x, '--pattern', r'^scan(\d+)\.png$', '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['n_images'] == 2


def test_corrupt_image_named(tmp_path):
    d, x = make(tmp_path, GOOD)
    (d / 'anon_2_1.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)
    assert_error(check('--image-dir', d, '--excel-path', x), 'anon_2_1.png', 'cannot be decoded')


def test_plain_per_image_table(tmp_path):
    d, x = make(tmp_path, GOOD)
    p = tmp_path / 'per_image.csv'
    p.write_text('filename;subject;age\nanon_1_1.png;1;30.5\nanon_1_2.png;1;30.5\nanon_2_1.png;2;8\n')
    s = json.loads(check('--image-dir', d, '--excel-path', p, '--json').stdout)
    assert (s['table_format'], s['n_images'], s['n_subjects'], s['cohort'], s['muscle']) == ('per_image', 3, 2, 'Healthy', 'TA')


# ---- check and training accept exactly the same image files (one decoder: agenb.files.decode_grey) -------------

def _write_kind(path, kind):
    "Write image `path` (a .png) as `kind`; returns the path of the file written."
    g = (np.arange(6 * 7) * 6 % 256).astype(np.uint8).reshape(6, 7)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    path.unlink()
    if kind == 'truncated_jpeg':
        p = path.with_suffix('.jpg'); Image.fromarray(noise).save(p)
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
        with Image.open(p) as im: im.verify()          # PIL's verify, which check used, passes it
    elif kind == 'float_tiff': p = path.with_suffix('.tif'); Image.fromarray(g.astype(np.float32)).save(p)
    elif kind == 'int32_tiff_beyond_16_bit': p = path.with_suffix('.tif'); Image.fromarray(g.astype(np.int32) * 1000).save(p)
    elif kind == 'int32_tiff': p = path.with_suffix('.tif'); Image.fromarray(g.astype(np.int32) * 257).save(p)
    elif kind == 'sixteen_bit_png': p = path; Image.fromarray(g.astype(np.uint16) * 257).save(p)
    elif kind == 'rgb_jpeg': p = path.with_suffix('.jpg'); Image.fromarray(np.stack([g] * 3, -1)).save(p)
    return p


@pytest.mark.parametrize('kind', ['truncated_jpeg', 'float_tiff', 'int32_tiff_beyond_16_bit'])
def test_check_refuses_the_images_training_refuses(tmp_path, kind):
    from agenb.core import InputError
    from agenb.images import Preprocessing, load_images
    d, x = make(tmp_path, GOOD)
    p = _write_kind(d / 'anon_2_1.png', kind)
    assert_error(check('--image-dir', d, '--excel-path', x), str(p), 'could not read image')
    with pytest.raises(InputError, match=p.name):      # training's loader refuses it too
        load_images([p], Preprocessing(image_size=8))


@pytest.mark.parametrize('kind', ['int32_tiff', 'sixteen_bit_png', 'rgb_jpeg'])
def test_training_accepts_the_images_check_accepts(tmp_path, kind):
    from agenb.images import Preprocessing, load_images
    d, x = make(tmp_path, GOOD)
    _write_kind(d / 'anon_2_1.png', kind)
    r = check('--image-dir', d, '--excel-path', x, '--json')
    assert r.returncode == 0, r.stderr
    t, _ = load_dataset(d, x)
    assert len(t) == 3 and load_images(t.path.tolist(), Preprocessing(image_size=8)).shape == (3, 1, 8, 8)


# ---- rows of one subject must agree ------------------------------------------------------------------------

@pytest.mark.parametrize('row, needle', [((1, 30.5, 170, 70, 'F'), "'Sex' (column E) 'M' vs 'F'"),
                                         ((1, 30.5, 180, 70, 'M'), "'Length (cm)' (column C) 170 vs 180"),
                                         ((1, 30.5, 170, 90, 'M'), "'Weight (kg)' (column D) 70 vs 90")])
def test_repeated_subject_rows_that_disagree_are_an_error(tmp_path, row, needle):
    d, x = make(tmp_path, GOOD + [row])
    assert_error(check('--image-dir', d, '--excel-path', x), 'subject 1 in rows 3 and 5', needle, 'agree')
    # the same in a plain table, one row per image
    p = tmp_path / 'per_image.csv'
    p.write_text('filename;subject;age;sex\nanon_1_1.png;1;30.5;M\nanon_1_2.png;1;30.5;F\nanon_2_1.png;2;8;F\n')
    assert_error(check('--image-dir', d, '--excel-path', p), 'subject 1 in rows 2 and 3', "'sex' 'M' vs 'F'")


def test_repeated_subject_rows_that_agree_are_a_note(tmp_path):
    d, x = make(tmp_path, GOOD + [(1, 30.5, 170, 70, 'm')])        # 'm' is 'M'
    r = check('--image-dir', d, '--excel-path', x)
    assert r.returncode == 0, r.stderr
    assert 'Repeated rows (same subject, same values, ignored): 1' in r.stdout


def test_a_blank_in_a_repeated_row_agrees_and_the_value_is_kept(tmp_path):
    # sex and sizes filled in on a subject's first row only (or only on a later one): the value is the subject's
    d, x = make(tmp_path, [(1, 30.5, None, None, None), (2, 8.0, 130, 28, 'F'), (1, 30.5, 170, 70, 'M'), (1, 30.5, None, None, None)])
    t, s = load_dataset(d, x)
    one = t[t.subject == '1'].iloc[0]
    assert (one.sex, one.height_cm, one.weight_kg) == ('M', 170, 70) and abs(one.bmi - 70 / 1.7 ** 2) < 1e-9
    assert s['duplicate_rows'] == 2          # both later rows agree with what the subject has by then


# ---- --strict and file names the pattern does not match ------------------------------------------------------

def test_strict_refuses_a_file_the_pattern_does_not_match(tmp_path):
    d, x = make(tmp_path, GOOD)
    Image.fromarray(np.full((6, 7), 90, np.uint8)).save(d / 'anon_102-1.png')
    r = check('--image-dir', d, '--excel-path', x, '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['files_not_matching_pattern'] == ['anon_102-1.png']
    assert 'Image files not matching the pattern: 1  (anon_102-1.png)' in check('--image-dir', d, '--excel-path', x).stdout
    assert_error(check('--image-dir', d, '--excel-path', x, '--strict'), 'strict check', 'anon_102-1.png',
                 'does not match the pattern', '--pattern')


# ---- numbers typed with an underscore ----------------------------------------------------------------------

def test_underscore_in_a_number_is_not_a_digit_separator(tmp_path):
    d, x = make(tmp_path, [(1, 30.5, 170, 70, 'M'), (2, '4_5', 130, 28, 'F')])
    assert_error(check('--image-dir', d, '--excel-path', x), "'Age' (column B)", "row 4 ('4_5')", 'between 0 and 120')
    d2, x2 = make(tmp_path / 'b', [(1, 30.5, '17_0', 70, 'M'), (2, 8.0, 130, 28, 'F')])   # length: not a number -> missing
    s = json.loads(check('--image-dir', d2, '--excel-path', x2, '--json').stdout)
    assert s['bmi_missing'] == 1 and s['bmi_implausible'] == 0
