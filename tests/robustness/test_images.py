"""Images: every PIL mode reaches the model as the right 8-bit RGB, EXIF orientation is applied,
huge images are refused before decoding, unreadable images are skipped and counted (also with
data-loader workers), a stage whose images mostly fail stops with a clear error, and `vlm eval`
scores what it can read."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import run_config
from PIL import Image, ImageFile
from robust_helpers import Project, error_line, run_vlm

import vlm.app.stages
from vlm.core.errors import ImageLoadError
from vlm.data.images import open_image, to_rgb


def rgb(image) -> np.ndarray:
    return np.asarray(to_rgb(image))


def test_16_bit_png_is_scaled_not_white(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    image = open_image(str(path))
    assert image.mode.startswith("I")  # what PIL reads a 16-bit PNG into
    assert np.all(np.abs(rgb(image).astype(int) - 128) <= 1)  # mid-grey, not clipped to 255


def test_mode_i_full_range_and_mode_f_unit_range():
    image_i = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert rgb(image_i)[0, :, 0].tolist() == [0, 255]
    image_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert rgb(image_f)[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_la_and_rgba_composite_on_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert rgb(palette).tolist() == [[[255, 255, 255], [255, 0, 0]]]
    assert rgb(Image.new("LA", (1, 1), (0, 0))).tolist() == [[[255, 255, 255]]]
    assert rgb(Image.new("RGBA", (1, 1), (0, 0, 255, 255))).tolist() == [[[0, 0, 255]]]


def test_cmyk_converts():
    assert rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).tolist() == [[[255, 255, 255]]]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert open_image(str(path)).size == (20, 40)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("1", (3000, 3000)).save(path)

    def no_decoding(self):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"huge\.png: 3000 x 3000 .*max_image_pixels"):
        open_image(str(path), max_pixels=1_000_000)


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="broken.png"):
        open_image(str(path))


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    return Project(tmp_path, shapes_data, tokenizer_dir)


def corrupt(paths):
    for path in paths:
        path.write_bytes(b"not a png")


def test_all_images_failing_stops_with_a_clear_error_not_a_reshape(project, capsys):
    corrupt(project.images())
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and "stage 'align' step 1" in line and "unreadable images" in line and "image_root" in line
    assert "reshape" not in err
    assert not list(project.out.rglob("*.safetensors"))


def test_a_batch_without_images_is_skipped_even_when_failures_are_allowed(project, capsys):
    corrupt(project.images())
    project.stage()["max_image_failure_ratio"] = 1.0
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    assert code == 2 and "a whole epoch of batches without a readable image" in error_line(err)


def test_images_over_the_pixel_limit_are_skipped_then_stop_the_stage(project, capsys):
    project.stage()["max_image_pixels"] = 100  # the 32 x 32 shapes have 1024
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    assert code == 2 and "unreadable images" in error_line(err)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_counts_are_right_with_and_without_workers(project, tokenizer_dir, caplog, workers):
    corrupt(project.images()[:3])
    stage = project.stage()
    stage.update(num_workers=workers, max_steps=4, batch_size=4)  # one epoch: every sample once
    stage["data"] = [{"format": "llava_json",  # one sample per image
                      "args": {"path": project.train["conversations"], "image_root": project.train["image_root"]}}]
    cfg = run_config(project.root, tokenizer_dir, project.recipe["stages"], out_dir=project.out)
    run = vlm.app.stages.build_stage(cfg, "align")
    with caplog.at_level(logging.WARNING):
        run.trainer.train()
    # 3 corrupt images, each with one caption (16 samples): counted in the main process
    assert run.trainer.skips.skipped_samples == 3 and run.trainer.skips.samples == 16
    assert "3 of 16 samples skipped for unreadable images" in caplog.text


def test_eval_scores_what_it_can_read_and_reports_the_rest(project, tokenizer_dir, capsys):
    cfg = run_config(project.root, tokenizer_dir, project.recipe["stages"], out_dir=project.out)
    final = vlm.app.stages.run_stage(cfg, "align")
    project.images("test")[0].unlink()
    code, out, err = run_vlm(["eval", project.write(), "--checkpoint", final, "--out", project.out], capsys)
    assert code == 0, err[-2000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["caption"]["skipped_unreadable"] == 1
    results = json.loads((project.out / "eval" / "caption_results.json").read_text())
    assert len(results) == len(project.images("test"))  # every readable image was captioned
