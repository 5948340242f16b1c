"""``vlm data convert`` and ``vlm data inspect``: a stage's data as shards that read back the same,
and a report of counts, skipped records with reasons, token lengths and rendered samples."""

from __future__ import annotations

import json

from conftest import run_config, run_vlm

from vlm.data.formats import read_samples
from vlm.data.inspection import histogram


def recipe(tmp_path, tokenizer_dir, data, template="plain"):
    run_config(tmp_path, tokenizer_dir, {"s": {"data": data, "max_length": 40, "template": template}})
    return sorted(tmp_path.glob("recipe_*.yaml"))[-1]


def test_convert_then_inspect_the_shards(tmp_path, tokenizer_dir, shapes_data, capsys):
    train = shapes_data["train"]
    data = [{"format": "coco_captions", "max_samples": 9,
             "args": {"path": train["captions"], "image_root": train["image_root"]}},
            {"format": "llava_json", "args": {"path": train["conversations"], "image_root": train["image_root"]}}]
    config = recipe(tmp_path, tokenizer_dir, data)
    code, out, err = run_vlm(["data", "convert", config, "--stage", "s", "--to", "webdataset",
                              "--out", tmp_path / "shards", "--shard-size", "8"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    conversations = len(json.loads(open(train["conversations"]).read()))
    assert summary["samples"] == 9 + conversations and summary["skipped"] == 0
    assert [s["samples"] for s in summary["sources"]] == [9, conversations]
    assert summary["shards"] == -(-summary["samples"] // 8)

    # the shards, read back, hold the same conversations; inspect reports them
    shards = recipe(tmp_path, tokenizer_dir, [summary["data_entry"]])
    code, out, err = run_vlm(["data", "inspect", shards, "--stage", "s", "--show", "2"], capsys)
    assert code == 0, err
    report = json.loads(out.split("\n--- sample")[0])
    assert report["samples"] + report["skipped"]["total"] == summary["samples"]
    assert sum(b["count"] for b in report["text_tokens"]["histogram"]) == report["samples"]
    assert out.count("--- sample") == 2 and "[[" in out and "<image>" in out
    from vlm.app.wiring import load_run_config

    back = read_samples(load_run_config(shards).stages.s.data, "<image>")
    original = read_samples(load_run_config(config).stages.s.data, "<image>")
    assert [[t.content for t in s.turns] for s in back] == [[t.content for t in s.turns] for s in original]


def test_inspect_names_skipped_records_and_why(tmp_path, tokenizer_dir, capsys):
    rows = [{"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"id": "long", "conversations": [{"from": "human", "value": "word " * 30 + "<image>"},
                                             {"from": "gpt", "value": "x"}], "image": "a.png"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    config = recipe(tmp_path, tokenizer_dir, [{"format": "llava_json", "args": {"path": str(tmp_path / "rows.json")}}],
                    template="chatml")
    code, out, err = run_vlm(["data", "inspect", config, "--stage", "s"], capsys)
    assert code == 0, err
    report = json.loads(out.split("\n--- sample")[0])
    assert report["sources"][0]["samples"] == 1 and report["skipped"]["reasons"] == {"too_long": 1}
    assert report["skipped"]["first"][0]["where"].endswith("rows.json#1")
    assert "[[hello" in out


def test_histogram_bins_cover_every_length():
    bins = histogram([3, 4, 4, 9, 12], bins=3)
    assert [b["from"] for b in bins] == [3, 7, 11] and [b["count"] for b in bins] == [3, 1, 1]
