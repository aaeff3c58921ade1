"""The one place a process joins Ray: a cluster when given an address, else an embedded local Ray."""

from __future__ import annotations

import logging
import os

# Ray Train starts a PlacementGroupCleaner per run that asks the State API, once a second,
# whether the controller lives. An embedded Ray has no dashboard, hence no State API, and
# dies with the driver anyway, so the cleaner has nothing to guard: its warning is noise.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_embedded_workers() -> None:
    """Ray worker set-up hook of the embedded Ray: keep the cleaner's State API warnings out of the log.

    The State API finds its cluster through RAY_ADDRESS, else by looking for Ray processes on the machine;
    with a second Ray there (another job, a sweep) the look-up fails and the cleaner's thread dies with a
    traceback, so the workers are pointed at their own cluster.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, log_to_driver: bool = False) -> bool:
    """Connect to `address`, or start a local Ray (no dashboard) with `num_cpus` logical CPUs.

    An already initialised Ray (a Tune trial, a test session) is reused. Returns whether
    this call started it, i.e. whether the caller should shut it down.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

        # The hook reaches every worker through the environment the raylet inherits at ray.init. Given as
        # runtime_env={"worker_process_setup_hook": ...} it made each worker start ~2.5 s slower (a non-empty
        # runtime env), which a run pays for its controller, its workers and its search actors in turn.
        os.environ[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = f"{__name__}.{quiet_embedded_workers.__name__}"
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=log_to_driver)
        finally:
            del os.environ[WORKER_PROCESS_SETUP_HOOK_ENV_VAR]
    return True
