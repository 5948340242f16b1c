"""`vlm chat` asks in the prompt format the model was trained with (model.task_prompt_suffix)."""

from types import SimpleNamespace

from omegaconf import OmegaConf

import vlm.inference.chat
from vlm.config import ModelConfig
from vlm.data.formats import VQA_PROMPT_SUFFIX


def _chat_turns(monkeypatch, tmp_path, suffix, **kwargs):
    model_cfg = OmegaConf.structured(ModelConfig)
    model_cfg.task_prompt_suffix = suffix
    # the suffix travels in model.yaml, as a stage output saves it and load_pretrained reads it
    (tmp_path / "model.yaml").write_text(OmegaConf.to_yaml(model_cfg, resolve=True))
    loaded = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(tmp_path / "model.yaml"))
    seen = []
    monkeypatch.setattr(vlm.inference.chat, "load_pretrained", lambda checkpoint, **k: (None, None, loaded))
    monkeypatch.setattr(vlm.inference.chat, "build_processor", lambda *a, **k: SimpleNamespace(image_token="<image>"))
    monkeypatch.setattr(vlm.inference.chat, "answer", lambda model, processor, image, turns, *a: seen.append(
        [t.content for t in turns]) or "red")
    vlm.inference.chat.chat(str(tmp_path), "img.png", "what color is the shape?", **kwargs)
    return seen[0]


def test_chat_appends_the_trained_task_prompt(monkeypatch, tmp_path):
    turns = _chat_turns(monkeypatch, tmp_path, VQA_PROMPT_SUFFIX)
    assert turns == ["<image>\nwhat color is the shape?" + VQA_PROMPT_SUFFIX]


def test_no_task_prompt_asks_the_question_as_typed(monkeypatch, tmp_path):
    turns = _chat_turns(monkeypatch, tmp_path, VQA_PROMPT_SUFFIX, use_task_prompt=False)
    assert turns == ["<image>\nwhat color is the shape?"]


def test_without_a_suffix_and_with_one_typed_nothing_is_added():
    cfg = OmegaConf.structured(ModelConfig)
    assert vlm.inference.chat.task_prompt("what?", cfg) == "what?"
    cfg.task_prompt_suffix = VQA_PROMPT_SUFFIX
    assert vlm.inference.chat.task_prompt("what?" + VQA_PROMPT_SUFFIX, cfg) == "what?" + VQA_PROMPT_SUFFIX


def test_the_cli_flag_turns_it_off(monkeypatch):
    from vlm.app.cli import main

    calls = []
    monkeypatch.setattr(vlm.inference.chat, "chat", lambda *a, **k: calls.append(k))
    main(["chat", "ckpt", "--image", "x.png", "--prompt", "q", "--no-task-prompt"])
    main(["chat", "ckpt", "--image", "x.png", "--prompt", "q"])
    assert [c["use_task_prompt"] for c in calls] == [False, True]
