"""The trainer's decisions and files, in one process and fast: `Trainer.fit` on scripted validation numbers (best epoch,
min_delta, patience, the end-of-epoch calls, non-finite values), `LRSchedule`, the batches and shards of each rank,
a real `Trainer` on a tiny model (validation, exact continuation from `state()`, accumulation, NaN policy) and
`RunWriter`'s atomic files. `make mutate` runs these against mutated copies of agenb.trainer."""
import dataclasses, io, itertools, json, math, os, types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from agenb.images import Augmentation, Preprocessing
from agenb.options import resolve_options
from agenb.runs import load_checkpoint
from agenb.trainer import (LOSSES, Dist, LRSchedule, NonFiniteLoss, PreparedData, RunWriter, Trainer, build_optimizer,
                           eval_shard, fault, train_batches)


def opts(**kw):
    return resolve_options({'image_dir': 'x', 'excel_path': 'y', 'image_size': 32, **kw})


# ---------------------------------------------------------------------------------------------------- Trainer.fit
class Sched:
    "Records the numbers the schedule is stepped with; halves the learning rate each step (to see `lr` recorded)."
    def __init__(self, opt): self.seen, self.opt = [], opt
    def step(self, v): self.seen.append(v); self.opt.param_groups[0]['lr'] /= 2


def scripted(maes, train_losses=None, state=None, **kw):
    "Trainer.fit on a Trainer whose training and validation are scripted; (trainer, reason, end-of-epoch calls)."
    t = Trainer.__new__(Trainer)
    t.o = opts(**kw)
    t.epoch, t.best_mae, t.best_epoch, t.bad_epochs, t.history, t.skipped = 0, math.inf, None, 0, [], 0
    t.ema = t.swa = None                                    # no weight averaging
    for k, v in (state or {}).items(): setattr(t, k, v)
    t.opt = types.SimpleNamespace(param_groups=[{'lr': 0.5}])
    t.sched = Sched(t.opt)
    maes, losses = iter(maes), iter(train_losses) if train_losses else itertools.repeat(1.0)
    t.train_epoch = lambda bar=None: next(losses)
    t.validate = lambda: (lambda v: dict(val_loss=v + 1, val_mae=v, val_rmse=v + 2))(next(maes))
    calls = []
    def end_of_epoch(tr, improved, final):
        calls.append((tr.epoch, improved, final, tr.best_epoch, tr.bad_epochs, tr.best_mae))
    return t, t.fit(end_of_epoch), calls


def test_best_epoch_min_delta_and_patience():
    t, reason, calls = scripted([5, 4, 4.5, 3.4, 3.0, 3.2, 1.0], epochs=10, patience=2, min_delta=0.5)
    assert reason == 'early_stopping' and t.epoch == 6
    assert calls == [(1, True, False, 1, 0, 5), (2, True, False, 2, 0, 4), (3, False, False, 2, 1, 4),
                     (4, True, False, 4, 0, 3.4), (5, False, False, 4, 1, 3.4),   # 3.0 is lower, but not by min_delta
                     (6, False, True, 4, 2, 3.4)]
    assert t.sched.seen == [5, 4, 4.5, 3.4, 3.0, 3.2]                            # the schedule sees every epoch's MAE
    h = t.history
    assert [e['epoch'] for e in h] == [1, 2, 3, 4, 5, 6] and [e['val_mae'] for e in h] == [5, 4, 4.5, 3.4, 3.0, 3.2]
    assert [e['lr'] for e in h] == [0.5 / 2 ** i for i in range(6)]               # the rate the epoch trained with
    assert h[0]['val_loss'] == 6 and h[0]['val_rmse'] == 7 and h[0]['train_loss'] == 1.0 and h[0]['skipped_batches'] == 0
    assert all(0 <= e['epoch_seconds'] < 3600 for e in h)                        # a duration, not a timestamp


def test_min_delta_is_strict():
    _, _, calls = scripted([4, 3.5, 3.4999], epochs=3, patience=0, min_delta=0.5)
    assert [c[1] for c in calls] == [True, False, True]
    _, _, calls = scripted([2, 2, 2], epochs=3, patience=0)                        # equal is not better
    assert [c[1] for c in calls] == [True, False, False] and calls[-1][3] == 1


def test_patience_zero_never_stops_and_final_is_the_last_epoch():
    t, reason, calls = scripted([1, 2, 3, 4], epochs=4, patience=0)
    assert reason == 'max_epochs' and t.epoch == 4 and [c[2] for c in calls] == [False, False, False, True]
    t, reason, calls = scripted([3, 4, 5], epochs=5, patience=1)
    assert reason == 'early_stopping' and [c[0] for c in calls] == [1, 2] and calls[-1][2] is True


def test_a_resumed_trainer_keeps_its_counters():
    state = dict(epoch=2, best_mae=3.0, best_epoch=2, bad_epochs=1, history=[{'epoch': 1}, {'epoch': 2}], skipped=1)
    t, reason, calls = scripted([3.5, 2.0], state=state, epochs=6, patience=2)
    assert reason == 'early_stopping' and calls == [(3, False, True, 2, 2, 3.0)]
    assert len(t.history) == 3 and t.history[-1]['skipped_batches'] == 1
    t, reason, calls = scripted([2.5, 2.6], state=dict(state, epoch=4), epochs=6, patience=3)
    assert reason == 'max_epochs' and calls == [(5, True, False, 5, 0, 2.5), (6, False, True, 5, 1, 2.5)]


@pytest.mark.parametrize('maes,losses,what', [([3, math.nan], None, 'validation MAE'), ([3, math.inf], None, 'validation MAE'),
                                              ([3, 2], [1.0, math.nan], 'training loss')])
def test_non_finite_numbers_stop_before_the_epoch_is_recorded(maes, losses, what):
    with pytest.raises(NonFiniteLoss, match=f'non-finite {what} at epoch 2'):
        scripted(maes, losses, epochs=5)


# ---------------------------------------------------------------------------------------------------- LRSchedule
def lr_sequence(vals, **kw):
    "The learning rate of each epoch, the schedule stepped with `vals` (validation MAEs)."
    o = opts(lr=1e-3, **kw)
    opt = build_optimizer(o, [nn.Parameter(torch.zeros(1))])
    s, out = LRSchedule(o, opt), []
    for v in vals:
        out.append(opt.param_groups[0]['lr']); opt.step(); s.step(v)
    return out, s


def test_warmup_then_cosine():
    lrs, s = lr_sequence([9] * 6, warmup_epochs=2, scheduler='cosine', t_max=4, eta_min=1e-5)
    cos = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, *cos], rel=1e-6)
    assert s.describe() == ('CosineAnnealingLR', {'T_max': 4, 'eta_min': 1e-5})


def test_plateau_steps_on_the_validation_mae_after_warmup():
    lrs, s = lr_sequence([1, 5, 4, 4, 6, 7], warmup_epochs=1, scheduler='plateau', plateau_factor=0.5, plateau_patience=0)
    # warmup epoch: the plateau rule does not see it (else 5 would not be a first best); then 5 best, 4 better, 4 bad
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4])
    assert s.describe() == ('ReduceLROnPlateau', {'mode': 'min', 'factor': 0.5, 'patience': 0})
    lrs, _ = lr_sequence([5, 4, 4, 4, 0], warmup_epochs=0, scheduler='plateau', plateau_factor=0.1, plateau_patience=1)
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 1e-4])



def test_step_schedule_after_warmup():
    lrs, s = lr_sequence([9] * 6, warmup_epochs=1, scheduler='step', step_size=2, step_gamma=0.5)
    # warm-up epoch at lr / 2, then StepLR counts its own epochs from the end of the warm-up: halves every 2 epochs
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert s.describe() == ('StepLR', {'step_size': 2, 'gamma': 0.5})


def test_onecycle_schedule_and_its_record():
    "OneCycleLR over the epochs, two parameter groups (head, backbone): rates and config.json's record of them."
    o = opts(lr=1e-3, warmup_epochs=0, scheduler='onecycle', epochs=10, onecycle_pct=0.4)   # not the default 0.3
    head, body = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = build_optimizer(o, [{'params': [head], 'lr': 1e-3}, {'params': [body], 'lr': 1e-4}])
    s = LRSchedule(o, opt)
    lrs = []
    for _ in range(10):
        lrs.append([g['lr'] for g in opt.param_groups]); opt.step(); s.step(9)
    # torch's formula written out: div_factor 25, final_div_factor 1e4, cosine annealing; peak after 0.4 x 10 - 1 = 3 steps
    cos = lambda a, b, p: b + (a - b) / 2 * (1 + math.cos(math.pi * p))
    for g, peak in enumerate((1e-3, 1e-4)):
        start, end = peak / 25, peak / 25 / 1e4
        want = [cos(start, peak, k / 3) if k <= 3 else cos(peak, end, (k - 3) / 6) for k in range(10)]
        assert [l[g] for l in lrs] == pytest.approx(want, rel=1e-6)
    assert s.describe() == ('OneCycleLR', {'total_steps': 10, 'cycle_momentum': True, 'anneal_strategy': 'cos',
                                           'pct_start': pytest.approx(0.4), 'max_lr': [1e-3, 1e-4],
                                           'initial_lr': pytest.approx([4e-5, 4e-6]), 'min_lr': pytest.approx([4e-9, 4e-10])})


def test_no_schedule_is_constant_and_state_round_trips():
    lrs, s = lr_sequence([1, 2, 3], warmup_epochs=0, scheduler='none')
    assert lrs == [1e-3] * 3 and s.describe() == ('none', {})
    assert s.state_dict() == {'done': 3, 'warm': None, 'main': None}            # nothing to save, and no error
    for kw in (dict(scheduler='cosine', t_max=6, warmup_epochs=2), dict(scheduler='plateau', plateau_patience=0, warmup_epochs=1)):
        o = opts(lr=1e-3, **kw)
        opt = build_optimizer(o, [nn.Parameter(torch.zeros(1))]); s = LRSchedule(o, opt)
        for v in (5, 4, 6): opt.step(); s.step(v)
        opt2 = build_optimizer(o, [nn.Parameter(torch.zeros(1))]); s2 = LRSchedule(o, opt2)
        opt2.load_state_dict(opt.state_dict()); s2.load_state_dict(s.state_dict())
        assert s2.done == 3
        for v in (7, 8, 3):
            s.step(v); s2.step(v)
            assert opt2.param_groups[0]['lr'] == opt.param_groups[0]['lr'], kw


def test_optimizer_and_losses():
    p = [nn.Parameter(torch.zeros(1))]
    a = build_optimizer(opts(optimizer='adamw', weight_decay=0.01, lr=0.1), p)
    b = build_optimizer(opts(optimizer='adam', weight_decay=0.0, lr=0.2), p)
    assert type(a) is torch.optim.AdamW and a.defaults['weight_decay'] == 0.01 and a.defaults['lr'] == 0.1
    assert type(b) is torch.optim.Adam and b.defaults['lr'] == 0.2 and a.defaults['betas'] == b.defaults['betas'] == (0.9, 0.999)
    x, y = torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.0])
    assert {k: round(float(c()(x, y)), 6) for k, (_, c) in LOSSES.items()} == {
        'mae': 1.75, 'mse': 4.625, 'huber': round((0.5 * 0.25 + 2.5) / 2, 6), 'smoothl1': round((0.5 * 0.25 + 2.5) / 2, 6)}


# ---------------------------------------------------------------------------------------------------- ranks' shares
@pytest.mark.parametrize('n,bs,world', [(37, 8, 2), (17, 8, 1), (16, 8, 1), (9, 4, 3)])
def test_train_batches_cover_the_training_set(n, bs, world):
    per_rank = [train_batches(n, bs, epoch=3, seed=1, rank=r, world=world) for r in range(world)]
    share = math.ceil(n / world)
    for batches in per_rank:
        assert sum(map(len, batches)) == share and all(1 < len(b) <= bs + 1 for b in batches)
        assert all(len(b) == bs for b in batches[:-2])
    assert set(itertools.chain.from_iterable(itertools.chain.from_iterable(per_rank))) == set(range(n))
    assert train_batches(n, bs, 3, 1, 0, world) == per_rank[0]                    # the same epoch: the same order
    assert train_batches(n, bs, 4, 1, 0, world) != per_rank[0]                    # another epoch: another order
    assert train_batches(n, bs, 3, 2, 0, world) != per_rank[0]                    # another seed: another order


def test_train_batches_merge_a_last_single_sample():
    assert [len(b) for b in train_batches(17, 8, 0, 0)] == [8, 9]
    assert [len(b) for b in train_batches(9, 8, 0, 0)] == [9]                 # two batches, the second a single sample
    assert [len(b) for b in train_batches(25, 8, 0, 0)] == [8, 8, 9]           # merged into the last batch, not another
    assert train_batches(12, 4, 2, 5) == train_batches(12, 4, 2, 5, 0, 1)      # defaults: one process
    assert [len(b) for b in train_batches(16, 8, 0, 0)] == [8, 8]
    assert [len(b) for b in train_batches(1, 8, 0, 0)] == [1]


@pytest.mark.parametrize('n,world', [(9, 2), (10, 2), (7, 3), (1, 2)])
def test_eval_shards_hold_each_sample_once(n, world):
    assert eval_shard(4) == [0, 1, 2, 3] and eval_shard(4, 1) == [1, 2, 3]        # defaults: one process
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert sorted(itertools.chain.from_iterable(shards)) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_fault_hook(monkeypatch):
    monkeypatch.delenv('AGENB_FAULT', raising=False)
    assert not fault('raise', 0, 1, 1)
    monkeypatch.setenv('AGENB_FAULT', 'raise:1:2:3')
    assert fault('raise', 1, 2, 3) and fault('raise', 1, 2)
    assert not fault('raise', 0, 2, 3) and not fault('raise', 1, 1, 3) and not fault('raise', 1, 2, 4) and not fault('nan', 1, 2, 3)
    monkeypatch.setenv('AGENB_FAULT', 'kill:-1:2')
    assert fault('kill', 0, 2, 7) and fault('kill', 5, 2) and not fault('kill', 0, 3, 1)


# ---------------------------------------------------------------------------------------------------- a real Trainer
class Tiny(nn.Module):
    "A convolution, BatchNorm and a linear head: enough to train, fast on the CPU."
    agenb_head_path = 'fc'                     # what build_model records on a model: where its head is
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 1)
        nn.init.constant_(self.fc.bias, 45.0)
    def forward(self, x): return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope='module')
def data():
    "30 16 x 16 images whose brightness follows age: 18 train, 6 val, 6 test, one image per subject."
    n, g = 30, torch.Generator().manual_seed(0)
    ages = torch.linspace(10, 80, n)
    images = ((ages / 100).view(n, 1, 1, 1) * 200 + torch.rand(n, 1, 16, 16, generator=g) * 50).to(torch.uint8)
    table = pd.DataFrame({'path': [f'/x/anon_{i}_1.png' for i in range(n)], 'filename': [f'anon_{i}_1.png' for i in range(n)],
                          'subject': [str(i) for i in range(n)], 'age': ages.numpy().astype(float)})
    split = pd.Series(['train', 'val', 'train', 'test', 'train'] * 6)
    return PreparedData(table=table, split=split, split_info={'n_images_excluded': 0}, summary={}, stats={},
                        idx={s: np.flatnonzero((split == s).to_numpy()) for s in ('train', 'val', 'test')},
                        prep=Preprocessing(image_size=16), aug=Augmentation(rotation_deg=5, brightness=0.1),
                        images=images, ages=ages, cache_info={})


def trainer(data, seed=0, **kw):
    torch.manual_seed(seed)
    o = opts(**{'epochs': 4, 'batch_size': 4, 'lr': 1e-2, 'warmup_epochs': 1, **kw})
    return Trainer(o, data, Dist('cpu'), Tiny(), init_bias=45.0)


def test_validation_counts_every_validation_image_once(data):
    t = trainer(data)
    t.model.eval()
    val = data.idx['val']
    with torch.no_grad():
        want = t.model(data.prep.normalize(data.images[val].float() / 255)).squeeze(1).numpy()
    pred = t.predict('val')
    np.testing.assert_allclose(pred, want, rtol=0, atol=1e-4)
    ages = data.table.age.to_numpy()[val]
    v = t.validate()
    assert v['val_mae'] == pytest.approx(np.abs(want - ages).mean(), abs=1e-4)
    assert v['val_rmse'] == pytest.approx(np.sqrt(((want - ages) ** 2).mean()), abs=1e-4)
    assert v['val_loss'] == pytest.approx(np.abs(want - ages).mean(), abs=1e-4)       # the L1 loss of the mae recipe
    h = trainer(data, loss='huber').validate()['val_loss']
    e = np.abs(want - ages)
    assert h == pytest.approx(np.where(e < 1, 0.5 * e ** 2, e - 0.5).mean(), abs=1e-4)  # the run's own criterion


def test_fit_learns_and_a_restored_trainer_continues_exactly(data):
    a = trainer(data)
    steps, saved = [], []
    def end_of_epoch(t, improved, final):
        steps.append(t.epoch)
        if t.epoch == 2:                                                 # through bytes, as last.pth is
            buf = io.BytesIO(); torch.save(t.state(), buf); buf.seek(0); saved.append(torch.load(buf, weights_only=True))
    assert a.fit(end_of_epoch) == 'max_epochs'
    assert steps == [1, 2, 3, 4] and a.history[-1]['val_mae'] < a.history[0]['val_mae']
    assert a.best_epoch == 1 + int(np.argmin([e['val_mae'] for e in a.history]))
    ck = saved[0]
    assert ck['epoch'] == 2 and ck['val_mae'] == a.history[1]['val_mae'] and ck['train_state']['world_size'] == 1
    b = trainer(data, seed=7)                                            # other initial weights, then the saved state
    b.load_state(ck)
    assert (b.epoch, b.best_epoch, b.bad_epochs, len(b.history)) == (2, ck['train_state']['best_epoch'],
                                                                      ck['train_state']['bad_epochs'], 2)
    b.fit()
    assert [e['val_mae'] for e in b.history] == [e['val_mae'] for e in a.history]
    assert [e['train_loss'] for e in b.history] == [e['train_loss'] for e in a.history]
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert a.best_epoch == b.best_epoch and a.best_mae == b.best_mae


def test_state_of_another_world_size_keeps_the_weights_not_the_random_streams(data):
    a = trainer(data); a.fit()
    ck = a.state()
    ck['train_state']['world_size'] = 2
    b = trainer(data, seed=3)
    before = b.gen.get_state()
    b.load_state(ck)
    assert torch.equal(b.gen.get_state(), before) and not torch.equal(b.gen.get_state(), a.gen.get_state())
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def count_steps(t):
    n = [0]; step = t.opt.step
    def counted(*args, **kw):
        n[0] += 1; return step(*args, **kw)
    t.opt.step = counted
    return n


@pytest.mark.parametrize('accum,steps', [(1, 5), (2, 3), (3, 2), (8, 1)])
def test_gradient_accumulation_steps_once_per_group(data, accum, steps):
    t = trainer(data, accum_steps=accum)                              # 18 training images, batches of 4: 4,4,4,4,2
    n = count_steps(t)
    loss = t.train_epoch()
    assert n[0] == steps and math.isfinite(loss)


def test_accumulated_gradient_is_the_mean_of_the_batches(data):
    "accum 2 over batches A, B: one step with (grad A + grad B) / 2; no BatchNorm statistics in the way (eval-mode BN)."
    grads = {}
    plain = dataclasses.replace(data, aug=Augmentation())
    for accum in (1, 2):
        t = trainer(plain, accum_steps=accum, max_grad_norm=0.0)
        t.model.bn.eval(); t.net.train = lambda mode=True: t.net     # keep BN in eval mode so batches are independent
        seen = []
        t.opt.step = lambda *a, **k: seen.append([p.grad.clone() for p in t.model.parameters()])
        t.opt.zero_grad = lambda set_to_none=True: [setattr(p, 'grad', None) for p in t.model.parameters()]
        t.train_epoch()
        grads[accum] = seen
    (first_two, *_), one = grads[2], grads[1]
    for g2, g1a, g1b in zip(first_two, one[0], one[1]):
        torch.testing.assert_close(g2, (g1a + g1b) / 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_nan_policy(data, monkeypatch, policy):
    monkeypatch.setenv('AGENB_FAULT', 'nan:0:1:2')                       # epoch 1, step 2 of rank 0
    t = trainer(data, nan_policy=policy)
    n = count_steps(t)
    if policy == 'stop':
        with pytest.raises(NonFiniteLoss, match=r'non-finite loss value\(s\) in epoch 1'): t.train_epoch()
    else:
        loss = t.train_epoch()
        assert t.skipped == 1 and n[0] == 4 and math.isfinite(loss)     # 5 batches, the NaN one not stepped


def test_batches_are_the_split_images_in_order(data):
    t = trainer(data)
    (x,), y = t.batch([2, 0], 'test', train=False)           # no covariates: the inputs are the images alone
    idx = data.idx['test'][[2, 0]]
    torch.testing.assert_close(x, data.prep.normalize(data.images[idx].float() / 255))
    torch.testing.assert_close(y, data.ages[idx])
    (xa,), _ = t.batch([2, 0], 'test', train=True)
    assert not torch.equal(xa, x)                                        # training batches are augmented



def test_mixup_trains_on_mixed_ages_and_a_restored_trainer_continues_exactly(data):
    targets = {}
    for name, kw in (('plain', {}), ('mixed', dict(mixup=2.0, mixup_sigma=5.0))):
        t = trainer(data, **kw)
        loss, seen = t.head.loss, targets.setdefault(name, [])
        t.head.loss = lambda out, y, loss=loss, seen=seen: (seen.append(y.clone()), loss(out, y))[1]
        t.train_epoch()
    train_ages = data.ages[data.idx['train']]
    plain, mixed = torch.cat(targets['plain']), torch.cat(targets['mixed'])
    assert all(bool((train_ages == a).any()) for a in plain)                 # without mixup: the training ages
    new = [a for a in mixed if not bool((train_ages == a).any())]
    assert len(new) == len(mixed)                                           # with it: ages between two people's
    assert train_ages.min() <= mixed.min() and mixed.max() <= train_ages.max()
    a, saved = trainer(data, mixup=2.0, mixup_sigma=5.0), []
    def keep(t, improved, final):
        if t.epoch == 2:                                                     # through bytes, as last.pth is
            buf = io.BytesIO(); torch.save(t.state(), buf); buf.seek(0); saved.append(torch.load(buf, weights_only=True))
    a.fit(keep)
    b = trainer(data, seed=7, mixup=2.0, mixup_sigma=5.0)
    b.load_state(saved[0]); b.fit()                                          # the generator's state: the same mixing
    assert [e['train_loss'] for e in b.history] == [e['train_loss'] for e in a.history]
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    c = trainer(data, mixup=2.0)                                            # another partner rule: other training
    c.fit()
    assert [e['train_loss'] for e in c.history] != [e['train_loss'] for e in a.history]


# ---------------------------------------------------------------------------------------------------- RunWriter
class Run:
    "A RunWriter and a stand-in trainer whose epochs are scripted."
    def __init__(self, d, **kw):
        self.o = opts(**{'epochs': 5, 'checkpoint_every': 1, 'keep_checkpoints': 2, 'plot_interval': 3, **kw})
        self.w = RunWriter(d, {'status': 'running'}, self.o)
        self.t = types.SimpleNamespace(history=[], epoch=0, best_epoch=None, best_mae=math.inf,
                                       averaging_record=lambda checkpoint=False: {})   # no weight averaging
    def epoch(self, val, improved, final=False):
        t = self.t
        t.epoch += 1
        t.history.append(dict(epoch=t.epoch, train_loss=1.0, val_loss=1.5, val_mae=val, val_rmse=2.0, lr=1e-3, epoch_seconds=0.1))
        if improved: t.best_epoch, t.best_mae = t.epoch, val
        state = {'format': 'agenb-checkpoint', 'version': 2, 'epoch': t.epoch, 'val_mae': val, 'arch': 'resnet18',
                 'model': {'w': torch.full((3,), float(t.epoch))}, 'train_state': {'n': t.epoch}}
        self.w.end_of_epoch(t, state, improved, final)


def test_run_writer_files(tmp_path):
    r = Run(tmp_path)
    for val, improved in ((5.0, True), (6.0, False), (4.0, True), (4.5, False)): r.epoch(val, improved)
    best, last = torch.load(tmp_path / 'best_model.pth'), torch.load(tmp_path / 'last.pth')
    assert best['epoch'] == 3 and best['train_state'] is None and best['model']['w'][0] == 3
    assert last['epoch'] == 4 and last['train_state'] == {'n': 4}
    assert sorted(p.name for p in tmp_path.glob('checkpoint_epoch_*')) == ['checkpoint_epoch_0003.pth', 'checkpoint_epoch_0004.pth']
    assert torch.load(tmp_path / 'checkpoint_epoch_0004.pth')['train_state'] is None
    assert json.loads((tmp_path / 'history.json').read_text()) == r.t.history
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert (cfg['status'], cfg['epochs_completed'], cfg['best_epoch'], cfg['best_val_mae']) == ('running', 4, 3, 4.0)
    log = (tmp_path / 'train.log').read_text().splitlines()
    assert len(log) == 4 and [('*best*' in line) for line in log] == [True, False, True, False]
    assert log[0].startswith('epoch    1/5') and 'val_mae 5.000' in log[0]
    assert not list(tmp_path.glob('.*')) and not list(tmp_path.glob('*.tmp'))
    r.w.log_file.close()


def test_run_writer_curves_on_the_first_every_nth_and_final_epoch(tmp_path):
    r = Run(tmp_path, checkpoint_every=0)
    drawn = []
    for e in range(1, 6):
        r.epoch(5.0 - e, True, final=e == 5)
        p = tmp_path / 'training_curves.png'
        drawn.append(p.is_file() and p.stat().st_mtime_ns); p.unlink(missing_ok=True)
    assert [bool(x) for x in drawn] == [True, False, True, False, True]
    assert not list(tmp_path.glob('checkpoint_epoch_*'))                # --checkpoint-every 0: none
    r.w.log_file.close()


def test_run_writer_replaces_files_atomically(tmp_path):
    "Each file is written to a temporary file and renamed over the old one: the old file is never opened for writing."
    r = Run(tmp_path)
    r.epoch(5.0, True)
    names = ['best_model.pth', 'last.pth', 'history.json', 'config.json']
    inodes = {n: (tmp_path / n).stat().st_ino for n in names}
    handles = {n: open(tmp_path / n, 'rb') for n in names}              # a reader holding the old files open
    old = {n: h.read() for n, h in handles.items()}
    r.epoch(4.0, True)
    for n in names:
        assert (tmp_path / n).stat().st_ino != inodes[n], f'{n} was rewritten in place'
        handles[n].seek(0); assert handles[n].read() == old[n], n    # the old file is untouched
        handles[n].close()
    assert not list(tmp_path.glob('.*.tmp'))
    r.w.log_file.close()


def test_a_crash_in_the_middle_of_a_write_keeps_the_old_file(tmp_path, monkeypatch):
    r = Run(tmp_path)
    r.epoch(5.0, True)
    real_write = Path.write_bytes   # checkpoints are serialised in memory, then written by Path.write_bytes
    def dying_write(self, data):
        if self.name.startswith('.last.pth'):
            real_write(self, b'PK\x03\x04 half a checkpoint'); raise KeyboardInterrupt('killed while writing')
        return real_write(self, data)
    monkeypatch.setattr(Path, 'write_bytes', dying_write)
    with pytest.raises(KeyboardInterrupt): r.epoch(4.0, True)
    monkeypatch.setattr(Path, 'write_bytes', real_write)
    assert load_checkpoint(tmp_path / 'last.pth')['epoch'] == 1          # the previous epoch, complete
    assert load_checkpoint(tmp_path / 'best_model.pth')['epoch'] == 2    # written before the crash, complete
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    r.w.log_file.close()


def test_state_holds_every_counter_as_it_is_and_load_state_restores_it(data):
    "state(): the counters as they are, the last epoch's validation MAE, the preprocessing; load_state restores each."
    a = trainer(data, epochs=3)
    assert a.state()['val_mae'] is None                                         # before the first epoch
    a.fit()
    a.best_epoch, a.bad_epochs, a.skipped = 2, 1, 3                             # values no default would give
    ck = a.state()
    assert ck['val_mae'] == a.history[-1]['val_mae'] != a.history[1]['val_mae']
    assert ck['preprocessing'] == data.prep.to_dict() and 'covariates' not in ck
    ts = ck['train_state']
    assert (ts['best_epoch'], ts['bad_epochs'], ts['skipped'], ts['best_mae']) == (2, 1, 3, a.best_mae)
    assert ts['scaler'] == a.scaler.state_dict() and ts['scaler'] is not None
    b = trainer(data, seed=5, epochs=3)
    b.load_state(ck)
    assert (b.epoch, b.best_epoch, b.bad_epochs, b.skipped, b.best_mae) == (3, 2, 1, 3, a.best_mae)


def test_state_of_a_covariate_run_keeps_the_training_statistics(data):
    stats = {'names': ['bmi'], 'median': [22.0], 'mean': [23.0], 'sd': [4.0], 'n_inputs': 2}
    d = dataclasses.replace(data, covariates=torch.zeros(len(data.table), 2), covariate_stats=stats)
    class TinyCov(Tiny):
        def forward(self, x, cov): return super().forward(x) + cov.sum(1, keepdim=True)
    t = Trainer(opts(epochs=1, batch_size=4), d, Dist('cpu'), TinyCov(), init_bias=45.0)
    assert t.state()['covariates'] == stats


def test_ema_state_round_trip(data):
    """With --ema-decay the checkpoint's weights are the EMA's and train_state keeps the raw weights and the EMA's count;
    load_state puts each back; a checkpoint without EMA is refused by an EMA trainer, and a trainer without EMA resumes
    an EMA checkpoint from its raw weights."""
    a = trainer(data, epochs=2, ema_decay=0.9)
    a.fit()
    ck = a.state(); ts = ck['train_state']
    raw = a.model.state_dict()
    assert all(torch.equal(ts['raw_model'][k], v) for k, v in raw.items())
    assert type(ts['ema_n_averaged']) is int and ts['ema_n_averaged'] == int(a.ema.n_averaged) > 0
    assert any(not torch.equal(ck['model'][k], v) for k, v in raw.items() if v.is_floating_point())   # EMA != raw
    b = trainer(data, seed=9, epochs=2, ema_decay=0.9)
    b.load_state(ck)
    assert all(torch.equal(b.model.state_dict()[k], v) for k, v in raw.items())
    assert all(torch.equal(b.ema.module.state_dict()[k], v) for k, v in ck['model'].items())
    assert int(b.ema.n_averaged) == ts['ema_n_averaged']
    c = trainer(data, seed=9, epochs=2)
    c.load_state(ck)
    assert all(torch.equal(c.model.state_dict()[k], v) for k, v in raw.items())
    plain = trainer(data, epochs=1); plain.fit()
    from agenb.core import InputError
    with pytest.raises(InputError, match='^the checkpoint was written without --ema-decay; resume without it$'):
        trainer(data, epochs=2, ema_decay=0.9).load_state(plain.state())


def test_the_saved_random_streams_restore_exactly():
    """What last.pth keeps of the random streams (Python's, NumPy's with its position and cached Gaussian, torch's, the
    augmentation generator's) puts each back where it was: the draws after a restore are the draws after the save."""
    import random
    from agenb.trainer import _rng_state, _set_rng_state
    gen = torch.Generator().manual_seed(3)
    np.random.seed(0); np.random.rand(5); random.seed(1); torch.manual_seed(2)      # somewhere other than a seed's start
    draw = lambda: (random.random(), np.random.rand(3).tolist(), np.random.randn(3).tolist(), torch.rand(2).tolist(),
                    torch.rand(2, generator=gen).tolist())
    buf = io.BytesIO(); torch.save(_rng_state(gen), buf)                         # through bytes, as last.pth is
    want = draw()
    np.random.randn(); random.random(); np.random.rand(7); torch.rand(3); torch.rand(1, generator=gen)
    buf.seek(0); _set_rng_state(torch.load(buf, weights_only=True), gen)
    assert draw() == want


def test_run_writer_curves_show_the_history(tmp_path):
    "training_curves.png is the run's history drawn at 100 dpi: the same pixels as the figure drawn here, not an empty one."
    from PIL import Image
    from agenb.core import atomic_savefig
    from agenb.runs import curves_figure
    r = Run(tmp_path, checkpoint_every=0)
    for e in range(1, 4): r.epoch(5.0 - e, True, final=e == 3)
    r.w.log_file.close()
    atomic_savefig(curves_figure(r.t.history), tmp_path / 'want.png', dpi=100)
    atomic_savefig(curves_figure([]), tmp_path / 'empty.png', dpi=100)
    px = lambda name: np.asarray(Image.open(tmp_path / name))
    assert Image.open(tmp_path / 'training_curves.png').size == (1500, 400)
    assert np.array_equal(px('training_curves.png'), px('want.png')) and not np.array_equal(px('want.png'), px('empty.png'))
