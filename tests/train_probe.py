"""`python tests/train_probe.py ARGS` (also under torchrun) is `python -m agenb.train ARGS` with test probes that
agenb itself does not carry, each off unless its environment variable is set:

- `AGENB_PROBE_LOG=DIR`: every rank appends one JSON line per epoch to `DIR/rank<R>.jsonl` with what it decided
  (validation MAE, improved, best epoch, bad epochs, the learning rate of the next epoch), a hash of its weights
  and of its BatchNorm statistics after training, and its optimizer steps; then one line with the stop reason.
  Comparing the files of the ranks shows whether they took the same decisions.
- `AGENB_PROBE_VAL_OFFSET='{"R:E": years, ...}'`: rank R's own validation predictions of epoch E are shifted by
  that many years *before* they are shared, so the ranks' raw numbers differ.
- `AGENB_PROBE_KILL_WRITE=NAME:EPOCH`: SIGKILL the process half-way through writing NAME (e.g. last.pth) at EPOCH.
"""
import hashlib, io, json, os, signal, sys, weakref
from pathlib import Path

import torch
import torch.distributed as dist

from agenb.core import run_cli
from agenb.trainer import Trainer
import agenb.train

LOG = os.environ.get('AGENB_PROBE_LOG')
OFFSETS = json.loads(os.environ.get('AGENB_PROBE_VAL_OFFSET') or '{}')
KILL = os.environ.get('AGENB_PROBE_KILL_WRITE')


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors: h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def log(t, **rec):
    if not LOG: return
    with open(Path(LOG) / f'rank{t.d.rank}.jsonl', 'a') as f: f.write(json.dumps(rec) + '\n')


_init, _train_epoch, _outputs, _fit, _close = Trainer.__init__, Trainer.train_epoch, Trainer.outputs, Trainer.fit, Trainer.close


def __init__(self, *a, **kw):
    _init(self, *a, **kw)
    self.probe_steps, step = 0, self.opt.step
    def counted(*a, **kw):
        self.probe_steps += 1; return step(*a, **kw)
    self.opt.step = counted
    self.probe_wrapper = weakref.ref(self.net) if isinstance(self.net, torch.nn.parallel.DistributedDataParallel) else None
    self.probe_group = weakref.ref(dist.group.WORLD) if dist.is_initialized() else None


def train_epoch(self, *a, **kw):
    out = _train_epoch(self, *a, **kw)
    self.probe_bn = digest(b for n, b in self.model.named_buffers() if 'running' in n)  # before predict's broadcast
    return out


def outputs(self, split, precise=False):
    "The model outputs every prediction and validation goes through: this rank's own, shifted before they are shared."
    off = float(OFFSETS.get(f'{self.d.rank}:{self.epoch + 1}', 0.0)) if split == 'val' else 0.0
    hook = self.eval_model.register_forward_hook(lambda m, i, out: out + off) if off else None
    try: return _outputs(self, split, precise)
    finally:
        if hook: hook.remove()


def fit(self, end_of_epoch=None, progress_factory=None):
    def eoe(t, improved, final):
        log(t, epoch=t.epoch, val_mae=t.history[-1]['val_mae'], improved=bool(improved), final=bool(final),
            best_epoch=t.best_epoch, best_mae=t.best_mae, bad_epochs=t.bad_epochs, lr=t.history[-1]['lr'],
            lr_next=t.opt.param_groups[0]['lr'], weights=digest(t.model.parameters()), bn=t.probe_bn,
            opt_steps=t.probe_steps, sync_bn_layers=sum(isinstance(m, torch.nn.SyncBatchNorm) for m in t.model.modules()))
        if end_of_epoch: end_of_epoch(t, improved, final)
    reason = _fit(self, eoe, progress_factory)
    log(self, stop=reason, epoch=self.epoch)
    return reason


def close(self):
    _close(self)
    log(self, closed=True, ddp_wrapper_freed=self.probe_wrapper is not None and self.probe_wrapper() is None,
        group_freed=self.probe_group is not None and self.probe_group() is None, process_group=dist.is_initialized())


_save, _write_bytes = torch.save, Path.write_bytes
_saving = {}


def save(obj, f, *a, **kw):
    "torch.save that notes the epoch of the checkpoint it serialises (agenb saves to memory, then writes the bytes)."
    if isinstance(obj, dict): _saving['epoch'] = obj.get('epoch')
    return _save(obj, f, *a, **kw)


def write_bytes(self, data):
    "Path.write_bytes that dies half-way through the file named in AGENB_PROBE_KILL_WRITE (atomic_write's temporary file)."
    name, epoch = KILL.split(':')
    if (self.name == name or self.name.startswith(f'.{name}.')) and _saving.get('epoch') == int(epoch):
        data = bytes(data)
        with open(self, 'wb') as out:
            out.write(data[: len(data) // 2]); out.flush(); os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_bytes(self, data)


Trainer.__init__, Trainer.train_epoch, Trainer.outputs, Trainer.fit, Trainer.close = __init__, train_epoch, outputs, fit, close
if KILL: torch.save, Path.write_bytes = save, write_bytes

if __name__ == '__main__':
    if LOG: Path(LOG).mkdir(parents=True, exist_ok=True)
    run_cli(agenb.train.main, sys.argv[1:])
