"""The one place a process joins Ray: a cluster when given an address, else an embedded local Ray."""

from __future__ import annotations

import os


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
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=log_to_driver)
    return True
