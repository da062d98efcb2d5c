"Integration tests for agenb.images: decode-once cache, preprocessing record, tensor augmentation."
import json
import numpy as np
import pytest
import torch
from PIL import Image

from agenb.core import InputError
from agenb.images import (Augmentation, Preprocessing, decode_grey, load_image, load_images, IMAGENET_MEAN,
                          IMAGENET_STD)
import agenb.images as images


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def pngs(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / 'Images'; d.mkdir()
    # sizes vary a little, as in the real data (480 x 504..512); small here
    return [_png(d / f'anon_{i}_{k}.png', rng.integers(0, 256, (60, 62 + i), dtype=np.uint8))
            for i in range(4) for k in (1, 2)]


def test_cached_equals_fresh_decode(pngs, tmp_path):
    prep = Preprocessing(image_size=(40, 48))
    fresh = np.stack([np.asarray(Image.open(p).convert('L').resize((48, 40), Image.BILINEAR)) for p in pngs])
    info = {}
    cold = load_images(pngs, prep, cache_dir=tmp_path / 'cache', num_threads=3, info=info)
    assert (info['cache_hits'], info['cache_misses']) == (0, len(pngs))
    warm = load_images(pngs, prep, cache_dir=tmp_path / 'cache', num_threads=1, info=info)
    assert (info['cache_hits'], info['cache_misses']) == (len(pngs), 0)
    assert warm.dtype == torch.uint8 and tuple(warm.shape) == (len(pngs), 1, 40, 48)
    assert np.array_equal(cold[:, 0].numpy(), fresh) and torch.equal(warm, cold)
    assert images.last_cache_info['cache_hits'] == len(pngs)
    assert torch.equal(load_images(pngs, prep), cold)  # no cache, same pixels
    assert images.last_cache_info['cache_dir'] is None and images.last_cache_info['cache_hits'] == 0
    assert torch.equal(load_image(pngs[3], prep), cold[3])
    # one file per image plus the preprocessing record, under the preprocessing fingerprint
    sub = tmp_path / 'cache' / prep.pixel_fingerprint()[:16]
    assert len(list(sub.glob('*.npy'))) == len(pngs)
    assert json.loads((sub / 'preprocessing.json').read_text())['preprocessing']['width'] == 48


def test_changed_file_is_reread(pngs, tmp_path):
    prep = Preprocessing(image_size=16)
    first = load_images(pngs, prep, cache_dir=tmp_path / 'c')
    _png(pngs[1], np.full((60, 62), 77, np.uint8))
    info = {}
    second = load_images(pngs, prep, cache_dir=tmp_path / 'c', info=info)
    assert (info['cache_hits'], info['cache_misses']) == (len(pngs) - 1, 1)
    assert (second[1] == 77).all() and not torch.equal(first[1], second[1])
    assert torch.equal(second[0], first[0]) and torch.equal(second[2:], first[2:])


def test_corrupt_cache_entry_is_recomputed(pngs, tmp_path):
    prep = Preprocessing(image_size=16)
    good = load_images(pngs, prep, cache_dir=tmp_path / 'c')
    entry = next((tmp_path / 'c' / prep.pixel_fingerprint()[:16]).glob('*.npy'))
    entry.write_bytes(b'garbage')
    info = {}
    again = load_images(pngs, prep, cache_dir=tmp_path / 'c', info=info)
    assert info['cache_corrupt_rewritten'] == 1 and torch.equal(again, good)


def test_bad_file_names_it(pngs, tmp_path):
    bad = tmp_path / 'Images' / 'anon_9_1.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)
    with pytest.raises(InputError, match='anon_9_1.png'):
        load_images(pngs + [bad], Preprocessing(image_size=16), cache_dir=tmp_path / 'c')
    with pytest.raises(InputError, match='anon_9_1.png'):
        decode_grey(bad)
    with pytest.raises(InputError, match='nothere.png'):
        load_images([tmp_path / 'nothere.png'], Preprocessing(image_size=16))


def test_sixteen_bit_and_rgb(tmp_path):
    g = (np.arange(30 * 20) % 256).astype(np.uint8).reshape(30, 20)
    p16 = tmp_path / 'a16.png'; Image.fromarray(g.astype(np.uint16) * 257).save(p16)
    prgb = _png(tmp_path / 'rgb.png', np.stack([g] * 3, -1))
    assert Image.open(p16).mode.startswith('I')
    assert np.array_equal(decode_grey(p16), g) and np.array_equal(decode_grey(prgb), g)


def test_preprocessing_record_and_validation():
    p = Preprocessing()
    d = p.to_dict()
    json.dumps(d)
    assert d['image_size'] == 224 and (d['height'], d['width']) == (224, 224)
    assert (d['resize'], d['interpolation'], d['antialias'], d['grey_to_rgb']) == ('stretch', 'bilinear', True, 'replicate')
    assert d['mean'] == list(IMAGENET_MEAN) and d['std'] == list(IMAGENET_STD)
    assert (d['roi'], d['mask_annotations']) == ('none', False)
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == p
    assert Preprocessing(interpolation='nearest').to_dict()['antialias'] is False
    for bad in ({'roi': 'muscle'}, {'mask_annotations': 'yes'}, {'resize': 'crop'}, {'image_size': 0},
                {'image_size': (1, 2, 3)}, {'std': (0, 1, 1)}):
        with pytest.raises(InputError):
            Preprocessing(**bad)
    with pytest.raises(InputError, match='unknown'):
        Preprocessing.from_dict({**d, 'crop': 10})


def test_normalize_shapes_and_values():
    p = Preprocessing()
    x = torch.rand(3, 1, 10, 12, generator=torch.Generator().manual_seed(0))
    y = p.normalize(x)
    assert tuple(y.shape) == (3, 3, 10, 12) and y.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(y[:, c], (x[:, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    # uint8 input is scaled to [0, 1] first
    u = (x * 255).round().to(torch.uint8)
    assert torch.allclose(p.normalize(u), p.normalize(u.float() / 255))
    with pytest.raises(ValueError):
        p.normalize(torch.rand(2, 3, 4, 4))


def test_augmentation_identity_when_zero():
    aug = Augmentation()
    assert aug.is_identity and aug.to_dict()['enabled'] is False
    assert (aug.hflip_p, aug.vflip_p) == (0.0, 0.0)  # flips off by default
    x = torch.rand(2, 1, 8, 8)
    g = torch.Generator().manual_seed(5); before = g.get_state()
    assert aug.apply(x, g) is x
    assert torch.equal(g.get_state(), before)  # no random draws


def test_augmentation_deterministic_with_seed():
    aug = Augmentation(rotation_deg=15, brightness=0.1, contrast=0.3, hflip_p=0.5, translate=0.1)
    x = torch.rand(6, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    a = aug.apply(x, torch.Generator().manual_seed(42))
    b = aug.apply(x, torch.Generator().manual_seed(42))
    c = aug.apply(x, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    # per-sample parameters: samples of one batch are not all shifted alike
    assert len({round(float((a[i] - x[i]).mean()), 4) for i in range(6)}) > 1
    d = aug.to_dict()
    assert d['enabled'] is True and d['rotation_deg'] == 15.0 and d['brightness_mode'] == 'additive'
    assert Augmentation.from_dict(json.loads(json.dumps(d))) == aug


def test_augmentation_components():
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    # brightness only: every pixel of an image moves by the same amount, within +-b
    y = Augmentation(brightness=0.2).apply(x, torch.Generator().manual_seed(0))
    shift = (y - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6) and shift.abs().max() <= 0.2 + 1e-6
    # contrast only: the per-image mean is kept while the spread around it changes (the identity would keep both)
    y = Augmentation(contrast=0.5).apply(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    assert (y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3)) - 1).abs().min() > 1e-3
    # rotation by a tiny angle keeps the image nearly unchanged
    y = Augmentation(rotation_deg=0.01).apply(x, torch.Generator().manual_seed(0))
    assert (y - x)[..., 2:-2, 2:-2].abs().max() < 0.02
    for bad in ({'hflip_p': 2}, {'contrast': -0.1}, {'rotation_deg': float('nan')}, {'translate': 'x'}):
        with pytest.raises(InputError):
            Augmentation(**bad)
