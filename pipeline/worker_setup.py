"""What every Ray worker process of a job runs when it starts (Ray's
`worker_process_setup_hook`, set by `pipeline.session`).

Every process of the job pays for this module's imports: Train's controller, its
placement-group cleaner and synchronisation actor, Ray Data's read tasks. It imports
nothing of the project's and nothing heavy (`pipeline.session` imports MLflow, torch and
the config models: 3.3 s per process on the 2-CPU machine, on which a tiny training
starts five such actors at once).
"""

from __future__ import annotations

import logging


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines to its log file only (`ray-data.log`), warnings still shown.
    Runs in the driver and, as Ray's worker setup hook, in every worker of the job."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers first)

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    # Progress bars are off on purpose (`ingest.configure_ray_data`); without this each
    # new process of the job (every epoch's split coordinator) warns once that they are.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
