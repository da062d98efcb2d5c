#!/usr/bin/env python
"""agenb speed and accuracy benchmark: `python bench/run.py` (or `make bench`) -> bench/results.json and a table.

Sections (see bench/README.md for what each figure means):
  loader      users' per-epoch PIL pipeline vs agenb's decode-once cache + per-batch tensor augmentation
  efficiency  agenb Trainer.train_epoch vs the bare model step, and vs a minimal hand-written loop
  ddp         torchrun 2 CPU processes (gloo) vs 1 process, via the trainer CLI
  accuracy    the trainer CLI on the bench synthetic data set: test MAE vs the generator's oracle, the baseline and
              a plain hand-written PyTorch loop on the same split
  ensemble    an experiment's fold ensemble beside single models trained on all development subjects, over the oracle

The data sets are generated under bench/out/ and reused only while they are what the current generator writes for
the same parameters (agenb.synth.ensure_synth). results.json records the data's fingerprint, the agenb commit and
whether the tree was dirty; bench/README.md's figures are rendered from it (bench/render.py).

`--quick` runs every section with tiny settings (a smoke test of the benchmark itself, figures meaningless).
Each finished section is also written to bench/out/results_in_progress.json (removed once the results file is
written), so a failure later keeps it.
"""
from __future__ import annotations
import argparse, hashlib, json, os, platform, shutil, statistics, subprocess, sys, time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'bench' / 'out'          # git-ignored: data sets, caches, run folders
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

def agenb_obj(name):
    """An agenb function or class by name, from the module that holds it: agenb.trainer / agenb.options after the
    package's split of agenb.train (issue 14), agenb.train before."""
    import importlib
    for mod in ('agenb.trainer', 'agenb.options', 'agenb.train'):
        try: m = importlib.import_module(mod)
        except ImportError: continue
        if hasattr(m, name): return getattr(m, name)
    raise ImportError(f'{name} is in none of agenb.trainer, agenb.options, agenb.train')

def rel(p):
    "A path relative to the repository when it lies inside it (results.json must not carry this machine's paths)."
    p = Path(p).resolve()
    try: return p.relative_to(ROOT).as_posix()
    except ValueError: return str(p)

class Refused(SystemExit):
    "A bench script's refusal: exit code 2 (agenb's code for bad input); `str()` is the message, so tests can match it."
    def __init__(self, msg):
        super().__init__(2); self.msg = msg
    def __str__(self): return self.msg

def refuse(msg):
    """Stop on input a bench script cannot use (a stale run, a missing record, too few subjects): the message as one
    line on stderr, exit code 2, as agenb's own commands do, not Python's exit code 1."""
    msg = ' '.join(str(msg).split())
    print(msg, file=sys.stderr, flush=True)
    raise Refused(msg)
SECTIONS = ('loader', 'efficiency', 'ddp', 'accuracy', 'ensemble')

# Sizes: the full benchmark took 56 min on an idle 2-core CPU machine (results.json of 46bec10): about 39 min the accuracy
# trainings (agenb and the plain loop, 3 training seeds each, about 5.5 min a training, then 7 the best combination), 16 the
# fold ensemble; on a shared machine, twice that or more.
FULL = dict(
    data_preset='bench',
    loader=dict(n_images=300, workers=2, batch_size=32, image_size=224, repeats=7),
    efficiency=dict(n_images=192, image_size=128, batch_size=32, arch='resnet18', repeats=4),
    ddp=dict(image_size=64, arch='resnet18', epochs=5, batch_size=32, subjects=100, timeout=900),
    # epochs: as many as fit in budget_s, from the 1-process DDP run's epoch time (same model, size and batch)
    # 96 px, 40 epochs: with generator version 1, 64 px for 60 epochs ended further from the oracle in about the same time
    accuracy=dict(arch='resnet18', image_size=96, batch_size=32, epochs=40, budget_s=420, min_epochs=8,
                  max_epochs=60, fallback_epochs=30, lr=1e-3, warmup_epochs=2, extra=[], timeout=4 * 3600, plain_loop=True,
                  seeds=[42, 43, 44]),   # agenb and the plain loop each trained with every seed, on the first seed's split
    # the fold ensemble beside single models, as an experiment makes them: bench/defaults/augment.yaml's recipe alone
    # (64 px, 20 epochs, 5 folds x 2 seeds: the defaults' leaderboard budget), then `experiment final`; about 15 min
    ensemble=dict(spec='bench/defaults/augment.yaml', variant='recipe', workers=2, timeout=4 * 3600),
)
QUICK = dict(
    data_preset='quick',
    loader=dict(n_images=48, workers=2, batch_size=16, image_size=224, repeats=3),
    efficiency=dict(n_images=32, image_size=64, batch_size=16, arch='resnet18', repeats=3),
    ddp=dict(image_size=48, arch='resnet18', epochs=4, batch_size=16, subjects=None, timeout=300),
    accuracy=dict(arch='resnet18', image_size=48, batch_size=16, epochs='auto', budget_s=30, min_epochs=2,
                  max_epochs=3, fallback_epochs=2, lr=1e-3, warmup_epochs=0, extra=[], timeout=300, plain_loop=True,
                  combined=False, seeds=[42, 43]),
    ensemble=dict(spec='bench/defaults/augment.yaml', variant='recipe', workers=2, timeout=900, folds=2, seeds=[1],
                  base=dict(image_size=32, epochs=1)),
)
# the data sets: (folder under bench/out, agenb.synth parameters)
DATA = {'bench': ('data', dict(preset='bench')),
        'quick': ('data_quick', dict(preset='test', size=(480, 512)))}

# --------------------------------------------------------------------------- helpers

def summary(xs, digits=3):
    "Median, min, max and the raw values of repeated measurements."
    xs = [float(x) for x in xs]
    r = lambda v: round(v, digits)
    return {'median': r(statistics.median(xs)), 'min': r(min(xs)), 'max': r(max(xs)), 'n': len(xs),
            'values': [r(x) for x in xs]}

def loadavg():
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return None

def machine_info():
    import torch
    cpu = None
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    ram = None
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemTotal'): ram = round(int(line.split()[1]) / 1024 ** 2, 1); break
    except OSError: pass
    try: usable = len(os.sched_getaffinity(0))
    except AttributeError: usable = os.cpu_count()
    import torchvision
    return {'cpu_model': cpu or platform.processor() or platform.machine(), 'cores': os.cpu_count(),
            'usable_cores': usable, 'ram_gib': ram, 'platform': platform.platform(), 'python': platform.python_version(),
            'torch': torch.__version__, 'torchvision': torchvision.__version__, 'torch_threads': torch.get_num_threads(),
            'cuda_available': torch.cuda.is_available(), 'date': datetime.now().isoformat(timespec='seconds'),
            'loadavg_at_start': loadavg()}

def ensure_data(preset, data_root=None):
    """The synthetic data set the benchmark runs on: generated under bench/out/, and reused only while it is what the
    current generator writes for the same parameters (else regenerated, with a line saying why)."""
    from agenb.synth import ensure_synth
    if data_root is not None:
        root = Path(data_root)
        if not (root / 'synth_meta.json').is_file(): refuse(f'bench: {root} has no synth_meta.json; give a folder written by agenb.synth')
        return root
    name, params = DATA[preset]
    ensure_synth(OUT / name, log=lambda m: print(f'bench: {m}', flush=True), **params)
    return OUT / name

def data_record(root):
    "What results.json says about a data folder: where (relative), its fingerprint, its oracle and counts."
    from agenb.synth import data_fingerprint
    meta = json.loads((Path(root) / 'synth_meta.json').read_text())
    fp = data_fingerprint(root)
    if not fp['files_match']: print(f'bench: warning: the files in {root} differ from those its synth_meta.json records', flush=True)
    return {'dir': rel(root), 'fingerprint': fp, 'oracle_mae': meta.get('oracle_mae'),
            'oracle_mae_with_covariates': meta.get('oracle_mae_with_covariates'), 'counts': meta.get('counts')}

def data_paths(root):
    d = Path(root) / 'TA'
    return d / 'Healthy' / 'Images', d / 'characteristics.xlsx'

def trainer_options(root, **kw):
    "Fully resolved trainer options (the CLI's defaults plus `kw`) for in-process measurements."
    resolve_options = agenb_obj('resolve_options')
    image_dir, excel = data_paths(root)
    return resolve_options(dict(image_dir=str(image_dir), excel_path=str(excel), pretrained=False, device='cpu',
                                report=False, **kw))

def augmentation_of(o):
    "The Augmentation the trainer builds from options `o` (same mapping as agenb.train.prepare_data)."
    from agenb.images import Augmentation
    return Augmentation(rotation_deg=o.rotation, translate=o.translate, brightness=o.brightness,
                        contrast=o.contrast, hflip_p=o.hflip, vflip_p=o.vflip)

# --------------------------------------------------------------------------- 1. loader

class UsersDataset:
    "The users' way: PIL decode, .convert('RGB'), resize to 224, ToTensor, ImageNet normalisation, per item per epoch."
    def __init__(self, paths, size):
        import torchvision.transforms as T
        from agenb.images import IMAGENET_MEAN, IMAGENET_STD
        self.paths = paths
        self.tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    def __len__(self): return len(self.paths)
    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im: return self.tf(im.convert('RGB'))

def users_epoch(paths, cfg):
    "Seconds for one epoch of the users' DataLoader (workers start per epoch, as with persistent_workers=False)."
    import torch
    dl = torch.utils.data.DataLoader(UsersDataset(paths, cfg['image_size']), batch_size=cfg['batch_size'],
                                     shuffle=True, num_workers=cfg['workers'])
    t0 = time.perf_counter(); n = 0
    for x in dl: n += len(x)
    assert n == len(paths) and tuple(x.shape[1:]) == (3, cfg['image_size'], cfg['image_size'])
    return time.perf_counter() - t0

def agenb_batches(images, prep, aug, batch_size, gen, parts=None):
    """Seconds for one epoch of the trainer's per-batch work: index uint8 -> float -> Augmentation.apply -> normalize.
    `parts` (dict) accumulates the seconds of each stage."""
    import torch
    pc = time.perf_counter
    t0 = pc(); ti = ta = tn = 0.0
    order = torch.randperm(len(images), generator=gen)
    for i in range(0, len(images), batch_size):
        t1 = pc(); x = images[order[i:i + batch_size]].float().div_(255)
        t2 = pc(); x = aug.apply(x, gen)
        t3 = pc(); x = prep.normalize(x)
        t4 = pc(); ti += t2 - t1; ta += t3 - t2; tn += t4 - t3
    assert x.shape[1] == 3
    if parts is not None:
        for k, v in (('index_float', ti), ('augment', ta), ('normalize', tn)): parts.setdefault(k, []).append(v)
    return time.perf_counter() - t0

def bench_loader(root, cfg):
    import torch
    from agenb.images import Preprocessing, load_images
    image_dir, _ = data_paths(root)
    paths = sorted(str(p) for p in image_dir.glob('*.png'))[:cfg['n_images']]
    from PIL import Image
    with Image.open(paths[0]) as im: src_size = list(im.size[::-1])
    prep = Preprocessing(image_size=cfg['image_size'])
    aug = augmentation_of(trainer_options(root))
    gen = torch.Generator().manual_seed(0)
    cache_root = OUT / 'loader_cache'
    shutil.rmtree(cache_root, ignore_errors=True)
    from agenb.images import Augmentation
    users, cold_load, warm_load, batches, noaug, parts = [], [], [], [], [], {}
    users_epoch(paths[:cfg['batch_size']], cfg)                      # warm-up: imports, page cache
    for r in range(cfg['repeats']):
        users.append(users_epoch(paths, cfg))
        cdir = cache_root / f'r{r}'
        info = {}
        t0 = time.perf_counter()
        images = load_images(paths, prep, cache_dir=cdir, num_threads=cfg['workers'], info=info)
        cold_load.append(time.perf_counter() - t0)
        assert info['cache_misses'] == len(paths), info
        info = {}
        t0 = time.perf_counter()
        images = load_images(paths, prep, cache_dir=cdir, num_threads=cfg['workers'], info=info)
        warm_load.append(time.perf_counter() - t0)
        assert info['cache_hits'] == len(paths), info
        batches.append(agenb_batches(images, prep, aug, cfg['batch_size'], gen, parts))
        noaug.append(agenb_batches(images, prep, Augmentation(), cfg['batch_size'], gen))
    shutil.rmtree(cache_root, ignore_errors=True)
    n = len(paths)
    ips = lambda ts: summary([n / t for t in ts], 1)
    res = {
        'settings': {**cfg, 'n_images': n, 'source_size_hw': src_size, 'augmentation': aug.to_dict(),
                     'users_way': 'torch DataLoader(shuffle, num_workers=W), per item: PIL open, convert("RGB"), '
                                  'Resize((S, S)), ToTensor, Normalize(ImageNet); workers restart every epoch',
                     'agenb_way': 'load_images(paths, Preprocessing(S), cache_dir, num_threads=W) once, then per batch: '
                                  'uint8 index -> float/255 -> Augmentation.apply (trainer defaults) -> Preprocessing.normalize',
                     'main_process_torch_threads': torch.get_num_threads()},
        'users_images_per_s': ips(users),
        'agenb_cold_decode_images_per_s': ips(cold_load),
        'agenb_warm_cache_load_images_per_s': ips(warm_load),
        'agenb_batches_images_per_s': ips(batches),
        # a whole first epoch: load (cold or warm cache) + one pass of per-batch work
        'agenb_cold_first_epoch_images_per_s': ips([a + b for a, b in zip(cold_load, batches)]),
        'agenb_warm_first_epoch_images_per_s': ips([a + b for a, b in zip(warm_load, batches)]),
        'agenb_later_epochs_images_per_s': ips(batches),
        # like for like with the users' way (which augments nothing): the same work without the augmentation
        'agenb_no_augmentation_batches_images_per_s': ips(noaug),
        'agenb_no_augmentation_warm_first_epoch_images_per_s': ips([a + b for a, b in zip(warm_load, noaug)]),
        'agenb_batch_stage_ms_per_image': {k: summary([1000 * t / n for t in v], 3) for k, v in parts.items()},
    }
    pair = lambda ts: summary([u / t for u, t in zip(users, ts)], 2)
    res['speedup_warm_first_epoch'] = pair([a + b for a, b in zip(warm_load, batches)])
    res['speedup_cold_first_epoch'] = pair([a + b for a, b in zip(cold_load, batches)])
    res['speedup_later_epochs'] = pair(batches)
    res['speedup_warm_first_epoch_no_augmentation'] = pair([a + b for a, b in zip(warm_load, noaug)])
    res['speedup_later_epochs_no_augmentation'] = pair(noaug)
    return res

# --------------------------------------------------------------------------- 2 + 3. efficiency and overhead

def bench_efficiency(root, cfg):
    import torch
    from torch import nn
    Dist, Trainer, prepare_data, build_optimizer = (agenb_obj(n) for n in ('Dist', 'Trainer', 'prepare_data', 'build_optimizer'))
    from agenb.model import build_model
    bs, n = cfg['batch_size'], cfg['n_images'] - cfg['n_images'] % cfg['batch_size']
    o = trainer_options(root, arch=cfg['arch'], image_size=cfg['image_size'], batch_size=bs, epochs=1000,
                        num_workers=2, cache_dir=str(OUT / 'cache'), warmup_epochs=0, scheduler='none')
    d = Dist('cpu')
    data = prepare_data(o)
    data.idx['train'] = data.idx['train'][:n]                     # a fixed number of whole batches
    assert len(data.idx['train']) == n
    train_ages = data.ages[data.idx['train']]
    mean_age = float(train_ages.mean())

    def fresh_model():
        torch.manual_seed(o.seed)
        return build_model(o.arch, pretrained=False, dropout=o.dropout, init_bias=mean_age)

    trainer = Trainer(o, data, d, fresh_model())

    # bare step: forward + backward + optimizer step on one fixed random batch, no data work at all
    bare_model = fresh_model().train()
    bare_opt = build_optimizer(o, bare_model.parameters())
    xb = torch.randn(bs, 3, o.image_size, o.image_size)
    yb = train_ages[:bs].clone()
    l1 = nn.L1Loss()
    def bare_epoch():
        t0 = time.perf_counter()
        for _ in range(n // bs):
            loss = l1(bare_model(xb).squeeze(1), yb)
            loss.backward(); bare_opt.step(); bare_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    # minimal hand-written loop: same data in memory, augmentation, optimizer, clipping and loss logging
    hand_model = fresh_model()
    hand_opt = build_optimizer(o, hand_model.parameters())
    images, ages, idx = data.images, data.ages, torch.as_tensor(data.idx['train'])
    aug, prep = data.aug, data.prep
    gen = torch.Generator().manual_seed(1)
    def hand_epoch():
        hand_model.train()
        t0 = time.perf_counter(); total = 0.0
        perm = idx[torch.randperm(n, generator=gen)]
        for i in range(0, n, bs):
            b = perm[i:i + bs]
            x = prep.normalize(aug.apply(images[b].float().div_(255), gen))
            loss = l1(hand_model(x).squeeze(1), ages[b])
            loss.backward()
            nn.utils.clip_grad_norm_(hand_model.parameters(), o.max_grad_norm)
            hand_opt.step(); hand_opt.zero_grad(set_to_none=True)
            total += loss.item() * len(b)
        return time.perf_counter() - t0

    def agenb_epoch():
        t0 = time.perf_counter()
        trainer.train_epoch()
        trainer.epoch += 1
        return time.perf_counter() - t0

    runs = {'bare': bare_epoch, 'hand': hand_epoch, 'agenb': agenb_epoch}
    for f in runs.values(): f()                                   # warm-up (allocator, first-call costs)
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(cfg['repeats']):                               # interleaved, rotating order: drift hits all alike
        for k in order[r % 3:] + order[:r % 3]: times[k].append(runs[k]())
    ips = lambda ts: summary([n / t for t in ts], 2)
    return {
        'settings': {**cfg, 'n_images': n, 'steps_per_epoch': n // bs, 'optimizer': o.optimizer, 'lr': o.lr,
                     'weight_decay': o.weight_decay, 'max_grad_norm': o.max_grad_norm, 'loss': o.loss,
                     'augmentation': data.aug.to_dict(), 'torch_threads': torch.get_num_threads(),
                     'bare_step': 'fixed random (B,3,S,S) batch in memory; forward + L1 + backward + AdamW step; no clipping',
                     'hand_loop': 'randperm, index uint8, /255, Augmentation.apply, normalize, forward, L1, backward, '
                                  'clip_grad_norm_, AdamW step, loss.item()',
                     'agenb': 'agenb.train.Trainer.train_epoch (prepare_data in memory, default augmentation)'},
        'bare_step_images_per_s': ips(times['bare']),
        'hand_loop_images_per_s': ips(times['hand']),
        'agenb_epoch_images_per_s': ips(times['agenb']),
        'pipeline_efficiency': summary([b / a for a, b in zip(times['agenb'], times['bare'])], 3),
        'trainer_overhead': summary([a / h for a, h in zip(times['agenb'], times['hand'])], 3),
    }

# --------------------------------------------------------------------------- CLI runs (ddp, accuracy)

def run_cli(cmd, env_extra, log_path, timeout):
    "Run a trainer command line; returns the run folder it printed. Output goes to `log_path`."
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
    env = {**os.environ, **env_extra, 'PYTHONUNBUFFERED': '1', 'PYTHONPATH': path}   # this checkout's agenb
    t0 = time.perf_counter()
    with open(log_path, 'w') as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
    log_text = p.stdout
    Path(log_path).with_suffix('.stdout').write_text(log_text)
    if p.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} exited {p.returncode}; see {log_path}')
    lines = [l for l in log_text.strip().splitlines() if l.strip()]
    return Path(lines[-1].strip()), time.perf_counter() - t0

def train_cmd(root, out_dir, name, **opts):
    image_dir, excel = data_paths(root)
    cmd = ['-m', 'agenb.train', '--image-dir', str(image_dir), '--excel-path', str(excel), '--no-pretrained',
           '--device', 'cpu', '--no-report', '--checkpoint-every', '0', '--plot-interval', '100000',
           '--cache-dir', str(OUT / 'cache'), '--output-dir', str(out_dir), '--run-name', name]
    for k, v in opts.items():
        flag = '--' + k.replace('_', '-')
        if isinstance(v, bool): cmd.append(flag if v else '--no-' + flag[2:])
        else: cmd += [flag, str(v)]
    return cmd

def ddp_data(root, cfg):
    "A smaller data set of the same kind for the DDP runs (same generator, fewer subjects), or `root` itself."
    from agenb.synth import ensure_synth
    if not cfg.get('subjects'): return Path(root)
    d = OUT / f'data_ddp_{cfg["subjects"]}'
    ensure_synth(d, subjects=cfg['subjects'], pathological=0, size=(480, 512), log=lambda m: print(f'bench: {m}', flush=True))
    return d

def bench_ddp(root, cfg):
    root = ddp_data(root, cfg)
    out_dir = OUT / 'ddp_runs'
    shutil.rmtree(out_dir, ignore_errors=True)
    common = dict(arch=cfg['arch'], image_size=cfg['image_size'], epochs=cfg['epochs'], patience=0,
                  warmup_epochs=0)
    res = {'data': data_record(root), 'settings': {**cfg, 'data_dir': rel(root), 'backend': 'gloo', 'launcher': 'torchrun --standalone --nproc_per_node=2',
                        'same_effective_batch': True,
                        'throughput': 'training images / epoch_seconds from history.json (the epoch includes its '
                                      'validation pass, sharded over the ranks); epoch 1 excluded (warm-up)'}}
    # 1 process: both cores as intra-op threads; 2 processes: one thread each, half the batch each
    variants = {
        '1proc': ([sys.executable] + train_cmd(root, out_dir, 'p1', batch_size=cfg['batch_size'], num_workers=2, **common),
                  {'OMP_NUM_THREADS': '2'}),
        '2proc': ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
                  + train_cmd(root, out_dir, 'p2', batch_size=cfg['batch_size'] // 2, num_workers=1, **common),
                  {'OMP_NUM_THREADS': '1'}),   # train_cmd starts with `-m agenb.train`: torchrun's --module
    }
    ips = {}
    for k, (cmd, env) in variants.items():
        run_dir, wall = run_cli(cmd, env, OUT / f'ddp_{k}.log', cfg['timeout'])
        hist = json.loads((run_dir / 'history.json').read_text())
        conf = json.loads((run_dir / 'config.json').read_text())
        n_train = conf['dataset']['train_samples']
        secs = [h['epoch_seconds'] for h in hist]
        ips[k] = [n_train / s for s in secs[1:]]
        res[k] = {'omp_num_threads': int(env['OMP_NUM_THREADS']), 'world_size': conf['world_size'],
                  'n_images': conf['dataset'].get('total_samples'),
                  'batch_size_per_process': conf['training']['batch_size'],
                  'effective_batch_size': conf['training']['effective_batch_size'], 'n_train': n_train,
                  'epoch_seconds': [round(s, 2) for s in secs], 'images_per_s': summary(ips[k], 1),
                  'wall_seconds_incl_startup': round(wall, 1), 'run_dir': str(run_dir.relative_to(ROOT))}
    res['ddp_speedup'] = summary([b / a for a, b in zip(ips['1proc'], ips['2proc'])], 3)
    return res

def accuracy_epochs(root, cfg, res):
    "The accuracy run's epochs: fixed, or as many as fit in the time budget at the 1-process DDP run's epoch time."
    if cfg['epochs'] != 'auto': return cfg['epochs'], 'fixed'
    d = res.get('ddp', {}).get('1proc')
    same = d and all(res['ddp']['settings'][k] == cfg[k] for k in ('arch', 'image_size', 'batch_size'))
    if not same: return cfg['fallback_epochs'], 'fixed fallback (no 1-process DDP run with the same model, size and batch)'
    # the fastest epoch after the first: the machine's speed (a busy spell in one epoch would not shorten the run)
    secs = min(d['epoch_seconds'][1:]) * 1.05                        # + a little for checkpoints between epochs
    n_acc = json.loads((Path(root) / 'synth_meta.json').read_text())['counts']['TA']['Healthy']['images']
    secs *= n_acc / d['n_images']                                    # the DDP data set may be smaller: scale
    n = max(cfg['min_epochs'], min(cfg['max_epochs'], int(cfg['budget_s'] // secs)))
    return n, f'{cfg["budget_s"]} s budget / {secs:.1f} s per epoch (fastest epoch of the 1-process DDP run, scaled to {n_acc} images), clamped to [{cfg["min_epochs"]}, {cfg["max_epochs"]}]'

def bench_accuracy(root, cfg, res=None):
    import pandas as pd
    out_dir = OUT / 'accuracy_runs'
    shutil.rmtree(out_dir, ignore_errors=True)
    epochs, why = accuracy_epochs(root, cfg, res or {})
    seeds = list(cfg.get('seeds') or [42])
    print(f'bench: accuracy run with {epochs} epochs ({why}), seed {seeds[0]}', flush=True)
    run_dir, wall = accuracy_run(root, cfg, out_dir, epochs, seeds[0])
    m = json.loads((run_dir / 'metrics.json').read_text())
    conf = json.loads((run_dir / 'config.json').read_text())
    hist = json.loads((run_dir / 'history.json').read_text())
    meta = json.loads((Path(root) / 'synth_meta.json').read_text())
    # the oracles on exactly the test images (synth_latents.csv holds their predictions for every image)
    pred = pd.read_csv(run_dir / 'predictions.csv')
    lat = pd.read_csv(Path(root) / 'synth_latents.csv')
    lat = lat[(lat.muscle == 'TA') & (lat.cohort == 'Healthy')][['filename', 'oracle_pred', 'oracle_pred_cov']]
    j = pred.merge(lat, on='filename', how='left')
    assert j.oracle_pred.notna().all() and len(j) == len(pred)
    oracle_test = float((j.oracle_pred - j.age).abs().mean())
    oracle_cov_test = float((j.oracle_pred_cov - j.age).abs().mean())
    mae, base = m['overall']['mae'], m['baseline']['mae']
    a = conf['args']
    out = {
        'settings': {k: a[k] for k in ('arch', 'pretrained', 'image_size', 'batch_size', 'epochs', 'lr', 'weight_decay',
                                       'optimizer', 'scheduler', 'warmup_epochs', 'max_grad_norm', 'patience', 'loss',
                                       'rotation', 'translate', 'brightness', 'contrast', 'hflip', 'vflip', 'dropout',
                                       'seed', 'deterministic')},
        'epochs_chosen_by': why,
        'recipe': 'mae recipe (AdamW, warmup + cosine, clipping 1.0, L1) with the settings above; ImageNet weights '
                  'are not reachable offline, so the model starts from scratch',
        'environment': ACCURACY_ENV,
        'n_test_images': m['n_images'], 'n_test_subjects': m['n_subjects'],
        'test_mae': round(mae, 3), 'test_rmse': round(m['overall']['rmse'], 3),
        'test_pearson_r': m['overall'].get('pearson_r'),
        'subject_level_mae': (m.get('subject_level') or {}).get('mae'),
        'bias_corrected_mae': (m.get('corrected') or {}).get('mae'),
        'best_epoch': conf.get('best_epoch'), 'best_val_mae': conf.get('best_val_mae'),
        'epochs_completed': conf.get('epochs_completed'), 'stop_reason': conf.get('stop_reason'),
        'val_mae_per_epoch': [round(h['val_mae'], 2) for h in hist],
        'median_epoch_seconds': round(statistics.median(h['epoch_seconds'] for h in hist), 2),
        'wall_seconds': round(wall, 1),
        'oracle_mae_all_images': round(meta['oracle_mae'], 3), 'oracle_mae_test_images': round(oracle_test, 3),
        'oracle_mae_with_covariates_test_images': round(oracle_cov_test, 3),
        'baseline_mae': round(base, 3), 'baseline': m['baseline'],
        'mae_over_oracle': round(mae / oracle_test, 3), 'mae_over_oracle_all_images': round(mae / meta['oracle_mae'], 3),
        'mae_over_baseline': round(mae / base, 3), 'run_dir': rel(run_dir),
    }
    j = j.assign(oracle=j.oracle_pred)
    if cfg.get('plain_loop'):
        print(f'bench: plain PyTorch loop on the same split, {epochs} epochs, seed {seeds[0]} ...', flush=True)
        p = plain_loop_subprocess(run_dir, out['settings'], cfg['timeout'], seeds[0])
        plain = p.pop('predictions')
        assert p['n_test_images'] == m['n_images'], (p['n_test_images'], m['n_images'])
        j['plain'] = j.filename.map(plain)
        assert j.plain.notna().all()
        out['plain_loop'] = p
        out['mae_over_plain_loop'] = round(mae / p['test_mae'], 3)
        out['plain_loop_over_oracle'] = round(p['test_mae'] / oracle_test, 3)
    out['ratio_ci95'] = ratio_ci(j, [c for c in ('oracle', 'plain') if c in j])
    if len(seeds) > 1: out['seeds'] = more_seeds(root, cfg, out_dir, epochs, seeds, run_dir, out, j)
    if cfg.get('combined', True): out['combined'] = combined_row(cfg, epochs, run_dir)
    return out

def accuracy_run(root, cfg, out_dir, epochs, seed, split_file=None):
    "One agenb training of the accuracy section: (run folder, wall seconds)."
    opts = dict(arch=cfg['arch'], image_size=cfg['image_size'], batch_size=cfg['batch_size'], epochs=epochs,
                lr=cfg['lr'], warmup_epochs=cfg['warmup_epochs'], num_workers=2, loss='mae', deterministic=True, seed=seed)
    if split_file: opts['split_file'] = split_file
    opts.update(cfg.get('options', {}))
    name, log = ('acc', 'accuracy.log') if split_file is None else (f'acc_s{seed}', f'accuracy_s{seed}.log')
    cmd = [sys.executable] + train_cmd(root, out_dir, name, **opts) + list(cfg.get('extra', []))
    return run_cli(cmd, ACCURACY_ENV, OUT / log, cfg['timeout'])

def more_seeds(root, cfg, out_dir, epochs, seeds, first_run, first, j):
    """agenb and the plain loop trained again with each further seed, on the first run's split (its split.csv), and
    the two ratios over all seeds: the mean test MAE over seeds / the other's, with intervals that resample each side's
    seeds and the test subjects (agenb.stats.boot_means): the training's noise as well as the test set's."""
    per_seed = [{'seed': seeds[0], 'test_mae': first['test_mae'], 'best_epoch': first['best_epoch'],
                 'best_val_mae': first['best_val_mae'], 'wall_seconds': first['wall_seconds'], 'run_dir': first['run_dir'],
                 **({'plain_test_mae': first['plain_loop']['test_mae'], 'plain_best_epoch': first['plain_loop']['best_epoch'],
                     'plain_best_val_mae': first['plain_loop']['best_val_mae']} if 'plain_loop' in first else {})}]
    errs = {'agenb': [j.pred], 'plain': [j.plain] if 'plain' in j else []}
    for seed in seeds[1:]:
        print(f'bench: accuracy, seed {seed}: agenb, then the plain loop, on the split of seed {seeds[0]} ...', flush=True)
        run_dir, wall = accuracy_run(root, cfg, out_dir, epochs, seed, split_file=Path(first_run) / 'split.csv')
        conf = json.loads((run_dir / 'config.json').read_text())
        pred = pd.read_csv(run_dir / 'predictions.csv').set_index('filename').pred
        assert set(pred.index) == set(j.filename), 'another seed predicted other test images'
        errs['agenb'].append(j.filename.map(pred))
        row = {'seed': seed, 'test_mae': round(float((errs['agenb'][-1] - j.age).abs().mean()), 3),
               'best_epoch': conf.get('best_epoch'), 'best_val_mae': round(conf['best_val_mae'], 3), 'wall_seconds': round(wall, 1),
               'run_dir': rel(run_dir)}
        if cfg.get('plain_loop'):
            p = plain_loop_subprocess(run_dir, first['settings'], cfg['timeout'], seed)
            errs['plain'].append(j.filename.map(p.pop('predictions')))
            row.update(plain_test_mae=p['test_mae'], plain_best_epoch=p['best_epoch'], plain_best_val_mae=p['best_val_mae'])
        per_seed.append(row)
    cubes = {k: np.stack([subject_error_sums(j, e) for e in v]) for k, v in errs.items() if v}
    cubes['oracle'] = subject_error_sums(j, j.oracle)[None]
    out = {'seeds': seeds, 'per_seed': per_seed, **seeds_ratios(cubes),
           'test_mae_mean': round(float(np.mean([r['test_mae'] for r in per_seed])), 3)}
    if errs['plain']: out['plain_test_mae_mean'] = round(float(np.mean([r['plain_test_mae'] for r in per_seed])), 3)
    return out

def subject_error_sums(j, pred):
    "Per test subject (sorted by id), the sum of the absolute errors of `pred` over its images."
    ids, inv = np.unique(j.subject.astype(str).to_numpy(), return_inverse=True)
    return np.bincount(inv, np.abs(np.asarray(pred, dtype=float) - j.age.to_numpy()), minlength=len(ids))

def seeds_ratios(cubes, n_boot=2000, seed=0):
    """agenb's image-level MAE over the plain loop's and over the oracle's, each averaged over its training seeds, with
    95% intervals from agenb.stats.boot_means (each side's seeds resampled on their own, the test subjects resampled
    together: paired). `cubes`: {'agenb'|'plain'|'oracle': (seeds, subjects) per-subject error sums}."""
    from agenb.stats import boot_means, percentile_interval
    names = list(cubes)
    M = dict(zip(names, boot_means(cubes, n_boot, seed)))
    out = {'method': f'{n_boot} bootstrap resamples: each predictor\'s training seeds drawn with replacement on their own, '
                     f'the {cubes["agenb"].shape[1]} test subjects drawn once for all (seed {seed}); percentile interval'}
    for o, key in (('plain', 'mae_over_plain_loop'), ('oracle', 'mae_over_oracle')):
        if o not in cubes: continue
        out[key] = round(float(cubes['agenb'].mean(0).sum() / cubes[o].mean(0).sum()), 3)
        out[key + '_ci95'] = [round(x, 3) for x in percentile_interval(M['agenb'] / M[o])]
    return out

def combined_row(cfg, epochs, plain_run):
    """The best combination of issue 16's models table (bench/models_results.json: the techniques that beat plain on
    validation) trained at this section's settings, on the plain run's split (by subject), with the numbers of that
    table: test and subject-level MAE, 45-64 MAE, slope, and the oracle on the same test images."""
    mr = ROOT / 'bench' / 'models_results.json'
    if not mr.is_file(): return {'skipped': 'bench/models_results.json is missing: run bench/models_bench.py first'}
    import models_bench as M
    table = json.loads(mr.read_text())
    names, opts = table.get('combined_of') or [], dict(table.get('combined_options') or {})
    if not names: return {'skipped': 'in bench/models_results.json no technique beat plain on validation'}
    if 'subject_views' in names: opts['batch_size'] = max(1, cfg['batch_size'] // opts['subject_views'])
    root = M.ensure_data()
    out_dir = OUT / 'accuracy_runs'
    budget = dict(arch=cfg['arch'], image_size=cfg['image_size'], batch_size=cfg['batch_size'], epochs=epochs, lr=cfg['lr'],
                  warmup_epochs=cfg['warmup_epochs'], seed=42)
    print(f'bench: accuracy, best combination of the models table ({"+".join(names)}), {epochs} epochs ...', flush=True)
    cmd = M.command(root, out_dir, 'acc_combined', budget, opts, split_file=Path(plain_run) / 'split.csv')
    run_dir, wall = run_cli(cmd, ACCURACY_ENV, OUT / 'accuracy_combined.log', cfg['timeout'])
    return {'of': names, 'options': opts, 'chosen_by': table.get('chosen_by'), 'data': rel(root), **M.row_result(run_dir, root, wall)}

def ratio_ci(j, others, n_boot=2000, seed=0):
    """95% intervals of agenb's test MAE / another predictor's MAE on the same test images, by a bootstrap over test
    subjects (agenb.stats.ratio_ci: both predictors resampled together: the test set's own noise, not the training's)."""
    from agenb.stats import ratio_ci as paired_ratio
    e_a = subject_error_sums(j, j.pred)                             # per-subject sums: the image counts cancel in the ratio
    out = {'method': f'{n_boot} bootstrap resamples of the {len(e_a)} test subjects (seed {seed}), percentile interval'}
    for o in others:
        _, lo, hi = paired_ratio(e_a, subject_error_sums(j, j[o]), n_boot, seed)
        out[{'oracle': 'mae_over_oracle', 'plain': 'mae_over_plain_loop'}[o]] = [round(lo, 3), round(hi, 3)]
    return out

def bench_ensemble(root, cfg):
    """The fold ensemble beside single models, made as a user makes them: an agenb experiment of one variant of a
    defaults spec (`cfg['spec']`, its data replaced by this bench's), cross-validated, then its test set opened once by
    `python -m agenb.experiment final`: single models trained on all development subjects (one per training seed) and
    the ensemble of the fold models, each scored on the test images against the oracle (`ensemble_figures`)."""
    import yaml
    from agenb.exp_db import read_experiment
    exp_dir = OUT / 'exp_ensemble'
    shutil.rmtree(exp_dir, ignore_errors=True)
    spec = yaml.safe_load((ROOT / cfg['spec']).read_text())
    image_dir, excel = data_paths(root)
    variants = [v for v in spec['variants'] if v['name'] == cfg['variant']]
    assert len(variants) == 1, f'{cfg["spec"]} has no variant {cfg["variant"]}'
    spec.update(name='bench_ensemble', variants=variants, data={'image_dir': str(image_dir), 'excel_path': str(excel)},
                base={**spec['base'], **cfg.get('base', {})}, **{k: cfg[k] for k in ('folds', 'seeds') if k in cfg})
    spec['baseline'] = cfg['variant']
    spec_path = OUT / 'ensemble_spec.yaml'
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    py = [sys.executable, '-m', 'agenb.experiment']
    print(f'bench: ensemble: {len(spec["seeds"])} seed(s) x {spec["folds"]} folds of {cfg["variant"]} ({cfg["spec"]}) ...', flush=True)
    # the experiment's own thread rule (cores / workers per job, agenb.experiment), as a user's run and the defaults'
    # leaderboards have it: the same seed on other thread counts trains other models (config.json: environment.threads)
    run_cli(py + ['run', str(spec_path), '--out', str(exp_dir), '--workers', str(cfg['workers'])], {},
            OUT / 'ensemble_run.log', cfg['timeout'])
    print('bench: ensemble: experiment final (the test set opened once) ...', flush=True)
    run_cli(py + ['final', str(exp_dir), '--variant', cfg['variant']], {}, OUT / 'ensemble_final.log', cfg['timeout'])
    final = read_experiment(exp_dir)['finals'][cfg['variant']]
    threads = {json.dumps(json.loads((p / 'config.json').read_text())['environment'].get('threads'), sort_keys=True)
               for p in exp_dir.glob('runs/*/run_*')}
    return {'spec': cfg['spec'], 'variant': cfg['variant'], 'fold_run_threads': sorted(map(json.loads, threads), key=str),
            'oof_subject_mae': round(float(pd.read_csv(exp_dir / 'leaderboard.csv').subject_mae.iloc[0]), 3),
            'options': {**spec['base'], **{k: v for k, v in variants[0].items() if k != 'name'}},
            'folds': spec['folds'], 'seeds': spec['seeds'], 'exp_dir': rel(exp_dir),
            **ensemble_figures(exp_dir, final, root)}

def ensemble_figures(exp_dir, final, root, n_boot=2000, seed=0):
    """From `experiment final`'s record `final`: the image-level test MAE of the single models (mean over their seeds)
    and of the fold ensemble, each over the oracle's on the same test images, with 95% intervals (seeds_ratios: the
    single models' seeds and the test subjects resampled); and the ensemble minus the single models, per test subject,
    as `final` computed it (agenb.stats.paired_difference)."""
    lat = pd.read_csv(Path(root) / 'synth_latents.csv', dtype={'subject': str})
    lat = lat[(lat.muscle == 'TA') & (lat.cohort == 'Healthy')].set_index('filename').oracle_pred
    read = lambda d: pd.read_csv(Path(exp_dir) / d / 'predictions.csv', dtype={'subject': str}).sort_values('filename')
    ens = read(final['ensemble']['dir']).reset_index(drop=True)
    singles = [read(s['run_dir']).set_index('filename').pred for s in final['single']]
    assert all(set(s.index) == set(ens.filename) for s in singles), 'the single models predicted other test images'
    j = ens[['filename', 'subject', 'age']].assign(oracle=ens.filename.map(lat))
    assert j.oracle.notna().all(), 'a test image is missing from synth_latents.csv'
    mae = lambda pred: round(float((np.asarray(pred, dtype=float) - j.age).abs().mean()), 3)
    sums = lambda pred: subject_error_sums(j, pred)
    oracle = sums(j.oracle)[None]
    single = seeds_ratios({'agenb': np.stack([sums(j.filename.map(s)) for s in singles]), 'oracle': oracle}, n_boot, seed)
    fold = seeds_ratios({'agenb': sums(ens.pred)[None], 'oracle': oracle}, n_boot, seed)
    d = final['ensemble_vs_single']
    return {'n_test_images': len(j), 'n_test_subjects': int(j.subject.nunique()), 'test_filenames_sha256':
            hashlib.sha256('\n'.join(sorted(j.filename)).encode()).hexdigest(),
            'oracle_test_mae': mae(j.oracle),
            'single': {'n_models': len(singles), 'seeds': [s['seed'] for s in final['single']],
                       'test_mae_per_seed': [mae(j.filename.map(s)) for s in singles],
                       'test_mae': round(float(np.mean([mae(j.filename.map(s)) for s in singles])), 3),
                       'mae_over_oracle': single['mae_over_oracle'], 'mae_over_oracle_ci95': single['mae_over_oracle_ci95'],
                       'test_subject_mae': round(final['single_mean'], 3)},
            'fold_ensemble': {'n_models': final['ensemble']['n_models'], 'test_mae': mae(ens.pred),
                              'mae_over_oracle': fold['mae_over_oracle'], 'mae_over_oracle_ci95': fold['mae_over_oracle_ci95'],
                              'test_subject_mae': round(final['ensemble']['test_subject_mae'], 3)},
            'ensemble_minus_single_subject_mae': {k: round(d[k], 3) for k in ('diff', 'ci_low', 'ci_high')},
            'method': single['method'].replace("each predictor's", "the single models'"), 'opening': final['opening']}

# The accuracy runs' threads: as many as cores (the figures depend on the thread count, so it is fixed and recorded),
# and OpenMP threads that sleep rather than spin while they wait: the same arithmetic, so the same figures, but a
# busy machine slows the run down in proportion instead of stalling it (spinning threads oversubscribe the cores).
ACCURACY_ENV = {'OMP_NUM_THREADS': str(os.cpu_count() or 1), 'OMP_WAIT_POLICY': 'PASSIVE'}

def plain_loop_subprocess(run_dir, settings, timeout, seed=0):
    "`plain_loop` in a fresh process with ACCURACY_ENV (OpenMP reads it only at start)."
    res = OUT / 'plain_loop.json'
    res.unlink(missing_ok=True)
    env = {**os.environ, **ACCURACY_ENV, 'PYTHONUNBUFFERED': '1'}
    with open(OUT / 'plain_loop.log', 'w') as log:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--plain-loop-child', str(run_dir),
                            json.dumps(settings), str(res), str(seed)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout)
    if p.returncode: raise RuntimeError(f'the plain loop exited {p.returncode}; see {OUT / "plain_loop.log"}')
    return json.loads(res.read_text())

PLAIN_LOOP = ('torchvision resnet18 (weights=None, fc -> Linear(512, 1)); images: PIL open, convert("RGB"), Resize((S, S)), '
              'ToTensor, Normalize(ImageNet), decoded once into memory; no augmentation; L1Loss; AdamW (lr, weight decay '
              'as agenb); CosineAnnealingLR(T_max=epochs) stepped per epoch, no warmup, no clipping; batches from a seeded '
              'randperm (a final batch of 1 image is skipped: batch norm needs 2); the epoch with the lowest validation '
              'MAE is kept and scored on the test images; the agenb run\'s split.csv gives the train/val/test images')

def plain_loop(run_dir, settings, seed=0):
    """What a user would write by hand: a plain PyTorch loop on the agenb run's own split (its split.csv), with the
    same model, image size, batch size, epochs, learning rate and weight decay, and no augmentation."""
    import copy, torch, torchvision
    import pandas as pd
    import torchvision.transforms as T
    from torch import nn
    from PIL import Image
    t_start = time.perf_counter()
    S, bs, epochs = settings['image_size'], settings['batch_size'], settings['epochs']
    split = pd.read_csv(Path(run_dir) / 'split.csv', dtype={'subject': str})
    tf = T.Compose([T.Resize((S, S)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    def load(part):
        d = split[split.split == part]
        xs = []
        for path in d.path:
            with Image.open(ROOT / path) as im: xs.append(tf(im.convert('RGB')))
        return torch.stack(xs), torch.tensor(d.age.to_numpy(), dtype=torch.float32)
    (xtr, ytr), (xva, yva), (xte, yte) = (load(s) for s in ('train', 'val', 'test'))
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(int(ACCURACY_ENV['OMP_NUM_THREADS'])); torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None)
        model.fc = nn.Linear(model.fc.in_features, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=settings['lr'], weight_decay=settings['weight_decay'])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn, gen = nn.L1Loss(), torch.Generator().manual_seed(seed)
        def mae(x, y):
            model.eval()
            with torch.no_grad(): p = torch.cat([model(x[i:i + 256]).squeeze(1) for i in range(0, len(x), 256)])
            return float((p - y).abs().mean())
        best, best_epoch, best_state, val_hist, secs = float('inf'), None, None, [], []
        for ep in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(perm), bs):
                b = perm[i:i + bs]
                if len(b) < 2: continue
                loss = loss_fn(model(xtr[b]).squeeze(1), ytr[b])
                opt.zero_grad(); loss.backward(); opt.step()
            sched.step()
            v = mae(xva, yva); val_hist.append(round(v, 2)); secs.append(time.perf_counter() - t0)
            if v < best: best, best_epoch, best_state = v, ep, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        test = mae(xte, yte)
        model.eval()
        with torch.no_grad(): pte = torch.cat([model(xte[i:i + 256]).squeeze(1) for i in range(0, len(xte), 256)])
    finally:
        torch.set_num_threads(threads); torch.use_deterministic_algorithms(det)
    return {'what': PLAIN_LOOP, 'seed': seed, 'torch_threads': int(ACCURACY_ENV['OMP_NUM_THREADS']),
            'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
            'n_train_images': len(xtr), 'n_val_images': len(xva), 'n_test_images': len(xte),
            'test_mae': round(test, 3), 'best_epoch': best_epoch, 'best_val_mae': round(best, 3),
            'val_mae_per_epoch': val_hist, 'median_epoch_seconds': round(statistics.median(secs), 2),
            'wall_seconds': round(time.perf_counter() - t_start, 1),
            'predictions': dict(zip(split[split.split == 'test'].filename, pte.tolist()))}

# --------------------------------------------------------------------------- report

def print_table(res):
    rows = []
    def add(name, s, unit=''):
        if s is None: return
        rows.append((name, f"{s['median']:.3g}{unit}", f"{s['min']:.3g} .. {s['max']:.3g}", str(s['n'])))
    L = res.get('loader')
    if L:
        add('loader: users\' way, images/s', L['users_images_per_s'])
        add('loader: agenb cold cache, first epoch, images/s', L['agenb_cold_first_epoch_images_per_s'])
        add('loader: agenb warm cache, first epoch, images/s', L['agenb_warm_first_epoch_images_per_s'])
        add('loader: agenb later epochs, images/s', L['agenb_later_epochs_images_per_s'])
        add('loader speedup, warm cache, first epoch, with augmentation', L['speedup_warm_first_epoch'], 'x')
        add('loader speedup, cold cache', L['speedup_cold_first_epoch'], 'x')
        add('loader speedup, later epochs', L['speedup_later_epochs'], 'x')
        add('loader speedup, warm cache, no augmentation (like for like)', L['speedup_warm_first_epoch_no_augmentation'], 'x')
        add('loader_speedup: later epochs, no augmentation (like for like)', L['speedup_later_epochs_no_augmentation'], 'x')
        for k, v in L['agenb_batch_stage_ms_per_image'].items(): add(f'  agenb per-batch stage {k}, ms/image', v)
    E = res.get('efficiency')
    if E:
        add('bare model step, images/s', E['bare_step_images_per_s'])
        add('hand-written loop, images/s', E['hand_loop_images_per_s'])
        add('agenb Trainer.train_epoch, images/s', E['agenb_epoch_images_per_s'])
        add('pipeline_efficiency (agenb / bare)', E['pipeline_efficiency'])
        add('trainer_overhead (agenb time / hand time)', E['trainer_overhead'])
    D = res.get('ddp')
    if D:
        add('DDP 1 process (OMP 2), images/s', D['1proc']['images_per_s'])
        add('DDP 2 processes (OMP 1 each), images/s', D['2proc']['images_per_s'])
        add('ddp_speedup (2 / 1)', D['ddp_speedup'], 'x')
    A = res.get('accuracy')
    if A:
        rows.append(('test MAE (years)', f"{A['test_mae']:.3f}", '', '1'))
        rows.append(('oracle MAE, test images / all images', f"{A['oracle_mae_test_images']:.3f} / {A['oracle_mae_all_images']:.3f}", '', ''))
        rows.append(('baseline MAE (train mean)', f"{A['baseline_mae']:.3f}", '', ''))
        rows.append(('mae_over_oracle / mae_over_baseline', f"{A['mae_over_oracle']:.3f} / {A['mae_over_baseline']:.3f}", '', ''))
        if A.get('plain_loop'):
            rows.append(('plain PyTorch loop test MAE (years)', f"{A['plain_loop']['test_mae']:.3f}", '', '1'))
            rows.append(('mae_over_plain_loop', f"{A['mae_over_plain_loop']:.3f}", '', ''))
        C = A.get('combined') or {}
        if C.get('subject_mae') is not None:
            rows.append((f"best combination ({'+'.join(C['of'])}): test / subject MAE, oracle", f"{C['test_mae']:.3f} / {C['subject_mae']:.3f}, {C['oracle_subject_mae']:.3f}", '', '1'))
    En = res.get('ensemble')
    if En:
        S, F = En['single'], En['fold_ensemble']
        rows.append(('test MAE: single models (mean over seeds) / fold ensemble', f"{S['test_mae']:.3f} / {F['test_mae']:.3f}", '', '1'))
        rows.append(('over the oracle: single / fold ensemble', f"{S['mae_over_oracle']:.3f} / {F['mae_over_oracle']:.3f}", '', ''))
    w = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'figure':<{w}}  {'median':>12}  {'min .. max':>20}  n")
    for r in rows: print(f'{r[0]:<{w}}  {r[1]:>12}  {r[2]:>20}  {r[3]}')
    m = res['machine']
    print(f"\nmachine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, torch {m['torch']} "
          f"({m['torch_threads']} threads), {m['date']}; load average start {m['loadavg_at_start']} end {m.get('loadavg_at_end')}")

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['--plain-loop-child']:                     # plain_loop_subprocess's child: RUN_DIR SETTINGS OUT SEED
        from agenb.core import atomic_write_json
        atomic_write_json(Path(argv[3]), plain_loop(Path(argv[1]), json.loads(argv[2]), int(argv[4])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='tiny settings: checks the benchmark runs, figures are meaningless')
    p.add_argument('--only', nargs='+', choices=SECTIONS, help='run only these sections')
    p.add_argument('--data-dir', help='an existing agenb.synth folder (default: generated under bench/out/)')
    p.add_argument('--out', help='results file (default bench/results.json, and bench/README.md is rendered from it; '
                                 'with --quick or --only bench/out/results_quick.json or results_partial.json)')
    p.add_argument('--accuracy-epochs', type=int, help='override the accuracy run\'s epochs')
    p.add_argument('--no-plain-loop', action='store_true', help='skip the plain PyTorch loop of the accuracy section')
    p.add_argument('--no-combined', action='store_true', help='skip the accuracy section\'s best combination of the models table')
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    if a.accuracy_epochs: cfg['accuracy']['epochs'] = a.accuracy_epochs
    if a.no_plain_loop: cfg['accuracy']['plain_loop'] = False
    if a.no_combined: cfg['accuracy']['combined'] = False
    official = not (a.quick or a.only or a.data_dir or a.accuracy_epochs or a.no_plain_loop or a.no_combined)
    default_out = (ROOT / 'bench' / 'results.json' if official else
                   OUT / ('results_quick.json' if a.quick else 'results_partial.json'))
    out = Path(a.out) if a.out else default_out
    OUT.mkdir(parents=True, exist_ok=True)
    from agenb import __version__
    from agenb.core import atomic_write_json, git_info
    t_start = time.perf_counter()
    res = {'machine': machine_info(), 'quick': a.quick,
           'agenb': {'version': __version__, **git_info(ROOT), 'dirty_files': dirty_files()},   # read before anything is written
           'command': ' '.join(['bench/run.py', *argv])}
    root = ensure_data(cfg['data_preset'], a.data_dir)
    res['data'] = data_record(root)
    fns = {'loader': bench_loader, 'efficiency': bench_efficiency, 'ddp': bench_ddp, 'accuracy': bench_accuracy,
           'ensemble': bench_ensemble}
    res['section_seconds'], res['section_loadavg'] = {}, {}
    for name in (a.only or SECTIONS):
        print(f'bench: {name} ...', flush=True)
        t0 = time.perf_counter(); la0 = loadavg()
        res[name] = fns[name](root, cfg[name], res) if name == 'accuracy' else fns[name](root, cfg[name])
        res['section_seconds'][name] = round(time.perf_counter() - t0, 1)
        res['section_loadavg'][name] = {'start': la0, 'end': loadavg()}
        print(f'bench: {name} done in {res["section_seconds"][name]:.0f} s', flush=True)
        # what is finished so far, kept if a later section fails (a full disk, a kill): never the results file itself
        atomic_write_json(OUT / 'results_in_progress.json', {'unfinished': True, 'sections_done': list(res['section_seconds']), **res})
    g = lambda sec, *keys: _dig(res.get(sec), keys)
    head = {'loader_speedup': g('loader', 'speedup_later_epochs_no_augmentation', 'median'),
            'loader_speedup_definition': ('per-epoch images/s once the images are decoded (warm cache, in memory), '
                                          'same work on both sides (decode/resize vs index, normalise; no augmentation, '
                                          'as the users\' loader had none); the other loader figures are under "loader"'),
            'pipeline_efficiency': g('efficiency', 'pipeline_efficiency', 'median'),
            'trainer_overhead': g('efficiency', 'trainer_overhead', 'median'),
            'ddp_speedup': g('ddp', 'ddp_speedup', 'median'),
            # over all training seeds when the section ran several (accuracy.seeds), else its one run's
            'mae_over_oracle': g('accuracy', 'seeds', 'mae_over_oracle') or g('accuracy', 'mae_over_oracle'),
            'mae_over_plain_loop': g('accuracy', 'seeds', 'mae_over_plain_loop') or g('accuracy', 'mae_over_plain_loop'),
            'mae_over_baseline': g('accuracy', 'mae_over_baseline'),
            # the fold ensemble of an experiment (section `ensemble`), image level, over the oracle on its test images
            'fold_ensemble_mae_over_oracle': g('ensemble', 'fold_ensemble', 'mae_over_oracle')}
    res['machine']['loadavg_at_end'] = loadavg()
    res['total_seconds'] = round(time.perf_counter() - t_start, 1)
    res = {**head, 'machine': res.pop('machine'), **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    (OUT / 'results_in_progress.json').unlink(missing_ok=True)   # finished: the results file holds every section
    print_table(res)
    print(f'\nwrote {out} in {res["total_seconds"]:.0f} s')
    if out.resolve() == (ROOT / 'bench' / 'accuracy_results.json').resolve():
        sys.path.insert(0, str(ROOT / 'bench'))
        import render
        render.update_readme(ROOT / 'bench' / 'README.md', res, 'accuracy', render.accuracy_block(res))
        print(f'rendered the accuracy block of {ROOT / "bench" / "README.md"} from it')
    if out.resolve() == (ROOT / 'bench' / 'ensemble_results.json').resolve():
        sys.path.insert(0, str(ROOT / 'bench'))
        import render
        render.update_readme(ROOT / 'bench' / 'README.md', res, 'ensemble', render.ensemble_block(res))
        print(f'rendered the ensemble block of {ROOT / "bench" / "README.md"} from it')
    if out.resolve() == (ROOT / 'bench' / 'results.json').resolve():
        sys.path.insert(0, str(ROOT / 'bench'))
        import render                                              # bench/render.py, beside this script
        render.render_all(res)
        print(f'rendered the figures of {ROOT / "bench" / "README.md"} from it (the README\'s: python bench/render.py '
              '--readme nbs/index.ipynb, then make readme)')
    return 0

def dirty_files():
    "The files `git status` lists as changed (a record made on a dirty tree says which files were not committed)."
    try: out = subprocess.run(['git', 'status', '--porcelain'], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError): return None
    return sorted(line[3:].strip() for line in out.splitlines() if line.strip())

def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict): return None
        d = d.get(k)
    return d

if __name__ == '__main__':
    sys.exit(main())
