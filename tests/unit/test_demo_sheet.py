"""The demo's overview picture: a row per concept with its photos and each method's sample grid."""

from PIL import Image

from pipelines.demo_sheet import HEADER, SCALE, demo_sheet


def test_one_row_per_concept_that_every_method_finished(tmp_path):
    runs, concepts = tmp_path / "runs", tmp_path / "concepts"
    for concept, colour in (("zebra-star", (200, 0, 200)), ("owl-hexagon", (200, 120, 0))):
        (concepts / concept).mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(concepts / concept / "0.png")
        for method in ("textual_inversion", "dreambooth"):
            (runs / concept / method).mkdir(parents=True)
            Image.new("RGB", (128, 228), (0, 90, 0)).save(runs / concept / method / "samples.png")
    (runs / "half-done" / "textual_inversion").mkdir(parents=True)  # a concept without every method's grid
    sheet = Image.open(demo_sheet(runs, concepts, ["textual_inversion", "dreambooth"], tmp_path / "sheet.png"))
    assert sheet.size == ((64 + 128 + 128 + 3 * 8) * SCALE, (HEADER + 2 * (228 + HEADER)) * SCALE)
    # the first row is owl-hexagon (sorted): its photo's colour, then a method's grid
    y = (HEADER + HEADER + 12 + 32) * SCALE
    assert sheet.getpixel((32 * SCALE, y)) == (200, 120, 0)
    assert sheet.getpixel(((64 + 8 + 64) * SCALE, y)) == (0, 90, 0)
    assert demo_sheet(runs, concepts, ["custom_diffusion"], tmp_path / "none.png") is None
