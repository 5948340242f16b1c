"""Preference tuning: the pair reader and its layouts, pair batches, the dpo / simpo objectives."""

from __future__ import annotations

import json

import pytest
import torch
from preference_data import write_vqa_pairs

from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.formats import read_dataset
from vlm.data.pairs import PairCollator, PairDataset


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    return str(path)


def _record_line(path, n):
    """The line record ``n`` of a JSON list written by :func:`_write` starts on."""
    return [i for i, line in enumerate(open(path).read().split("\n"), start=1) if line == " {"][n]


GOOD = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"}],
        "chosen": "red", "rejected": "blue"}


# ------------------------------------------------------------------------------------- reader

def test_native_pairs_read_with_prompt_turns_and_answers(tmp_path):
    path = _write(tmp_path / "p.json", [GOOD, {**GOOD, "id": "b", "chosen": "green"}])
    samples = read_dataset("preference_json", path=path, image_root=str(tmp_path))
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].turns[-1].role == "user" and samples[0].images == [str(tmp_path / "x.png")]
    assert (samples[1].meta["chosen"], samples[1].meta["rejected"]) == ("green", "blue")
    assert samples[1].meta["source"] == f"{path}:{_record_line(path, 1)}"  # the line its record starts on


@pytest.mark.parametrize("change, message", [
    ({"chosen": None}, "missing field 'chosen'"),
    ({"rejected": "  "}, "field 'rejected' is empty"),
    ({"rejected": "red"}, "fields 'chosen' and 'rejected' are the same answer"),
    ({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "must end with a user turn"),
])
def test_reader_errors_name_the_record(tmp_path, change, message):
    bad = {**GOOD, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    for jsonl in (False, True):
        path = _write(tmp_path / ("p.jsonl" if jsonl else "p.json"), [GOOD, bad], jsonl=jsonl)
        with pytest.raises(DataFormatError) as err:
            read_dataset("preference_json", path=path, image_root=str(tmp_path))
        line = 2 if jsonl else _record_line(path, 1)
        assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_layouts_map_to_pairs(tmp_path):
    rlaif = _write(tmp_path / "r.jsonl", [{"idx": "7", "image_path": "i.png", "question": "Describe.",
                                           "chosen": "a cat", "rejected": "a dog", "ds_name": "x"}], jsonl=True)
    [s] = read_dataset("preference_json", path=rlaif, layout="rlaif_v", image_root=str(tmp_path))
    assert (s.id, s.turns[0].content, s.meta["chosen"], s.images) == ("7", "<image>\nDescribe.", "a cat",
                                                                        [str(tmp_path / "i.png")])
    nxt = _write(tmp_path / "n.json", [{"id": 3, "image": "i.png", "prompt": "<image>\nWhat?", "chosen": "x",
                                        "rejected": "y"}])
    [s] = read_dataset("preference_json", path=nxt, layout="llava_next", image_root=str(tmp_path))
    assert s.turns[0].content == "<image>\nWhat?" and s.meta["rejected"] == "y"

    def completion(text, *ratings):
        return {"model": "m", "response": text,
                "annotations": {k: {"Rating": str(r), "Rationale": ""} for k, r in zip("ABC", ratings)}}
    vlf = _write(tmp_path / "v.jsonl", [
        {"id": "q1", "img_path": "i.png", "prompt": "Q?", "models": ["m"],
         "completions": [completion("ok", 3, 3, 3), completion("best", 5, 4, 5), completion("bad", 1, 2, 1)]},
        {"id": "q2", "img_path": "i.png", "prompt": "Q?", "models": ["m"],
         "completions": [completion("same", 3, 3, 3), completion("alike", 3, 3, 3)]}], jsonl=True)
    [s] = read_dataset("preference_json", path=vlf, layout="vlfeedback", image_root=str(tmp_path))
    assert (s.id, s.meta["chosen"], s.meta["rejected"]) == ("q1", "best", "bad")
    with pytest.raises(ConfigError, match="unknown preference layout 'rlaifv'"):
        read_dataset("preference_json", path=vlf, layout="rlaifv")


def test_hf_dataset_columns_and_embedded_images(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8), (255, 0, 0))
    table = datasets.Dataset.from_dict({"idx": ["1"], "image": [image], "question": ["Color?"],
                                        "chosen": ["red"], "rejected": ["blue"]},
                                       features=datasets.Features({"idx": datasets.Value("string"),
                                                                   "image": datasets.Image(),
                                                                   "question": datasets.Value("string"),
                                                                   "chosen": datasets.Value("string"),
                                                                   "rejected": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataFormatError, match=r"hf#0: field 'image' holds an embedded image; set .*extract_images_to"):
        read_dataset("preference_json", hf_dataset=str(tmp_path / "hf"), layout="rlaif_v")
    for source in ("hf", "t.parquet"):
        [s] = read_dataset("preference_json", hf_dataset=str(tmp_path / source), layout="rlaif_v",
                           extract_images_to=str(tmp_path / "img"))
        assert s.meta["chosen"] == "red" and Image.open(s.images[0]).getpixel((0, 0)) == (255, 0, 0)


# -------------------------------------------------------------------------------- pair batches

def test_pairs_batch_chosen_then_rejected_and_encode_each_image_once(tmp_path, tiny_model, model_config,
                                                                     shapes_data, tokenizer):
    from vlm.modeling.processing import build_processor

    path = write_vqa_pairs(shapes_data["train"], tmp_path / "pairs.json", limit=3)
    samples = read_dataset("preference_json", path=str(path), image_root=shapes_data["train"]["image_root"],
                           image_token="<image>")
    processor = build_processor(tiny_model, tokenizer, model_config, "plain", 128)
    dataset = PairDataset(samples, processor, progress=False)
    batch = PairCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch.input_ids.shape[0] == 6 and batch.images.shape[0] == 3 and batch.num_samples == 3
    answers = [tokenizer.decode(row[row != -100]) for row in batch.labels]
    assert [a.strip() for a in answers[:3]] == [s.meta["chosen"] for s in samples]
    assert [a.strip() for a in answers[3:]] == [s.meta["rejected"] for s in samples]
    calls = []
    hook = tiny_model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = tiny_model(**batch.model_inputs(with_labels=False))
    hook.remove()
    assert calls == [3] and out.logits.shape[0] == 6
    # the same rows with each image given twice: the same logits
    twice = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       pixel_values=torch.cat([batch.images, batch.images]),
                       instructions=batch.instructions * 2).logits
    torch.testing.assert_close(out.logits, twice)

