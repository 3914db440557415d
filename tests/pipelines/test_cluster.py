"""What a Ray cluster joined or started by the pipeline gives its workers."""

import os


def test_ray_train_controllers_poll_their_workers_every_half_second(local_ray):
    from pipelines.cluster import forwarded_env

    @local_ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    assert local_ray.get(seen.remote()) == "0.5"  # every start and finish of a run waits for a poll: Ray's default is 2 s
    assert forwarded_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # reaches a trainer started from a Ray task
