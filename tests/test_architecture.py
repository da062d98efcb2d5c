"""The import graph of agenb: imports only go down, nothing imports the command-line orchestration modules,
and chapter numbers follow the import order."""
import ast, re
from pathlib import Path

from conftest import ROOT

PKG = ROOT / 'agenb'
TOP = {'train', 'launch', 'experiment'}   # orchestration: the top of the graph, imported by nobody


def agenb_imports(path):
    "{module: [(line, imported agenb module, at top level?)]} for one file."
    tree = ast.parse(path.read_text())
    top_nodes = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level: names = [node.module or '']
            elif node.module and node.module.split('.')[0] == 'agenb':
                names = [node.module[6:]] if node.module != 'agenb' else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name[6:] for a in node.names if a.name.startswith('agenb.')]
        for n in names:
            if n: out.append((node.lineno, n.split('.')[0], id(node) in top_nodes))
    return out


def graph():
    return {p.stem: agenb_imports(p) for p in PKG.glob('*.py') if not p.stem.startswith('_')}


def test_no_import_circle():
    g = {m: {d for _, d, _ in deps} for m, deps in graph().items()}
    state = {}
    def visit(m, path):
        if state.get(m) == 'done': return
        assert state.get(m) != 'active', 'import circle: ' + ' -> '.join(path + [m])
        state[m] = 'active'
        for d in sorted(g.get(m, ())): visit(d, path + [m])
        state[m] = 'done'
    for m in sorted(g): visit(m, [])


def test_nothing_imports_the_orchestration_modules():
    bad = [(m, line, d) for m, deps in graph().items() for line, d, _ in deps if d in TOP]
    assert not bad, f'agenb.train / agenb.launch / agenb.experiment must not be imported by other modules: {bad}'


def test_agenb_imports_are_at_the_top_of_each_module():
    bad = [(m, line, d) for m, deps in graph().items() for line, d, top in deps if not top]
    assert not bad, f'imports of agenb modules inside functions hide the graph: {bad}'


def test_chapter_numbers_follow_the_import_order():
    "A chapter imports only lower-numbered chapters (`03a` comes after `03` and before `04`, as in fastai's notebooks)."
    number = {}
    for nb in (ROOT / 'nbs').glob('[0-9][0-9]*_*.ipynb'):
        n = re.match(r'(\d\d)([a-z]?)_', nb.name)
        m = re.search(r'#\| default_exp (\w+)', nb.read_text())
        if n and m: number[m.group(1)] = (int(n.group(1)), n.group(2))
    assert set(number) == {m for m in graph()}, 'every module comes from one numbered chapter'
    bad = [(m, d) for m, deps in graph().items() for _, d, _ in deps if number[d] >= number[m]]
    assert not bad, f'chapters importing a chapter that is not lower-numbered: {bad}'
