"""What a Ray cluster joined or started by the pipeline gives its workers."""

import os


def test_ray_train_controllers_poll_their_workers_every_half_second(local_ray):
    from pipelines.cluster import forwarded_env

    @local_ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    assert local_ray.get(seen.remote()) == "0.5"  # every start and finish of a run waits for a poll: Ray's default is 2 s
    assert forwarded_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # reaches a trainer started from a Ray task


def test_a_local_ray_starts_as_many_workers_at_once_as_it_has_cpus(local_ray):
    """Otherwise, on a 2-core machine, every batch makes the raylet print 'N PYTHON worker processes have been
    started ... 4x the maximum expected startup concurrency (2)' (its default is the machine's cores)."""
    from pathlib import Path

    node = local_ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{raylet}/environ").read_bytes().decode().split("\0") if "=" in item)
    cpus = int(local_ray.cluster_resources()["CPU"])
    assert environ.get("RAY_worker_maximum_startup_concurrency") == str(cpus)
