"""The Ray Train trainer of a batch's pack of runs and of a sweep's trial.

Ray Train starts, next to each run's workers, a controller and a few helper actors. Two of them cost memory for
nothing here: the Ray Data shard manager (a process of about 120 MB per run, though a run reads no Ray Dataset)
and, on one worker, torch in the controller (TorchTrainer's backend imports it: about 350 MB per run, for a
process group a single worker does not need). A run on one worker therefore gets Ray's plain data-parallel
trainer without the shard manager; a run on several workers keeps the torch backend, which sets up the process
group that personalize/distributed.py averages gradients over.
"""

from __future__ import annotations

from ray.train import RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


class RunTrainer(DataParallelTrainer):
    """Ray's data-parallel trainer, less the Ray Data callback when the run is given no dataset."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def make_trainer(train_fn, config: dict, scaling: ScalingConfig, run_config: RunConfig) -> RunTrainer:
    backend = None
    if scaling.num_workers > 1:
        from ray.train.torch import TorchConfig

        backend = TorchConfig()
    return RunTrainer(train_fn, train_loop_config=config, backend_config=backend, scaling_config=scaling,
                      run_config=run_config)
