"""ROI and annotation masking: expected pixels on a synthetic image, masks found next to the images, the record in
config.json, and clear errors for missing masks and bad boxes."""
import json, shutil
from pathlib import Path

import numpy as np
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


def test_train_cli_roi(synth_root, tmp_path):
    "A run with --roi mask-bbox --mask-annotations records both; a missing mask and a bad box stop with exit 2."
    r = agenb('train', '--image-dir', synth_root / 'TA' / 'Healthy' / 'Images', '--excel-path',
              synth_root / 'TA' / 'characteristics.xlsx', *TINY, '--epochs', '1', '--warmup-epochs', '0',
              '--roi', 'mask-bbox', '--mask-annotations', '--output-dir', tmp_path / 'runs', '--no-report',
              '--checkpoint-every', '0')
    assert r.returncode == 0, r.stderr[-2000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    pp = json.loads((run / 'config.json').read_text())['preprocessing']
    assert (pp['roi'], pp['mask_annotations'], pp['roi_box']) == ('mask-bbox', True, None)
    assert pp['annotation_regions']['depth_ticks'] == [0.9, 0.0, 0.1, 1.0]
    from agenb.explain import explain_run                      # the shortcut score follows the crop's geometry
    res = explain_run(run, n=1)
    assert res['shortcut']['roi'] == 'mask-bbox' and (run / 'gradcam_best_worst.png').is_file()
    assert res['shortcut_score'] in (None, 0.0)                 # the muscle's box holds no annotation pixel
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
