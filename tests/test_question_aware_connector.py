"""The ``question_aware_mlp`` connector: ``mlp2x_gelu``'s tokens unchanged behind one token
computed from the image and the question's words, built from a config, refusing batches without
one question per image, and trained end to end through the LLM's loss."""

from __future__ import annotations

import json
import types

import pytest
import torch

from vlm.config import ConnectorConfig
from vlm.modeling.connectors import CONNECTORS, BuildContext, build_connector


def build(tokenizer, **options):
    torch.manual_seed(0)
    return CONNECTORS.get("question_aware_mlp")(8, 12, tokenizer, 16, **options)


def test_image_tokens_are_mlp2x_gelu_behind_the_question_token(tokenizer):
    asked = build(tokenizer, pool=2, global_token=True)
    plain = CONNECTORS.get("mlp2x_gelu")(8, 12, pool=2, global_token=True)
    plain.load_state_dict({k: v for k, v in asked.state_dict().items() if k.startswith("proj.")})
    features = torch.randn(2, 16, 8)
    out = asked(features, ["what color is the shape?", "is the shape red?"])
    assert asked.num_tokens(16) == plain.num_tokens(16) + 1 == out.shape[1] == 6
    torch.testing.assert_close(out[:, 1:], plain(features))


def test_the_question_token_follows_the_question_and_the_image(tokenizer):
    asked = build(tokenizer)
    features = torch.randn(1, 16, 8).expand(3, 16, 8)
    out = asked(features, ["is the shape red?", "is the shape blue?", "is the shape red?"])
    assert not torch.allclose(out[0, 0], out[1, 0])  # other words, other token
    torch.testing.assert_close(out[0, 0], out[2, 0])
    torch.testing.assert_close(out[0, 1:], out[1, 1:])  # the image's own tokens ignore the question
    other_image = asked(torch.randn(1, 16, 8), ["is the shape red?"])
    assert not torch.allclose(other_image[0, 0], out[0, 0])


def test_a_word_repeated_counts_once(tokenizer):
    asked = build(tokenizer)
    features = torch.randn(1, 16, 8).expand(2, 16, 8)
    once, twice = "is it red red", "is it red red red red"  # the same set of tokens
    assert set(tokenizer(once)["input_ids"]) == set(tokenizer(twice)["input_ids"])
    out = asked(features, [once, twice])
    torch.testing.assert_close(out[0, 0], out[1, 0])


def test_position_embedding_covers_the_image_tokens_only(tokenizer):
    asked = build(tokenizer, pool=2, position_embedding=True)
    assert asked.position.shape == (4, 12) and asked.num_tokens(16) == 5
    assert asked(torch.randn(1, 16, 8), ["where is it?"]).shape == (1, 5, 12)


def test_each_image_needs_its_question(tokenizer):
    asked = build(tokenizer)
    with pytest.raises(ValueError, match=r"one question per image: 2 image\(s\), none"):
        asked(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match=r"2 image\(s\), 1 question\(s\)"):
        asked(torch.randn(2, 16, 8), ["what?"])


def test_from_config(tokenizer):
    ctx = BuildContext(vision_dim=8, llm_dim=12, tokenizer=tokenizer, vision=types.SimpleNamespace(num_patches=64))
    connector = build_connector(ConnectorConfig(name="question_aware_mlp",
                                                options={"pool": 2, "question_grid": 2, "question_hidden": 32}), ctx)
    assert connector.instruction_aware and connector.num_tokens(64) == 5
    assert connector.question_image[1].in_features == 8 * 4 and connector.question_mlp[-1].out_features == 12
    with pytest.raises(ValueError, match="needs the LLM's tokenizer"):
        build_connector(ConnectorConfig(name="question_aware_mlp"),
                        BuildContext(vision_dim=8, llm_dim=12, vision=types.SimpleNamespace(num_patches=64)))


def test_trains_and_generates_through_the_model(tokenizer_dir, tokenizer, image_paths):
    from conftest import build_tiny_model, tiny_model_config

    from vlm.data.batch import Collator
    from vlm.data.types import Sample, Turn
    from vlm.inference.generation import generate_answers
    from vlm.modeling.processing import build_processor

    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "question_aware_mlp"})
    model = build_tiny_model(cfg, tokenizer)
    processor = build_processor(model, tokenizer, cfg, "plain")
    questions = ["what color is the shape?", "is there a circle in the image?", "where is the shape?"]
    samples = [Sample(str(i), [Turn("user", f"<image>\n{q}"), Turn("assistant", "red")], [image_paths[0]])
               for i, q in enumerate(questions)]
    batch = Collator(tokenizer.pad_token_id)([processor.encode(s) for s in samples])
    assert batch.instructions == questions
    out = model(**batch.model_inputs())
    tokens = out.vision_hidden_states
    assert not torch.allclose(tokens[0, 0], tokens[1, 0])  # same image, other question
    torch.testing.assert_close(tokens[0, 1:], tokens[1, 1:])
    out.loss.backward()
    for name in ("question_words.weight", "question_image.1.weight", "question_mlp.3.weight"):
        assert model.connector.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()
    # eval must not share one image's prefix between questions: each gets its own question token
    from vlm.inference.generation import _shared_prefix_keys
    prompts = [processor.encode(s).input_ids for s in samples]
    assert _shared_prefix_keys(model, samples, prompts) == [None, None, None]
    together = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=3)
    alone = [generate_answers(model, processor, [s], batch_size=1, max_new_tokens=3)[0] for s in samples]
    assert together == alone


def test_answer_words_warm_up_trains_the_question_token_and_nothing_else_of_the_connector(
        tmp_path, tokenizer_dir, shapes_data):
    from conftest import answer_words_stage, run_config

    import vlm.app.stages
    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.training.callbacks import Callback

    stages = {"warmup": answer_words_stage(shapes_data["train"], connector="full")}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"connector": {"name": "question_aware_mlp"}})

    class Start(Callback):
        """The connector's weights as the stage starts."""

        def on_train_start(self, ctx, position):
            self.state = {k: v.clone() for k, v in ctx.model().connector.state_dict().items()}

    start = Start()
    final = vlm.app.stages.run_stage(cfg, "warmup", callbacks=[start])
    losses = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    trained = load_pretrained(final, device="cpu")[0].connector.state_dict()
    for key, before in start.state.items():
        moved = not torch.equal(trained[key], before)
        assert moved == key.startswith("question_"), key


def test_answer_words_with_the_connector_frozen_keeps_its_own_head(tokenizer_dir, tokenizer):
    from conftest import build_tiny_model, tiny_model_config

    from vlm.training.objectives import build_objective

    model = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.name": "question_aware_mlp"}), tokenizer)
    model.connector.requires_grad_(False)
    frozen = build_objective("answer_words", model, tokenizer)
    assert not frozen.asks_connector and hasattr(frozen, "head")
    for param in model.connector.question_parameters():
        param.requires_grad_(True)
    assert build_objective("answer_words", model, tokenizer).asks_connector


def test_answer_words_refuses_a_trained_llm(tmp_path, tokenizer_dir, shapes_data):
    from conftest import answer_words_stage, run_config

    from vlm.core.errors import ConfigError

    stages = {"warmup": answer_words_stage(shapes_data["train"], connector="full", llm="full")}
    with pytest.raises(ConfigError, match=r"stages\.warmup\.train: objective 'answer_words'"):
        run_config(tmp_path, tokenizer_dir, stages, model={"connector": {"name": "question_aware_mlp"}})
