"""Lay out the scratch folder `make mutate` runs mutmut in: agenb/, tests/ and setup.cfg (mutation/mutmut.cfg).

mutmut does not mutate decorated functions, and agenb.trainer adds the trainer's methods (`fit`, `train_epoch`,
`predict`, `state`, ...) with fastcore's `@patch`. In the scratch copy of agenb/trainer.py each

    @patch
    [@other decorators]
    def name(self: Trainer, ...): ...

becomes the same function undecorated, followed by `patch([decorators](name))`: the same code attached to the same
class, so those methods are mutated too.

Only the functions in MUTATE are mutated: the others get mutmut's `# pragma: no mutate block` in the scratch copy
(mutmut 3.8's do_not_mutate_patterns only guards removals, so a pragma is the way to leave a function out). Nothing
else changes; the working tree is never touched."""
import re, shutil, sys
from pathlib import Path

import libcst as cst

ROOT = Path(__file__).resolve().parents[1]

# The code whose bugs would falsify results: which images train/validate/test, the numbers reported, the trainer's
# decisions (validation over all ranks, best model, plateau, early stop) and checkpoints, and the preprocessing
# predict/export/explain apply. 'Class' mutates a whole class, 'Class.method' one method. Everything else in these
# modules is left out (see "Scope" in mutation/NOTES.md): display, CLI plumbing, input validation, the training
# loop's mechanics (`train_epoch`, `batch`, `train_batches`: what a step does, checked end to end by the exact-resume
# and reproduction tests), the config.json wording of the schedule (`LRSchedule.describe`), the upgrade of agenb
# 0.1.0 checkpoints (`runs._upgrade`), and DDP/GPU-only code reached only under torchrun or CUDA.
MUTATE = {
    'split.py': {'_n_of', '_age_bins', '_pick', '_assign', '_keep_mask', 'apply_filter', 'check_no_leakage', '_from_file'},
    'evaluate.py': {'_arrays', '_corr', 'regression_metrics', 'age_group_table', 'subject_level', 'fit_bias_correction',
                    'apply_bias_correction', '_evaluate'},
    'trainer.py': {'eval_shard', 'LRSchedule.__init__', 'LRSchedule.step', 'LRSchedule.state_dict',
                   'LRSchedule.load_state_dict', 'predict', 'validate', 'fit', 'state', 'load_state', '_rng_state',
                   '_set_rng_state', 'RunWriter.end_of_epoch'},
    'runs.py': {'run_options', 'read_split', 'run_bias_correction', 'make_checkpoint', 'load_checkpoint',
                'load_run_model', 'predict_batches', 'predict_split',
                # a --subject-views run's pooled inference and the distribution head's intervals (issue 29)
                'distribution_head', 'model_kwargs', 'predict_outputs', 'predict_subject_outputs', 'outputs_to_age',
                'per_subject_rows', 'interval_tables', 'calibration'},
    'predict.py': {'tta_views', 'apply_view', 'parse_subject', 'read_images', 'predict_tensor', 'predict_images',
                   'subject_table', 'metrics_for',
                   # an experiment's test subjects stay closed to predict (issue 29)
                   'experiment_of', 'experiment_test_images'},
    # Where experiments decide (issue 29): the statistics chapter (bootstrap intervals, paired comparisons, Holm, the
    # OOF table's checks, the two-level bootstrap, the family-wise max-t rule and the leaderboard; not the sentences of
    # `board_notes` nor the simulation `simulate_oof`/`flag_rates` the tests use), the experiment protocol (test
    # subjects set aside, age filter, folds, the final split, the split files rebuilt from the record, the test-set
    # openings), the age-gap statistics (not its CLI, figures, HTML or the run-data guard), and the model's view
    # pooling, heads and their decoding (not the backbones, weights loading, freezing or covariate plumbing).
    'stats.py': {'resample_counts', 'percentile_interval', 'mean_ci', 'paired_difference', 'ratio_ci',
                 'two_sample_resamples', 'holm', 'check_oof', 'subject_errors', 'error_cubes', 'boot_means', 'max_t',
                 'compare_with', 'leaderboard'},
    'exp_protocol.py': {'_subjects', '_quiet_split', 'make_protocol', 'protocol_labels', 'opening_counts'},
    'gap_stats.py': {'correction_applied', 'subject_gaps', 'cohens_d', '_d_rows', '_auc_rows', '_ci', '_mean_ci',
                  'compare_gaps', 'age_bands', 'band_table', 'age_adjusted', '_group_summary', 'agegap_stats'},
    'model.py': {'AgeNet', 'RegressionHead.loss', 'RegressionHead.age', 'DistributionHead.__init__',
                 'DistributionHead.soft_labels', 'DistributionHead.loss', 'DistributionHead.probs', 'DistributionHead.age',
                 'DistributionHead.summary', 'AgeOutput', 'parse_age_bins', 'coverage', 'subject_groups', 'draw_views',
                 'view_batches'},
    # The fold jobs of a variant and their keys, the check of a finished fold run against the protocol (its test
    # subjects, its train/val/test subjects, its predictions) and the OOF coverage check of `report` (each fold job's
    # rows exactly its held-out subjects, every development subject exactly once per variant and seed).
    'exp_jobs.py': {'slug', 'variant_jobs', 'final_jobs', 'development_subjects', 'verify_run', 'fold_frame', 'subject_mae'},
    'exp_worker.py': {'_job_oof', 'collect_oof'},
}


def _docstring(stmt):
    return (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Expr)
            and isinstance(stmt.body[0].value, (cst.SimpleString, cst.ConcatenatedString)))


class _Exclude(cst.CSTTransformer):
    """Put `# pragma: no mutate block` on every function or class header not named in `keep`, and take the docstring
    out of the functions that are kept (a mutated docstring cannot change a result; mutating it only costs time)."""
    def __init__(self, keep):
        self.keep, self.cls = keep, []
    def _mark(self, node):
        c = cst.Comment('# pragma: no mutate block')
        if isinstance(node.body, cst.IndentedBlock):
            return node.with_changes(body=node.body.with_changes(header=cst.TrailingWhitespace(
                whitespace=cst.SimpleWhitespace('  '), comment=c, newline=node.body.header.newline)))
        return node.with_changes(body=node.body.with_changes(trailing_whitespace=cst.TrailingWhitespace(
            whitespace=cst.SimpleWhitespace('  '), comment=cst.Comment('# pragma: no mutate'))))
    def visit_ClassDef(self, node):
        self.cls.append(node.name.value)
    def leave_ClassDef(self, original, updated):
        name = self.cls.pop()
        if name in self.keep or any(k.startswith(name + '.') for k in self.keep): return updated
        return self._mark(updated)
    def visit_FunctionDef(self, node):
        return False                                   # nested functions follow their parent
    def leave_FunctionDef(self, original, updated):
        name = '.'.join([*self.cls, updated.name.value])
        if not (self.cls and self.cls[0] in self.keep) and name not in self.keep: return self._mark(updated)
        body = updated.body.body
        if len(body) > 1 and _docstring(body[0]): updated = updated.with_deep_changes(updated.body, body=body[1:])
        return updated


def exclude(src: str, keep: set) -> str:
    return cst.parse_module(src).visit(_Exclude(keep)).code


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
    for name, keep in MUTATE.items():
        f = dest / 'agenb' / name
        src = exclude(f.read_text(), keep)
        defined = set(re.findall(r'^(?:def|class) (\w+)', src, re.M)) | {
            f'{c}.{m}' for c in re.findall(r'^class (\w+)', src, re.M) for m in re.findall(r'^    def (\w+)', src, re.M)}
        assert keep <= defined, f'{name}: {sorted(keep - defined)} not found; update MUTATE in mutation/prepare.py'
        compile(src, str(f), 'exec')
        f.write_text(src)


if __name__ == '__main__': main(sys.argv[1])
