"""Statistics on the exact environment: is what gadiag reports right?

    estimators   compare / summarize / unbiasedness / noise_correction_report:
                 an estimator's ideal vectors and cosines against exact ones
    objectives   check_objective: closed-form vectors against autograd of each
                 objective's loss()
    records      environment_records: run-like token and rollout records on the
                 exact environment (estimated and exact)
    leaderboard  leaderboard_errors / split_stats / budget_agreement: what a
                 leaderboard prints (means, intervals, per split) against exact

The exact environment (gadiag_tasks.toy_env), estimators and objectives are
passed in: this package imports no plugin. `gadiag-harness selfcheck`
(gadiag_core.commands.selfcheck) parses arguments, builds them and prints.
"""
