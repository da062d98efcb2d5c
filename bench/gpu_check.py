#!/usr/bin/env python
"""GPU check: ResNet50 training-step throughput (fp32 / bf16 AMP, with and without channels_last) and the
agenb Trainer's pipeline efficiency on the GPU. Writes JSON to --out (default bench/gpu_results.json).

    python bench/gpu_check.py                 # on a CUDA machine: about 2-4 minutes
    python bench/gpu_check.py --cpu-smoke     # anywhere: tiny settings on the CPU, checks the script runs

Without a CUDA GPU (and without --cpu-smoke) it prints why and exits with status 0, writing nothing.
"""
from __future__ import annotations
import argparse, json, math, os, platform, statistics, sys, time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def summary(xs, digits=3):
    xs = [float(x) for x in xs]
    r = lambda v: round(v, digits)
    return {'median': r(statistics.median(xs)), 'min': r(min(xs)), 'max': r(max(xs)), 'n': len(xs), 'values': [r(x) for x in xs]}


def machine(torch, device):
    cpu = None
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    info = {'cpu_model': cpu or platform.processor(), 'cores': os.cpu_count(), 'python': platform.python_version(),
            'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), 'device': str(device),
            'date': datetime.now().isoformat(timespec='seconds')}
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 1024 ** 3, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def sync(torch, device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def step_throughput(torch, nn, device, arch, size, bs, dtype, channels_last, warmup, steps, repeats, log):
    "Images/s of forward + L1 + backward + AdamW step on one fixed batch already on the device."
    from agenb.model import build_model
    torch.manual_seed(0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, pretrained=False, init_bias=40.0).to(device, memory_format=mf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=mf)
    y = torch.rand(bs, device=device) * 90
    l1 = nn.L1Loss()
    def run(n):
        for _ in range(n):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = l1(model(x).squeeze(1).float(), y)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    run(warmup); sync(torch, device)
    out = []
    for r in range(repeats):
        t0 = time.perf_counter(); run(steps); sync(torch, device)
        out.append(bs * steps / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == 'cuda' else None
    del model, opt, x
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    log(f'  {arch} {size}px bs{bs} {"bf16" if dtype is not None else "fp32"}'
        f'{" channels_last" if channels_last else ""}: {statistics.median(out):.1f} images/s')
    return {'images_per_s': summary(out, 1), 'peak_memory_gib': round(peak, 2) if peak is not None else None}


def pipeline_efficiency(torch, nn, device, arch, size, bs, steps, repeats, log):
    "agenb Trainer.train_epoch on in-memory uint8 images vs the bare step with the same AMP / memory format."
    import importlib                   # agenb.trainer / agenb.options after the split of agenb.train (issue 14)
    def obj(name):
        for mod in ('agenb.trainer', 'agenb.options', 'agenb.train'):
            try: m = importlib.import_module(mod)
            except ImportError: continue
            if hasattr(m, name): return getattr(m, name)
        raise ImportError(f'{name} is in none of agenb.trainer, agenb.options, agenb.train')
    Dist, Trainer, resolve_options = obj('Dist'), obj('Trainer'), obj('resolve_options')
    from agenb.images import Preprocessing, Augmentation
    from agenb.model import build_model
    o = resolve_options(dict(image_dir='(in memory)', excel_path='(in memory)', arch=arch, pretrained=False,
                             image_size=size, batch_size=bs, epochs=1000, device=device.type, warmup_epochs=0,
                             scheduler='none', report=False))
    n = bs * steps
    # images as prepare_data leaves them: a uint8 (N, 1, S, S) tensor in host memory (content does not change the cost)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, size, size, generator=g) * 255).to(torch.uint8)
    ages = torch.rand(n, generator=g) * 90
    data = SimpleNamespace(images=images, ages=ages, idx={'train': __import__('numpy').arange(n)},
                           prep=Preprocessing(image_size=size),
                           aug=Augmentation(rotation_deg=o.rotation, translate=o.translate, brightness=o.brightness,
                                            contrast=o.contrast, hflip_p=o.hflip, vflip_p=o.vflip))
    d = Dist(device.type)
    torch.manual_seed(0)
    trainer = Trainer(o, data, d, build_model(arch, pretrained=False, dropout=o.dropout, init_bias=40.0))
    amp, cl = trainer.amp_dtype, trainer.channels_last
    mf = torch.channels_last if cl else torch.contiguous_format
    torch.manual_seed(0)
    bare = build_model(arch, pretrained=False, dropout=o.dropout, init_bias=40.0).to(device, memory_format=mf).train()
    opt = torch.optim.AdamW(bare.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    x = data.prep.normalize(images[:bs].to(device).float().div_(255)).contiguous(memory_format=mf)
    y = ages[:bs].to(device)
    l1 = nn.L1Loss()
    def bare_epoch():
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = l1(bare(x).squeeze(1).float(), y)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        sync(torch, device)
        return time.perf_counter() - t0
    def agenb_epoch():
        t0 = time.perf_counter()
        trainer.train_epoch(); trainer.epoch += 1     # ends with a reduction read back to the host: synchronised
        sync(torch, device)
        return time.perf_counter() - t0
    bare_epoch(); agenb_epoch()                       # warm-up
    tb, ta = [], []
    for r in range(repeats):
        for k in (('b', 'a') if r % 2 == 0 else ('a', 'b')):
            (tb if k == 'b' else ta).append(bare_epoch() if k == 'b' else agenb_epoch())
    eff = [b / a for a, b in zip(ta, tb)]
    log(f'  pipeline efficiency (agenb epoch / bare step): {statistics.median(eff):.3f}')
    return {'settings': {'arch': arch, 'image_size': size, 'batch_size': bs, 'steps_per_epoch': steps, 'n_images': n,
                         'amp_dtype': str(amp).replace('torch.', '') if amp else None, 'channels_last': cl,
                         'augmentation': data.aug.to_dict(), 'images_in': 'host memory, uint8 (as prepare_data leaves them)',
                         'max_grad_norm': o.max_grad_norm},
            'bare_step_images_per_s': summary([n / t for t in tb], 1),
            'agenb_epoch_images_per_s': summary([n / t for t in ta], 1),
            'pipeline_efficiency': summary(eff, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(ROOT / 'bench' / 'gpu_results.json'), help='JSON results file')
    p.add_argument('--cpu-smoke', action='store_true', help='tiny settings on the CPU: checks the script, figures meaningless')
    p.add_argument('--arch', default='resnet50')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--steps', type=int, default=30, help='timed steps per repeat')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--cudnn-benchmark', action='store_true', help='torch.backends.cudnn.benchmark = True (the trainer leaves it off)')
    a = p.parse_args(argv)
    import torch
    from torch import nn
    if a.cpu_smoke:
        device = torch.device('cpu')
        a.arch, a.image_size, a.batch_size, a.steps, a.warmup = 'resnet18', 32, 4, 2, 1
        a.repeats = 3
    elif not torch.cuda.is_available():
        print(f'gpu_check: no CUDA GPU is visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); '
              'run it on a machine with a GPU, or pass --cpu-smoke to check the script here. Nothing written.')
        return 0
    else:
        device = torch.device('cuda', 0)
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    sys.path.insert(0, str(ROOT))
    log = lambda m: print(m, flush=True)
    t0 = time.perf_counter()
    res = {'machine': machine(torch, device), 'cpu_smoke': a.cpu_smoke,
           'settings': {'arch': a.arch, 'image_size': a.image_size, 'batch_size': a.batch_size, 'steps': a.steps,
                        'warmup': a.warmup, 'repeats': a.repeats, 'optimizer': 'AdamW(lr=1e-4, wd=1e-4)', 'loss': 'L1'}}
    bf16 = torch.bfloat16
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        bf16 = torch.float16; res['note'] = 'bf16 not supported on this GPU: the AMP rows use fp16 (without GradScaler)'
    log(f'gpu_check on {res["machine"].get("gpu", device)}:')
    variants = {'fp32': (None, False), 'fp32_channels_last': (None, True), 'amp_bf16': (bf16, False),
                'amp_bf16_channels_last': (bf16, True)}
    res['step'] = {}
    for name, (dt, cl) in variants.items():
        try:
            res['step'][name] = step_throughput(torch, nn, device, a.arch, a.image_size, a.batch_size, dt, cl,
                                                a.warmup, a.steps, a.repeats, log)
        except torch.cuda.OutOfMemoryError as e:
            res['step'][name] = {'error': f'out of memory at batch {a.batch_size}: {e}'.splitlines()[0]}
            torch.cuda.empty_cache()
    base = res['step']['fp32'].get('images_per_s', {}).get('median')
    res['speedup_vs_fp32'] = {k: round(v['images_per_s']['median'] / base, 3) for k, v in res['step'].items()
                              if base and 'images_per_s' in v}
    res['efficiency'] = pipeline_efficiency(torch, nn, device, a.arch, a.image_size, a.batch_size, a.steps, a.repeats, log)
    res['pipeline_efficiency'] = res['efficiency']['pipeline_efficiency']['median']
    res['seconds'] = round(time.perf_counter() - t0, 1)
    res = {'pipeline_efficiency': res.pop('pipeline_efficiency'), 'speedup_vs_fp32': res.pop('speedup_vs_fp32'), **res}
    from agenb.core import atomic_write_json
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)
    log(f'wrote {a.out} in {res["seconds"]:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
