"""The quality benchmark's contact sheets: the right run's pictures in the right cells."""

from pathlib import Path

import pandas as pd
from PIL import Image

from microworld.sample_sheets import LABEL_WIDTH, _prompt_words, eval_sheet, pair_sheet

TEXTS = ["a photo of a star in the snow", "a photo of a star on the grass", "a sketch of a star"]


def fake_run(work: Path, concept: str, method: str, colours: list[tuple[int, int, int]]) -> str:
    """A finished run's evaluation folder whose sample k (seed 0) is a flat picture of colours[k]."""
    evaluation = work / "seed-0" / "runs" / concept / method / "eval" / "world_eval-x"
    (evaluation / "images").mkdir(parents=True)
    rows = []
    for k, colour in enumerate(colours):
        for s in (0, 1):
            Image.new("RGB", (64, 64), colour if s == 0 else (0, 0, 0)).save(evaluation / "images" / f"p{k:02d}-s{s}.png")
            rows.append({"prompt_index": k, "prompt": TEXTS[k], "text": TEXTS[k], "seed": s})
    pd.DataFrame(rows).to_csv(evaluation / "scores.csv", index=False)
    return str((evaluation / "report.html").relative_to(work))


def test_eval_sheet_puts_each_run_s_samples_in_its_row(tmp_path):
    (tmp_path / "concepts" / "zebra-star").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 255, 0)).save(tmp_path / "concepts" / "zebra-star" / "0.png")
    frame = pd.DataFrame([
        {"concept": "zebra-star", "method": "textual_inversion", "seed": 0, "group": "single", "status": "finished",
         "report": fake_run(tmp_path, "zebra-star", "textual_inversion", [(0, 0, 255), (0, 255, 0), (255, 0, 0)])},
        {"concept": "zebra-star", "method": "dreambooth", "seed": 0, "group": "single", "status": "finished",
         "report": fake_run(tmp_path, "zebra-star", "dreambooth", [(10, 20, 30), (40, 50, 60), (70, 80, 90)])},
        {"concept": "zebra-star", "method": "core", "seed": 0, "group": "single", "status": "failed", "report": None},
    ])
    sheet = Image.open(eval_sheet(frame, tmp_path, tmp_path / "sheet.png")).convert("RGB")
    assert sheet.size == (LABEL_WIDTH + 64 * 4, 28 + 64 * 2)  # photo + 3 prompts; two finished runs, by method name

    def cell(row: int, column: int) -> tuple[int, int, int]:
        return sheet.getpixel((LABEL_WIDTH + 64 * column + 32, 28 + 64 * row + 32))

    assert cell(0, 0) == cell(1, 0) == (255, 255, 0)  # the concept's training photo leads each row
    assert [cell(0, k) for k in (1, 2, 3)] == [(10, 20, 30), (40, 50, 60), (70, 80, 90)]  # dreambooth first
    assert [cell(1, k) for k in (1, 2, 3)] == [(0, 0, 255), (0, 255, 0), (255, 0, 0)]


def test_eval_sheet_without_finished_runs_draws_nothing(tmp_path):
    frame = pd.DataFrame([{"concept": "c", "method": "m", "seed": 0, "group": "single", "status": "failed", "report": None}])
    assert eval_sheet(frame, tmp_path, tmp_path / "sheet.png") is None
    assert not (tmp_path / "sheet.png").exists()


def test_prompt_words_keep_what_differs_between_prompts(tmp_path):
    report = Path(fake_run(tmp_path, "c", "m", [(0, 0, 0)] * 3))
    assert _prompt_words(tmp_path / report) == ["snow", "grass", "sketch"]


def test_pair_sheet_places_each_subject_s_grid_side_by_side(tmp_path):
    samples = tmp_path / "pair-subjects" / "samples"
    samples.mkdir(parents=True)
    Image.new("RGB", (128, 256), (255, 0, 0)).save(samples / "disendiff-seed0-berry-heart.png")
    Image.new("RGB", (128, 256), (0, 0, 255)).save(samples / "disendiff-seed0-zebra-star.png")
    Image.new("RGB", (128, 256), (0, 255, 0)).save(samples / "disendiff-seed1-zebra-star.png")  # another seed
    sheet = Image.open(pair_sheet(tmp_path, tmp_path / "pair.png")).convert("RGB")
    assert sheet.size == (256, 28 + 256)
    assert sheet.getpixel((64, 100)) == (255, 0, 0) and sheet.getpixel((192, 100)) == (0, 0, 255)
    assert pair_sheet(tmp_path, tmp_path / "none.png", seed=5) is None
