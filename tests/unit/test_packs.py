"""How a batch cuts its runs into packs, each trained in turn by one Ray Train run."""

import pytest

from pipelines.train import MAX_PACK, pack_name, pack_runs, pack_size
from tests.conftest import draw_concept


@pytest.mark.parametrize(("runs", "concurrency", "limit", "size"), [
    (0, 3, None, 1), (1, 1, None, 1), (4, 2, None, 2), (20, 3, None, 7), (5, 8, None, 1), (2000, 64, None, MAX_PACK),
    (100, 64, None, 2), (130, 64, None, 3), (17, 2, None, 5), (20, 3, 1, 1), (20, 3, 12, 12)])
def test_pack_size_fills_every_slot_with_evenly_sized_packs(runs, concurrency, limit, size):
    assert pack_size(runs, concurrency, limit) == size
    if limit is None:
        packs = -(-runs // size)
        waves = -(-packs // concurrency)
        assert size <= MAX_PACK and packs > concurrency * (waves - 1)  # the last wave is not left nearly empty


def test_pack_names_are_stable_and_distinct(tmp_path, tiny_model):
    from personalize.config import resolve_runs
    from personalize.run_settings import ExperimentConfig

    images = draw_concept(tmp_path / "ball", n=2)
    specs = resolve_runs(ExperimentConfig.model_validate({
        "model": str(tiny_model), "method": "textual_inversion", "output_dir": str(tmp_path / "runs"),
        "concepts": [{"id": f"c{i}", "images": str(images), "super_category": "ball"} for i in range(5)]}))
    packs = pack_runs(specs, 2)
    assert [len(p) for p in packs] == [2, 2, 1]
    names = [pack_name(p) for p in packs]
    assert names == [pack_name(p) for p in pack_runs(specs, 2)] and len(set(names)) == 3
    assert names[0].startswith("c0--textual_inversion--and-1-more--")
    assert names[2] == f"c4--textual_inversion--{specs[4].config_hash()}"  # a pack of one keeps the run's own name
