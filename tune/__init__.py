"""`adatt tune`: Ray Tune search over the AdaTT design space, each trial an MLflow child run.

`tune.space` reads and validates the search space, `tune.trial` is the per-trial driver
(Ray Train V2 under Tune), `tune.search` runs the search and `tune.report` summarises it.
"""
