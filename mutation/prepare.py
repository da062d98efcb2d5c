"""Lay out the scratch folder `make mutate` runs mutmut in: agenb/, tests/ and setup.cfg (mutation/mutmut.cfg).

mutmut does not mutate decorated functions, and agenb.trainer adds the trainer's methods (`fit`, `train_epoch`,
`predict`, `state`, ...) with fastcore's `@patch`. In the scratch copy of agenb/trainer.py each

    @patch
    [@other decorators]
    def name(self: Trainer, ...): ...

becomes the same function undecorated, followed by `patch([decorators](name))`: the same code attached to the same
class, so those methods are mutated too. Nothing else changes; the working tree is never touched."""
import re, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unpatch(src: str) -> str:
    lines, out, i = src.split('\n'), [], 0
    while i < len(lines):
        if lines[i] != '@patch':
            out.append(lines[i]); i += 1; continue
        decos, i = [], i + 1
        while lines[i].startswith('@'): decos.append(lines[i][1:]); i += 1
        name = re.match(r'def (\w+)\(', lines[i]).group(1)
        body, i = [lines[i]], i + 1
        while i < len(lines) and (lines[i] == '' or lines[i][0] in ' \t'): body.append(lines[i]); i += 1
        trail = []
        while body[-1] == '': trail.append(body.pop())
        call = name
        for d in reversed(decos): call = f'{d}({call})'
        out += body + [f'patch({call})'] + trail
    return '\n'.join(out)


def main(dest):
    dest = Path(dest)
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / 'agenb', dest / 'agenb', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(ROOT / 'tests', dest / 'tests', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(ROOT / 'mutation' / 'mutmut.cfg', dest / 'setup.cfg')
    t = dest / 'agenb' / 'trainer.py'
    new = unpatch(t.read_text())
    assert '@patch' not in new, 'a @patch form prepare.py does not know'
    t.write_text(new)
    compile(new, str(t), 'exec')


if __name__ == '__main__': main(sys.argv[1])
