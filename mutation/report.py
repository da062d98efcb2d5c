"""Write mutation/REPORT.md from a finished `mutmut run` in the scratch folder of `make mutate`.

`python mutation/report.py SCRATCH_DIR OUT.md`: the date and the commit tested, killed / survived / equivalent counts
per module, and every mutant that no test killed, with its diff and either the reason it is equivalent (from
mutation/equivalent.txt, lines `MUTANT_NAME: reason`) or NOT EXPLAINED. Exit status 1 when any survivor is not
explained, so the target fails until each is killed by a test or explained."""
import json, os, subprocess, sys
from collections import Counter
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = {1: 'killed', 3: 'killed', -9: 'killed (SIGKILL)', -11: 'killed (segfault)', 36: 'timeout', -24: 'timeout',
          24: 'timeout', 152: 'timeout', 255: 'timeout'}


def status(code):
    if code in KILLED: return 'timeout' if KILLED[code] == 'timeout' else 'killed'
    return {0: 'survived', 5: 'no tests', 33: 'no tests', None: 'not checked'}.get(code, f'other ({code})')


def equivalents():
    out = {}
    p = ROOT / 'mutation' / 'equivalent.txt'
    for line in p.read_text().splitlines() if p.is_file() else []:
        if line.strip() and not line.startswith('#'):
            name, _, why = line.partition(':')
            out[name.strip()] = why.strip()
    return out


MESSAGE_CALLS = ('raise ', 'InputError(', 'ValueError(', '_need(', '_arrays(', "['reason']", 'reason=', '_warn(')


def auto_reason(diff):
    """The reason a one-line mutant cannot change a number or a decision, when it is plain from the diff: a docstring,
    or only the wording or case of a message (error text, a recorded refusal reason). None otherwise."""
    minus = [l[1:].strip() for l in diff.splitlines() if l.startswith('-')]
    plus = [l[1:].strip() for l in diff.splitlines() if l.startswith('+')]
    if len(minus) != 1 or len(plus) != 1: return None
    a, b = minus[0], plus[0]
    text_only = a == b.replace('XX', '') or (a.lower() == b.lower() and a != b)
    if not text_only: return None
    if a[:1] in '"\'' and a[-1:] in '"\'' : return 'docstring'
    if any(k in a for k in MESSAGE_CALLS): return 'message text only (the words of an error or refusal message)'
    return None


def git(*a):
    return subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main(scratch, out):
    scratch, out = Path(scratch).resolve(), Path(out).resolve()
    metas = sorted((scratch / 'mutants').rglob('*.py.meta'))
    if not metas: sys.exit(f'no mutmut results under {scratch}/mutants: run `make mutate`')
    eq = equivalents()
    rows, loose = [], []
    for meta in metas:
        module = str(meta.relative_to(scratch / 'mutants'))[:-len('.meta')]
        codes = json.loads(meta.read_text())['exit_code_by_key']
        if not codes: continue
        c = Counter(status(v) for v in codes.values())
        survivors = sorted((k for k, v in codes.items() if status(v) in ('survived', 'no tests')),
                           key=lambda k: (k.rsplit('_', 1)[0], int(k.rsplit('_', 1)[1])))
        n_eq = sum(k in eq for k in survivors)
        rows.append((module, len(codes), len(codes) - c['not checked'], c['killed'], c['timeout'], len(survivors), n_eq,
                     len(survivors) - n_eq, c['not checked']))
        loose += [(module, k, status(codes[k])) for k in survivors]
    commit, dirty = git('rev-parse', 'HEAD'), bool(git('status', '--porcelain', '--untracked-files=no'))
    cfg = (scratch / 'setup.cfg').read_text()
    selection = cfg.split('pytest_add_cli_args_test_selection =')[1].split('\n\n')[0].split('timeout')[0].split()
    lines = [
        '# Mutation testing report (`make mutate`)', '',
        f'- date: {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}',
        f'- agenb commit: `{commit}`' + (' (with uncommitted changes)' if dirty else ''),
        f'- tool: mutmut {version("mutmut")}; modules and exclusions: mutation/mutmut.cfg; trainer methods added with '
        '`@patch` are mutated through mutation/prepare.py', f'- tests run against each mutant: {", ".join(selection)}',
        '', '| module | mutants | checked | killed | timeout (killed) | survived | of which equivalent | not explained | not checked |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    body_start = len(lines)
    after_table = [
              '"survived" counts the mutants no selected test killed (including any no selected test reached). Each is '
              'listed below with why it cannot change a result (equivalent) or as NOT EXPLAINED. "not checked": '
              'generated but not run (a run limited to some mutants by name, or stopped early).', '']
    notes = ROOT / 'mutation' / 'NOTES.md'
    if notes.is_file(): after_table += [notes.read_text().strip(), '']
    auto, text = {}, {}
    os.chdir(scratch)                                  # mutmut reads its setup.cfg and mutants/ from here
    import mutmut.__main__ as mm
    for module, name, st in loose:
        d = mm.get_diff_for_mutant(name, path=mm.find_mutant(name).path)
        text[name] = '\n'.join(l for l in d.splitlines() if l.startswith(('+', '-')) and not l.startswith(('+++', '---')))
        if name not in eq and (why := auto_reason(text[name])): auto[name] = why
    eq.update(auto)
    lines = lines[:body_start]
    for r in rows: lines.append('| ' + ' | '.join(map(str, r[:6])) + f' | {sum(n in eq for m, n, _ in loose if m == r[0])} | '
                                f'{sum(n not in eq for m, n, _ in loose if m == r[0])} | {r[8]} |')
    tot = [sum(r[i] for r in rows) for i in range(1, 9)]
    tot[5] = sum(n in eq for _, n, _ in loose); tot[6] = tot[4] - tot[5]
    lines += ['| **all** | ' + ' | '.join(f'**{t}**' for t in tot) + ' |', '', *after_table]
    for module, name, st in loose:
        why = eq.get(name)
        lines += [f'### `{name}` ({st})', '', f'**{"Equivalent: " + why if why else "NOT EXPLAINED"}**', '',
                  '```diff', text[name], '```', '']
    unknown = sorted(set(eq) - {n for _, n, _ in loose})
    if unknown: lines += ['Listed as equivalent in mutation/equivalent.txt but no longer surviving: ' + ', '.join(unknown), '']
    out.write_text('\n'.join(lines) + '\n')
    print(f'{out}: {tot[0]} mutants, {tot[1]} checked, {tot[2] + tot[3]} killed, {tot[4]} survived '
          f'({tot[5]} equivalent, {tot[6]} not explained), {tot[7]} not checked')
    return 1 if tot[6] or tot[7] else 0


if __name__ == '__main__': sys.exit(main(*sys.argv[1:]))
