"""``vlm bench stream``: a stage trained map-style and streamed from shards converted by ``vlm data
convert``, in turn; samples/s of both, their ratio, and peak memory per streamed data size."""

from __future__ import annotations

import json

import pytest
from conftest import run_config, run_vlm


def stage(shapes, **fields) -> dict:
    train = shapes["train"]
    s = {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
         "data": [{"format": "coco_captions", "max_samples": 16, "args": {"path": train["captions"], "image_root": train["image_root"]}}],
         "learning_rate": 3e-3, "batch_size": 4, "max_steps": 4, "log_every": 1, "warmup_ratio": 0.0}
    s.update(fields)
    return {"s": s}


def converted(tmp_path, tokenizer_dir, shapes, capsys) -> tuple:
    """A recipe with stage ``s`` (16 captions) and its data converted by ``vlm data convert``: (recipe, shards)."""
    run_config(tmp_path, tokenizer_dir, stage(shapes))
    recipe = tmp_path / "recipe_0.yaml"
    code, out, err = run_vlm(["data", "convert", recipe, "--stage", "s", "--to", "webdataset",
                              "--out", tmp_path / "wds", "--shard-size", 5], capsys)
    assert code == 0, err
    shards = json.loads(out)["data_entry"]["args"]["shards"]
    assert shards.endswith("{000000..000003}.tar")  # 16 samples in shards of 5
    return recipe, shards


def bench(capsys, recipe, out, *flags) -> dict:
    """``vlm bench stream RECIPE --stage s --out OUT FLAGS``, which must succeed: its JSON report."""
    code, printed, err = run_vlm(["bench", "stream", recipe, "--stage", "s", "--out", out, *flags], capsys)
    assert code == 0, err
    return json.loads(printed)


def test_vlm_bench_stream_reports_both_throughputs_and_their_ratio(tmp_path, tokenizer_dir, shapes_data, capsys):
    recipe, shards = converted(tmp_path, tokenizer_dir, shapes_data, capsys)
    result = bench(capsys, recipe, tmp_path / "b", "--shards", shards, "--steps", 2, "--warmup", 1, "--repeats", 2,
                   "--memory-sizes", "", "--json")
    assert (result["stage"], result["steps"], result["shards"], result["shard_samples"]) == ("s", 2, shards, 16)
    assert not result["converted"] and result["memory"] == {"runs": []}
    for mode in ("map", "stream"):
        assert [r["samples"] for r in result[mode]["runs"]] == [2 * 4, 2 * 4]
        assert result[mode]["samples_per_s"] > 0 and result[mode]["samples_per_cpu_s"] > 0
    # the same samples per optimizer step, streamed and map-style, in every repeat
    assert result["stream"]["samples_per_step"] == result["map"]["samples_per_step"] == [[4, 4, 4]] * 2
    assert result["ratio"] == pytest.approx(result["stream"]["samples_per_s"] / result["map"]["samples_per_s"],
                                            rel=1e-2)
    assert result["ratio_cpu"] == pytest.approx(
        result["stream"]["samples_per_cpu_s"] / result["map"]["samples_per_cpu_s"], rel=1e-2)
    assert (tmp_path / "b" / "bench_stream" / "stream" / "final").is_dir()


def test_a_memory_run_streams_the_first_k_samples_and_reports_its_peaks(tmp_path, tokenizer_dir, shapes_data,
                                                                        capsys):
    from vlm.app.bench.stream import memory_run

    recipe, shards = converted(tmp_path, tokenizer_dir, shapes_data, capsys)
    spec = {"config": str(recipe), "stage": "s", "shards": shards, "samples": 8, "max_steps": 3,
            "out": str(tmp_path / "m")}
    run = memory_run(spec)
    assert (run["samples"], run["steps"], run["samples_trained"]) == (8, 3, 12)  # 8 samples, batches of 4: 2 epochs begun
    assert run["peak_rss_main_mib"] > 50 and run["peak_rss_children_mib"] >= 0
    assert (tmp_path / "m" / "final").is_dir()


@pytest.mark.slow
def test_vlm_bench_stream_measures_memory_per_size_in_fresh_processes(tmp_path, tokenizer_dir, shapes_data, capsys):
    recipe, shards = converted(tmp_path, tokenizer_dir, shapes_data, capsys)
    memory = bench(capsys, recipe, tmp_path / "b", "--shards", shards, "--steps", 1, "--warmup", 1, "--repeats", 1,
                   "--memory-sizes", "16,8", "--json")["memory"]
    small, large = memory["runs"]
    assert (small["samples"], large["samples"]) == (8, 16)
    assert small["steps"] == large["steps"] == 2 and small["samples_trained"] == large["samples_trained"] == 8
    assert small["peak_rss_main_mib"] > 50 and large["peak_rss_main_mib"] > 50
    assert memory["ratio"] == pytest.approx(large["peak_rss_main_mib"] / small["peak_rss_main_mib"], rel=1e-2)
    assert (tmp_path / "b" / "bench_stream" / "memory_16" / "final").is_dir()
    with pytest.raises(Exception, match=r"--memory-sizes: 17 samples asked, the shards .* hold 16"):
        from vlm.app.bench.stream import bench_stream
        from vlm.app.wiring import load_run_config

        bench_stream(load_run_config(recipe), "s", shards=shards, memory_sizes=[17], work_dir=tmp_path / "c")


def test_vlm_bench_stream_converts_the_stage_data_when_no_shards_are_given(tmp_path, tokenizer_dir, shapes_data,
                                                                          capsys):
    run_config(tmp_path, tokenizer_dir, stage(shapes_data))
    result = bench(capsys, tmp_path / "recipe_0.yaml", tmp_path / "b", "--steps", 1, "--warmup", 1, "--repeats", 1,
                   "--memory-sizes", "", "--shard-size", 6)
    work = tmp_path / "b" / "bench_stream" / "shards"
    assert result["converted"] and result["shards"] == f"{work}/{{000000..000002}}.tar"
    assert result["shard_samples"] == 16 and result["memory"] == {"runs": []}
    assert result["stream"]["samples_per_step"] == result["map"]["samples_per_step"] == [[4, 4]]


def test_vlm_bench_stream_refuses_a_bad_stage_or_shards_in_one_line(tmp_path, tokenizer_dir, shapes_data, capsys):
    run_config(tmp_path, tokenizer_dir, stage(shapes_data))
    recipe = tmp_path / "recipe_0.yaml"
    code, _, err = run_vlm(["bench", "stream", recipe, "--stage", "nope", "--out", tmp_path / "b"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("--stage: no stage 'nope'; stages: ['s']")
    missing = f"{tmp_path}/none/{{000000..000003}}.tar"
    code, _, err = run_vlm(["bench", "stream", recipe, "--stage", "s", "--shards", missing, "--out", tmp_path / "b"],
                           capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert f"--shards {missing!r}" in line and "000000.tar does not exist (4 of 4 missing)" in line
    code, _, err = run_vlm(["bench", "stream", recipe, "--stage", "s", "--memory-sizes", "20k",
                            "--out", tmp_path / "b"], capsys)
    assert code == 2 and "--memory-sizes '20k'" in err
