"""Deliberate breaks of the README's promises, each applied to a scratch copy of the tree, and
the test that must then fail.

    python tools/mutate.py            # every break; exit 1 if a test misses one
    python tools/mutate.py 3 7        # breaks 3 and 7 only
    python tools/mutate.py --list     # what each break does, and its test

Why: a test that passes whatever the code does proves nothing. Each break is one exact text
replacement (the ``old`` text must occur once, which ``tests/test_mutations.py`` checks on
every run, so a refactor that moves the code shows up there rather than as a silent no-op);
the copy leaves out ``.venv``, ``runs`` and ``.git``. docs/reliability.md lists the results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    """Promise broken, file, text replaced, its replacement, the test that must fail."""

    promise: str
    file: str
    old: str
    new: str
    test: str


BREAKS = [
    Break('validate on the relabelled targets, not the true labels',
          'search/objective.py',
          'inputs.images[val], labels[val],',
          'inputs.images[val], inputs.targets[val],',
          'tests/test_objective.py::test_relabelling_changes_training_targets_only'),
    Break('train on the true labels, not the relabelled targets',
          'search/objective.py',
          'training_targets(data.table, cfg.age_threshold)',
          'data.labels',
          'tests/test_objective.py::test_relabelling_changes_training_targets_only'),
    Break('steps numbered epoch-major (epoch * folds + fold)',
          'search/study_settings.py',
          'return fold if per_fold else fold * epochs + epoch',
          'return fold if per_fold else epoch * 2 + fold',
          'tests/test_objective.py::test_each_epoch_is_reported_at_fold_times_epochs_plus_epoch_in_order'),
    Break('--trials accepts 0',
          'search/run_args.py',
          '    return _whole_number(text, 1)',
          '    return _whole_number(text, 0)',
          'tests/test_cli_errors.py'),
    Break("explain draws with the next fold's model",
          'search/explain.py',
          'heat_maps(cfg, states[int(k)],',
          'heat_maps(cfg, states[(int(k) + 1) % len(states)],',
          'tests/test_after_search.py::test_explain_draws_each_image_through_the_fold_model_that_did_not_train_on_it'),
    Break("predict blends the members equally, not with the submission's weights",
          'search/ensemble/submission.py',
          'return decide(member_probs, self.weights, self.offsets)',
          'return decide(member_probs, np.full(len(self.members), 1 / len(self.members)), '
          'self.offsets)',
          'tests/test_after_search.py::test_predict_prob_is_the_blended_eval_probability_of_its_class'),
    Break('a retried trial never resumes its saved folds',
          'search/objective.py',
          '        if retried_from(trial) is None:\n            return {}',
          '        if True:\n            return {}',
          'tests/test_distributed.py::test_postgres_restart_while_two_workers_run_ends_with_exactly_n'),
    Break('s3:// is read as a local folder per process (nothing shared through S3)',
          'search/artifacts.py',
          '        store = optuna.artifacts.Boto3ArtifactStore(bucket)',
          '        store = AtomicFileSystemArtifactStore(Path(tempfile.mkdtemp()))',
          'tests/test_s3.py::test_a_search_its_ensemble_and_predict_share_artifacts_through_s3'),
    Break("the artifact's id is recorded before its upload succeeds",
          'search/artifacts.py',
          '    artifact_id = upload_artifact(',
          '    trial.set_user_attr(attr_name(name), str(uuid.uuid4()))\n'
          '    artifact_id = upload_artifact(',
          'tests/test_s3.py::test_the_server_gone_mid_run_is_one_line_and_records_no_artifact'),
    Break('--hours read as minutes',
          'search/run.py',
          'Budget.of(args.hours * 3600 if',
          'Budget.of(args.hours * 60 if',
          'tests/test_run_flags.py::test_the_time_budget_stops_the_run_at_an_epoch_and_the_summary_says_so'),
    Break('--timeout ignored',
          'search/run.py',
          'Budget.of(args.hours * 3600 if args.hours else args.timeout,',
          'Budget.of(args.hours * 3600 if args.hours else None,',
          'tests/test_run_flags.py::test_the_time_budget_stops_the_run_at_an_epoch_and_the_summary_says_so'),
    Break('the budget checked between trials only, not per epoch',
          'search/worker/budget.py',
          '        if self.left() <= 0:\n            raise TimeBudgetExceeded',
          '        if False:\n            raise TimeBudgetExceeded',
          'tests/test_run_flags.py::test_the_time_budget_stops_the_run_at_an_epoch_and_the_summary_says_so'),
    Break('--hours keeps no time for the final stage',
          'search/worker/budget.py',
          'return left > 0 and left - self.reserve_s(study) >= self.expected_trial_s(study)',
          'return left > 0 and left >= self.expected_trial_s(study)',
          'tests/test_run_flags.py::test_hours_keep_time_for_the_final_stage_and_use_the_rest'),
    Break('--loader-workers default ignores the worker processes sharing the cores',
          'core/loader.py',
          '(cores or 1) // max(1, processes) - 1',
          '(cores or 1) - 1',
          'tests/test_run_flags.py::test_each_worker_process_gets_its_share_of_loader_workers'),
    Break('--sampler random gives TPE',
          'search/study_settings.py',
          '    if name == "random":',
          '    if name == "never":',
          'tests/test_run_flags.py::test_sampler_flag_picks_the_search_s_sampler'),
    Break('--max-retry ignored (retries unbounded)',
          'search/worker/claims.py',
          '        return Retry(max_retry=max_retry)',
          '        return Retry(max_retry=None)',
          'tests/test_run_flags.py::test_max_retry_bounds_the_attempts_of_a_trial_that_kills_its_worker'),
    Break('ensemble --pool-margin ignored (the default 0.05)',
          'search/ensemble/cli.py',
          '    margin = None if args.pool_margin is None or args.pool_margin < 0 '
          'else args.pool_margin',
          '    margin = 0.05',
          'tests/test_ensemble_flags.py::test_pool_margin_lets_a_weak_but_complementary_trial_in'),
    Break('ensemble --init ignored',
          'search/ensemble/cli.py',
          'init=max(1, args.init)',
          'init=1',
          'tests/test_ensemble_flags.py::test_init_starts_from_the_n_best_trials'),
    Break('ensemble --margin ignored',
          'search/ensemble/cli.py',
          'margin=args.margin,',
          'margin=0.005,',
          'tests/test_ensemble_flags.py::test_margin_is_what_an_addition_must_gain'),
    Break('ensemble --bags ignored',
          'search/ensemble/cli.py',
          'bags=max(1, args.bags)',
          'bags=1',
          'tests/test_ensemble_flags.py::test_bags_spread_the_weight_over_equally_good_trials'),
    Break('ensemble --objective ignored',
          'search/ensemble/cli.py',
          'objective=args.objective,',
          'objective="f1",',
          'tests/test_ensemble_flags.py::test_objective_logloss_takes_a_trial_that_only_sharpens_the_probabilities'),
    Break('ensemble --offsets ignored (always tried)',
          'search/ensemble/cli.py',
          'offsets=args.offsets)',
          'offsets="age")',
          'tests/test_ensemble_offsets.py::test_offsets_none_keeps_the_plain_argmax'),
    Break('offsets always kept when tried',
          'search/ensemble/choice.py',
          'use = recipe.offsets != "none" and nested[True] > nested[False] + NESTED_MARGIN',
          'use = recipe.offsets != "none"',
          'tests/test_ensemble_offsets.py::test_offsets_that_do_not_help_are_not_kept'),
    Break('offsets never kept',
          'search/ensemble/choice.py',
          'use = recipe.offsets != "none" and nested[True] > nested[False] + NESTED_MARGIN',
          'use = False',
          'tests/test_ensemble_offsets.py::test_offsets_that_fix_an_under_predicted_group_are_kept'),
    Break('a rerun with other --epochs accepted',
          'search/study_settings.py',
          '        if key in given and stored[key] != asked[key]:',
          '        if key in given and stored[key] != asked[key] and key != "epochs":',
          'tests/test_run_flags.py::test_a_rerun_with_other_epochs_or_corrections_is_refused'),
    Break('a rerun with other --corrections accepted',
          'search/study_settings.py',
          '        if key in given and stored[key] != asked[key]:',
          '        if key in given and stored[key] != asked[key] and key != "corrections":',
          'tests/test_run_flags.py::test_a_rerun_with_other_epochs_or_corrections_is_refused'),
    Break("a rerun takes the module's new fold seed",
          'search/study_settings.py',
          '        settled[key] = stored[key]',
          '        settled[key] = asked[key] if key == "fold_seed" else stored[key]',
          'tests/test_run_flags.py::test_a_rerun_keeps_the_study_s_fold_seed'),
    Break('a worker with other weights accepted',
          'search/study_settings.py',
          '        if key in given and stored[key] != asked[key]:',
          '        if key in given and stored[key] != asked[key] and key != "weights":',
          'tests/test_mask_study.py::test_a_worker_with_other_weights_is_refused_in_one_line'),
    Break('pseudo-labels taken below the threshold',
          'search/pseudo_labels.py',
          'sure = class_confidence(probs, classes) >= threshold',
          'sure = class_confidence(probs, classes) >= threshold - 0.1',
          'tests/test_pseudo_labels.py::test_a_refit_trains_on_the_sure_eval_images_only_when_asked'),
    Break('pseudo-labels recorded but never trained on',
          'search/objective.py',
          '        if self.pseudo is None:\n            return images, targets',
          '        if True:\n            return images, targets',
          'tests/test_pseudo_labels.py::test_a_refit_trains_on_the_sure_eval_images_only_when_asked'),
    Break('retention reads the study outside the claim lock',
          'search/worker/retention.py',
          '        with self.lock():',
          '        with contextlib.nullcontext():',
          'tests/test_search.py::test_retention_waits_for_a_reaper_between_failing_a_trial_and_queueing_its_retry'),
    Break('the final stage trusts any OOF lead over the recipe, however small',
          'search/worker/final_choice.py',
          '        if low <= 0:',
          '        if diff <= 0:',
          'tests/test_final_choice.py::test_choose_final_refits_the_recipe_when_the_best_leads_it_by_noise'),
]


def apply(brk: Break, tree: Path) -> None:
    """Replace ``brk.old`` (which must occur exactly once) in ``tree/brk.file``."""
    path = tree / brk.file
    text = path.read_text()
    if text.count(brk.old) != 1:
        raise SystemExit(f"{brk.file}: the text to break occurs {text.count(brk.old)} times, "
                         f"not once ({brk.promise})")
    path.write_text(text.replace(brk.old, brk.new))


def caught(brk: Break) -> tuple[bool, str]:
    """Run ``brk.test`` on a broken copy: (it failed, its summary and first error line)."""
    with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", "runs", ".git",
                                                                  "__pycache__"))
        apply(brk, tree)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            brk.test], cwd=tree, capture_output=True, text=True)
    out = [line for line in r.stdout.splitlines() if line.strip()]
    errors = [line.strip()[:120] for line in out if line.startswith("E ")]
    return r.returncode != 0, " | ".join(out[-1:] + errors[:1])


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for i, b in enumerate(BREAKS):
            print(f"{i:2d} {b.promise}\n   {b.file} -> {b.test}")
        return 0
    chosen = [int(a) for a in argv] or range(len(BREAKS))
    missed = 0
    for i in chosen:
        ok, said = caught(BREAKS[i])
        missed += not ok
        print(f"{i:2d} {'CAUGHT' if ok else 'MISSED'}  {BREAKS[i].promise}  ({said})",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
