"""ROI and annotation masking: expected pixels on a synthetic image, masks found next to the images, the record in
config.json, and clear errors for missing masks and bad boxes."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from agenb.core import InputError
from agenb.images import Preprocessing, load_images, load_image, mask_path_for
from conftest import agenb, TINY


@pytest.fixture()
def scan(tmp_path):
    "One 120 x 100 'scan' in the real layout: muscle rows 30-69 x cols 20-79, bright label bottom left, ticks below."
    img = np.full((120, 100), 60, np.uint8)
    img[30:70, 20:80] = 120                          # muscle
    img[110:118, 2:40] = 250                         # burned-in label (bottom-left box)
    img[112:120, 45:100:5] = 200                     # depth ticks (bottom strip)
    mask = np.zeros((120, 100), np.uint8); mask[30:70, 20:80] = 255
    (tmp_path / 'Healthy' / 'Images').mkdir(parents=True); (tmp_path / 'Healthy' / 'Masks').mkdir()
    p = tmp_path / 'Healthy' / 'Images' / 'anon_1_1.png'
    Image.fromarray(img).save(p); Image.fromarray(mask).save(tmp_path / 'Healthy' / 'Masks' / 'anon_1_1.png')
    return p, img, mask > 0


def test_roi_pixels(scan):
    p, img, m = scan
    full = dict(image_size=(120, 100))
    assert mask_path_for(p) == p.parent.parent / 'Masks' / p.name
    a = load_images([p], Preprocessing(roi='mask', **full))[0, 0].numpy()
    assert (a[~m] == 0).all() and (a[m] == 120).all()
    a = load_images([p], Preprocessing(roi='mask-bbox', image_size=(40, 60)))[0, 0].numpy()
    assert (a == 120).all()                                      # exactly the muscle's box
    a = load_image(p, Preprocessing(roi='crop', roi_box='0.25,0.2,0.5,0.6', image_size=(60, 60)))[0].numpy()
    assert np.array_equal(a, img[30:90, 20:80])
    a = load_images([p], Preprocessing(mask_annotations=True, **full))[0, 0].numpy()
    assert a.max() == 120 and (a[108:] == 0).all()               # label and ticks gone
    assert np.array_equal(a[:100], img[:100])                    # the anatomy above the regions untouched
    # the regions in the input frame, as the shortcut score uses them
    r = Preprocessing(**full).region_maps(img.shape, m)
    assert r['annotation'][115, 10] and r['annotation'][119, 90] and not r['annotation'][50].any()
    assert np.array_equal(r['muscle'], m)


def test_roi_cache_key_and_record(scan, tmp_path):
    p, img, m = scan
    preps = [Preprocessing(image_size=32), Preprocessing(image_size=32, roi='mask'),
             Preprocessing(image_size=32, roi='mask-bbox'), Preprocessing(image_size=32, mask_annotations=True),
             Preprocessing(image_size=32, roi='crop', roi_box=(0.1, 0.1, 0.8, 0.8))]
    assert len({q.pixel_fingerprint() for q in preps}) == len(preps)
    info = {}
    for q in preps: load_images([p], q, cache_dir=tmp_path / 'cache', info=info); assert info['cache_misses'] == 1
    for q in preps: load_images([p], q, cache_dir=tmp_path / 'cache', info=info); assert info['cache_hits'] == 1
    d = json.loads(json.dumps(preps[-1].to_dict()))
    assert d['roi'] == 'crop' and d['roi_box'] == [0.1, 0.1, 0.8, 0.8] and 'label_box' in d['annotation_regions']
    assert Preprocessing.from_dict(d) == preps[-1]


def test_roi_errors(scan):
    p, img, m = scan
    (p.parent.parent / 'Masks' / p.name).unlink()
    with pytest.raises(InputError, match='anon_1_1.png'): load_images([p], Preprocessing(roi='mask', image_size=32))
    assert load_images([p], Preprocessing(roi='crop', roi_box='0,0,1,1', image_size=32)).shape == (1, 1, 32, 32)
    for bad in (dict(roi='crop'), dict(roi_box='0,0,1,1'), dict(roi='crop', roi_box='0.5,0,0.6,1'),
                dict(roi='crop', roi_box='1,2'), dict(roi='bbox'), dict(mask_annotations='no')):
        with pytest.raises(InputError): Preprocessing(**bad)


def test_train_cli_roi(roi_run, synth_root, tmp_path):
    "A run with --roi crop --mask-annotations records both; its Grad-CAM shortcut score follows the crop's geometry."
    pp = json.loads((roi_run / 'config.json').read_text())['preprocessing']
    assert (pp['roi'], pp['mask_annotations'], pp['roi_box']) == ('crop', True, [0.1, 0.0, 0.9, 1.0])
    assert pp['annotation_regions']['depth_ticks'] == [0.9, 0.0, 0.1, 1.0]
    from agenb.explain import explain_run, explain_images, shortcut_score
    from agenb.runs import load_run_model
    run = tmp_path / roi_run.name; shutil.copytree(roi_run, run)
    res = explain_run(run, n=1)
    assert res['shortcut']['roi'] == 'crop' and (run / 'gradcam_best_worst.png').is_file()
    rm = load_run_model(run)
    paths = pd.read_csv(run / 'predictions.csv').path.tolist()
    ex = explain_images(rm.model, rm.arch, rm.prep, paths)
    mass = ex['cams'].reshape(len(paths), -1).sum(1) > 0     # a 1-epoch model's Grad-CAM may be empty: no score then
    np.testing.assert_array_equal(np.isnan(ex['shortcut_score']), ~mass)
    assert (res['shortcut_score'] is None) == (not mass.any())
    if mass.any(): assert res['shortcut_score'] == pytest.approx(np.mean(ex['shortcut_score'][mass]))
    for i in range(len(paths)):   # the crop keeps the label and tick regions: an evenly spread map has a share there
        assert 0 < shortcut_score(np.ones(rm.prep.size), ex['annotation'][i]) < 0.5
    # --roi mask-bbox: an evenly spread map scores exactly the share of the box's pixels that are annotation and not
    # muscle (the box can reach the label strip when a muscle lies deep: synth v2 varies thickness)
    from agenb.images import read_mask
    bbox = Preprocessing(image_size=64, roi='mask-bbox')
    for p in paths:
        m = read_mask(p, required=True)
        r = bbox.region_maps(m.shape, m)
        want = float((r['annotation'] & ~r['muscle']).mean())
        assert r['muscle'].any() and shortcut_score(np.ones(bbox.size), r['annotation'], r['muscle']) == pytest.approx(want)


def test_predict_reproduces_an_roi_run(roi_run, tmp_path):
    "python -m agenb.predict applies the recorded crop and masking: the run's own test predictions come back."
    run = pd.read_csv(roi_run / 'predictions.csv')
    image_dir = Path(run.path.iloc[0]).parent                    # the dataset's folder: the masks are beside it
    r = agenb('predict', roi_run, '--image-dir', image_dir, '--out', tmp_path / 'p.csv')
    assert r.returncode == 0, r.stderr[-3000:]
    new = pd.read_csv(tmp_path / 'p.csv')
    m = run.merge(new, on='filename', suffixes=('_run', '_new'))
    assert len(m) == len(run) > 0
    np.testing.assert_allclose(m.pred_new, m.pred_run, atol=1e-4, rtol=0)
    info = json.loads((tmp_path / 'p.json').read_text())
    assert info['preprocessing'] == json.loads((roi_run / 'config.json').read_text())['preprocessing']
    # and without the masking the same model gives other numbers: the check above can tell the two apart
    from agenb.runs import load_run_model, predict_batches
    rm = load_run_model(roi_run)
    for change in ({'mask_annotations': False}, {'roi': 'none', 'roi_box': None}):
        other = Preprocessing.from_dict({**rm.prep.to_dict(), **change})
        assert np.abs(predict_batches(rm, load_images(run.path.tolist(), other)) - run.pred.to_numpy()).max() > 1e-3, change


def test_export_and_explain_reproduce_an_roi_run(roi_run, tmp_path):
    from agenb.explain import TABLE
    from agenb.export import load_exported
    cfg = json.loads((roi_run / 'config.json').read_text())
    run = pd.read_csv(roi_run / 'predictions.csv')
    r = agenb('export', roi_run, '--format', 'torchscript', '--out', tmp_path / 'bundle')
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / 'bundle' / 'model_card.json').read_text())
    assert card['input']['preprocessing'] == cfg['preprocessing']
    v = card['verification']
    assert v['against'].startswith('predictions.csv') and v['torchscript']['ok'], v
    assert any('mask_annotations=True' in x and 'NOT apply' in x for x in card['limitations'])
    # the exported file on images prepared as the run recorded gives the run's predictions
    x = load_images(run.path.tolist(), Preprocessing.from_dict(cfg['preprocessing'])).float().div(255).numpy()
    got = load_exported(tmp_path / 'bundle' / card['files']['torchscript']['file'])(x)
    np.testing.assert_allclose(got, run.pred.to_numpy(), atol=1e-4, rtol=0)
    # the trainer's own Grad-CAM table (explain_run from the run folder) predicted the same numbers
    t = pd.read_csv(roi_run / TABLE).merge(run, on='filename', suffixes=('', '_run'))
    assert len(t) == len(run)
    np.testing.assert_allclose(t.pred, t.pred_run, atol=1e-3, rtol=0)


def test_train_cli_roi_errors(synth_root, tmp_path):
    "A missing mask and a bad box stop with exit 2."
    # a copy of the data with one mask missing
    data = tmp_path / 'data'; shutil.copytree(synth_root / 'TA', data)
    gone = sorted((data / 'Healthy' / 'Masks').glob('*.png'))[0]; gone.unlink()
    args = ['--image-dir', data / 'Healthy' / 'Images', '--excel-path', data / 'characteristics.xlsx', *TINY,
            '--output-dir', tmp_path / 'runs2', '--no-report']
    r = agenb('train', *args, '--roi', 'mask')
    assert r.returncode == 2 and 'agenb: error' in r.stderr and gone.name in r.stderr and 'Traceback' not in r.stderr
    r = agenb('train', *args, '--roi', 'crop')
    assert r.returncode == 2 and '--roi-box' in r.stderr
    r = agenb('train', *args, '--roi', 'crop', '--roi-box', '0.5,0,0.8,1')
    assert r.returncode == 2 and 'top + height' in r.stderr
