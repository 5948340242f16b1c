"""The tokenisation cache: a second tokenisation of the same samples reads the entry (same ids and
labels, logged); a change of samples, template, system prompt or tokenizer builds a new entry; a
damaged entry is rebuilt with a warning; a second stage on the same data skips tokenising."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import run_config
from transformers import AutoTokenizer

import vlm.app.stages
from vlm.data.image_transforms import build_transform
from vlm.data.processor import VLMProcessor
from vlm.data.templates import build_template
from vlm.data.token_cache import TokenCache, cache_key, cached_tokenize
from vlm.data.types import Sample, Turn

CLIP_MEAN, CLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def make_processor(tokenizer, template="plain", system_prompt=None):
    transform = build_transform("resize", 32, CLIP_MEAN, CLIP_STD)
    return VLMProcessor(tokenizer, build_template(template, tokenizer, system_prompt), transform, 4)


def samples(n=6, word="circle"):
    return [Sample(id=str(i), images=["x.png"], turns=[Turn("user", "<image>\nwhat is it?"),
                                                       Turn("assistant", f"a red {word} number {i}")])
            for i in range(n)]


def tokenize(caplog, data, processor, root):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm.data.token_cache"):
        encoded = cached_tokenize(data, processor, root, name="t", progress=False)
    verdicts = [r.getMessage().split(":")[1].strip() for r in caplog.records if r.name == "vlm.data.token_cache"]
    return encoded, verdicts


def test_a_second_tokenisation_reads_the_cache_with_the_same_ids(tmp_path, tokenizer, caplog):
    processor = make_processor(tokenizer, "vicuna_v1")
    data = samples()
    first, verdicts = tokenize(caplog, data, processor, tmp_path)
    assert verdicts == ["tokenization built"]
    assert first == [processor.tokenize(s.turns) for s in data]
    second, verdicts = tokenize(caplog, data, processor, tmp_path)
    assert verdicts == ["tokenization skipped"] and second == first
    assert len(list((tmp_path / "tokenized").rglob("*.npz"))) == 1


def test_a_change_of_samples_template_prompt_or_tokenizer_builds_a_new_entry(tmp_path, tokenizer, tokenizer_dir,
                                                                            caplog):
    data = samples()
    tokenize(caplog, data, make_processor(tokenizer, "plain"), tmp_path)
    other_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    other_tokenizer.add_tokens(["<extra_token>"])
    changes = {"samples": (samples(word="square"), make_processor(tokenizer, "plain")),
               "template": (data, make_processor(tokenizer, "vicuna_v1")),
               "system prompt": (data, make_processor(tokenizer, "vicuna_v1", system_prompt="Answer briefly.")),
               "tokenizer": (data, make_processor(other_tokenizer, "plain"))}
    keys = {cache_key(data, make_processor(tokenizer, "plain"))[0]}
    for what, (changed_data, processor) in changes.items():
        encoded, verdicts = tokenize(caplog, changed_data, processor, tmp_path)
        assert verdicts == ["tokenization built"], what
        assert encoded == [processor.tokenize(s.turns) for s in changed_data], what
        keys.add(cache_key(changed_data, processor)[0])
    assert len(keys) == 5 == len(list((tmp_path / "tokenized").rglob("*.npz")))


def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, tokenizer, caplog):
    processor, data = make_processor(tokenizer), samples()
    first, _ = tokenize(caplog, data, processor, tmp_path)
    path = TokenCache(tmp_path).path(cache_key(data, processor)[0])
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    again, verdicts = tokenize(caplog, data, processor, tmp_path)
    assert again == first and verdicts[-1] == "tokenization built"
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
    assert tokenize(caplog, data, processor, tmp_path)[1] == ["tokenization skipped"]


def test_a_second_stage_on_the_same_data_skips_tokenising(tmp_path, tokenizer_dir, shapes_data, caplog):
    captions = {"format": "coco_captions",
                "args": {"path": shapes_data["train"]["captions"], "image_root": shapes_data["train"]["image_root"]}}
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"}, "data": [captions],
             "batch_size": 4, "max_steps": 1}
    cfg = run_config(tmp_path, tokenizer_dir, {"a": stage, "b": dict(stage)},
                     overrides=[f"token_cache_dir={tmp_path / 'cache'}"])
    seen = []
    for name in ("a", "b"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vlm.data.token_cache"):
            vlm.app.stages.build_stage(cfg, name)
        seen.append([r.getMessage() for r in caplog.records if r.name == "vlm.data.token_cache"])
    assert seen[0][0].startswith("a: tokenization built") and seen[1][0].startswith("b: tokenization skipped: reused")
    assert len(list(Path(tmp_path / "cache").rglob("*.npz"))) == 1


def test_token_cache_false_tokenises_without_a_cache(tmp_path, tokenizer_dir, shapes_data, caplog):
    captions = {"format": "coco_captions",
                "args": {"path": shapes_data["train"]["captions"], "image_root": shapes_data["train"]["image_root"]}}
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"}, "data": [captions],
             "batch_size": 4, "max_steps": 1}
    cfg = run_config(tmp_path, tokenizer_dir, {"a": stage},
                     overrides=[f"token_cache_dir={tmp_path / 'cache'}", "token_cache=false"])
    with caplog.at_level(logging.INFO, logger="vlm.data.token_cache"):
        run = vlm.app.stages.build_stage(cfg, "a")
    assert len(run.dataset) > 0 and not (tmp_path / "cache").exists()
    assert not [r for r in caplog.records if r.name == "vlm.data.token_cache"]

