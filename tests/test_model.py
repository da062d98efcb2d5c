"Integration tests for agenb.model: architectures, head, weights (offline, files), description."
import enum
import hashlib
import json
import urllib.error

import pytest
import torch
import torchvision

import agenb.model as model_mod
from agenb.core import InputError, file_sha256
from agenb.model import ARCHS, build_model, describe_model, gradcam_target_layer, head_linear


@pytest.mark.parametrize('arch', ARCHS)
def test_every_arch_builds_and_regresses(arch):
    torch.manual_seed(0)
    m = build_model(arch, pretrained=False, dropout=0.25, init_bias=42.5).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 64, 64))
    assert tuple(y.shape) == (2, 1) and torch.isfinite(y).all()
    lin = head_linear(m, arch)
    assert lin.out_features == 1 and lin.bias.item() == 42.5
    # dropout value lands in the head, right before the Linear
    drops = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert any(d.p == 0.25 for d in drops)
    d = describe_model(m)
    assert (d['architecture'], d['output_dim'], d['dropout'], d['init_bias']) == (arch, 1, 0.25, 42.5)
    assert d['pretrained'] is False and d['weights_source'] is None
    assert d['n_parameters'] == sum(p.numel() for p in m.parameters())
    # Grad-CAM target layer produces a spatial feature map
    feats = {}
    h = gradcam_target_layer(m, arch).register_forward_hook(lambda mod, i, o: feats.setdefault('o', o))
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 64))
    h.remove()
    assert feats['o'].ndim == 4 and feats['o'].shape[-1] >= 1


def test_bad_arguments():
    with pytest.raises(InputError, match='convnext_tiny'):
        build_model('resnet1001')
    with pytest.raises(InputError, match='dropout'):
        build_model('resnet18', dropout=-0.1)
    with pytest.raises(InputError, match='init_bias'):
        build_model('resnet18', init_bias=float('nan'))


def test_init_bias_is_the_start_output():
    m = build_model('resnet18', init_bias=55.0).eval()
    torch.nn.init.zeros_(head_linear(m, 'resnet18').weight)
    with torch.no_grad():
        assert torch.allclose(m(torch.randn(2, 3, 32, 32)), torch.full((2, 1), 55.0))


def test_pretrained_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))  # empty hub cache: torchvision must download

    def offline(*a, **k):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(InputError) as e:
        build_model('resnet50', pretrained=True)
    msg = str(e.value)
    assert 'could not download the ImageNet weights for resnet50' in msg
    assert 'offline' in msg and '--weights PATH' in msg and '--no-pretrained' in msg
    assert 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth' in msg


def test_pretrained_loaded_is_recorded(monkeypatch):
    sd = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(model_mod, '_download_state_dict', lambda w: sd)
    m = build_model('resnet18', pretrained=True)
    assert torch.equal(m.conv1.weight, sd['conv1.weight'])
    d = describe_model(m)
    assert d['pretrained'] is True and d['weights_source'] == 'torchvision:ResNet18_Weights.IMAGENET1K_V1'


def test_backbone_weights_file(tmp_path):
    src = torchvision.models.resnet18()
    p = tmp_path / 'resnet18_imagenet.pth'
    torch.save(src.state_dict(), p)
    m = build_model('resnet18', pretrained=True, weights=p)  # a file wins over downloading
    assert torch.equal(m.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    d = describe_model(m)
    json.dumps(d)
    assert d['weights_source'] == f'file:{p.resolve()}' and d['weights_sha256'] == file_sha256(p)
    assert d['weights_kind'] == 'backbone' and d['pretrained'] is False  # not torchvision's published file


def test_published_imagenet_file_is_recognised(tmp_path, monkeypatch):
    p = tmp_path / 'w.pth'
    torch.save(torchvision.models.resnet18().state_dict(), p)
    prefix = hashlib.sha256(p.read_bytes()).hexdigest()[:8]

    class FakeWeights(enum.Enum):  # stands in for the published file name with its hash
        IMAGENET1K_V1 = f'https://download.pytorch.org/models/resnet18-{prefix}.pth'
        @property
        def url(self): return self.value
    monkeypatch.setattr(torchvision.models, 'get_model_weights', lambda arch: FakeWeights)
    d = describe_model(build_model('resnet18', weights=p))
    assert d['pretrained'] is True and d['weights_kind'] == 'imagenet'
    assert d['weights_match'] == 'torchvision:FakeWeights.IMAGENET1K_V1'


def test_full_model_checkpoint_roundtrip(tmp_path):
    a = build_model('efficientnet_b0', dropout=0.1, init_bias=33.0).eval()
    p = tmp_path / 'best_model.pth'
    torch.save({'model_state_dict': a.state_dict(), 'arch': 'efficientnet_b0', 'epoch': 7}, p)
    b = build_model('efficientnet_b0', weights=p, dropout=0.1, init_bias=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))
    d = describe_model(b)
    assert d['weights_kind'] == 'full_model' and d['head_loaded_from_file'] is True and d['init_bias'] is None
    # DDP-style 'module.' prefixes are accepted
    torch.save({f'module.{k}': v for k, v in a.state_dict().items()}, tmp_path / 'ddp.pth')
    build_model('efficientnet_b0', weights=tmp_path / 'ddp.pth')
    with pytest.raises(InputError, match='efficientnet_b0 checkpoint, not efficientnet_b1'):
        build_model('efficientnet_b1', weights=p)


def test_weights_for_another_arch_is_refused(tmp_path):
    p = tmp_path / 'r34.pth'
    torch.save(torchvision.models.resnet34().state_dict(), p)
    with pytest.raises(InputError, match=r"r34\.pth.*(missing|unexpected)"):
        build_model('resnet18', weights=p)
    with pytest.raises(InputError, match='r34.pth'):
        build_model('resnet50', weights=p)
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    with pytest.raises(InputError, match='junk.pth'):
        build_model('resnet18', weights=tmp_path / 'junk.pth')
    with pytest.raises(InputError, match='missing.pth'):
        build_model('resnet18', weights=tmp_path / 'missing.pth')


def test_describe_refuses_to_misdescribe():
    m = build_model('resnet18')
    with pytest.raises(ValueError):
        describe_model(m, arch='resnet50')
    with pytest.raises(ValueError):
        describe_model(m, pretrained=True)
    assert describe_model(m, 'resnet18', False, None, 0.5, None)['head'] == 'Dropout(p=0.5) -> Linear(512, 1)'
