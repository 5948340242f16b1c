"""Retrieval evaluation: recall@k from a score matrix, ITM re-ranking, the ``retrieval`` eval task
and ``vlm eval --task retrieval``."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
import yaml
from conftest import (
    LLM_ARCH,
    VISION_ARCH,
    build_tiny_model,
    run_config,
    run_vlm,
    tiny_model_config,
)
from test_qformer_objectives import QFORMER

from vlm.app.stages import run_stage
from vlm.app.wiring import load_run_config
from vlm.config import ConfigError
from vlm.core.errors import ImageLoadError
from vlm.data.formats import read_dataset
from vlm.evaluation.retrieval import (
    evaluate_retrieval,
    recall_at_k,
    rerank_with_itm,
    retrieval_pairs,
)
from vlm.modeling.processing import build_processor


def test_recall_counts_any_own_caption_for_images_and_the_own_image_for_texts():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, texts 3, 4 to image 2
    owner = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.0, 0.2],   # image 0: best text 1 (own) -> rank 0
        [0.8, 0.7, 0.6, 0.0, 0.0],   # image 1: own text 2 is third -> rank 2
        [0.9, 0.8, 0.7, 0.6, 0.1],   # image 2: own texts 3, 4 are fourth and fifth -> rank 3
    ])
    metrics = recall_at_k(scores, owner, ks=(1, 3, 5))
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r3"] == pytest.approx(200 / 3)
    assert metrics["i2t_r5"] == 100.0
    # texts: 0 -> image 2 best (0.9), own image 0 third; 1 -> own image 0 best; 2 -> image 2 best,
    # own image 1 second; 3 -> own image 2 best; 4 -> image 0 best (0.2 vs 0.1), own second
    assert metrics["t2i_r1"] == pytest.approx(40.0)
    assert metrics["t2i_r3"] == 100.0
    assert metrics["r_mean"] == pytest.approx(sum(v for k, v in metrics.items() if k != "r_mean") / 6)


def test_recall_of_a_perfect_and_of_a_reversed_ranking():
    owner = torch.arange(20)
    perfect = torch.eye(20) + 0.01 * torch.rand(20, 20)
    assert set(recall_at_k(perfect, owner).values()) == {100.0}
    reversed_ = -perfect
    metrics = recall_at_k(reversed_, owner)
    assert metrics["i2t_r10"] == metrics["t2i_r10"] == 0.0


def test_recall_checks_the_text_owner_shape():
    with pytest.raises(ValueError, match="one image per text"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))


@pytest.fixture
def qformer_model(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "qformer", "connector.options": QFORMER["options"]})
    return build_tiny_model(cfg, tokenizer), cfg


def test_evaluate_retrieval_on_a_qformer_model_and_itm_reranking_keeps_the_top_k(qformer_model, tokenizer,
                                                                                 shapes_data):
    model, cfg = qformer_model
    processor = build_processor(model, tokenizer, cfg)
    train = shapes_data["train"]
    samples = read_dataset("coco_captions", path=train["captions"], image_root=train["image_root"], per="image")
    images, texts, owner = retrieval_pairs(samples)
    assert len(images) == 16 and len(texts) == 16 * 5 and owner[:6].tolist() == [0] * 5 + [1]
    metrics, results = evaluate_retrieval(model, processor.load_image, samples, rerank_k=5, batch_size=6)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean",
                "itm_i2t_r1", "itm_t2i_r10", "itm_r_mean"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["t2i_r5_chance"] == pytest.approx(100 * 5 / 16)
    # re-ranking reorders each query's 5 best candidates, so recall@5 cannot change
    assert metrics["itm_i2t_r5"] == metrics["i2t_r5"] and metrics["itm_t2i_r5"] == metrics["t2i_r5"]
    assert len(results["i2t"]) == 16 and len(results["i2t"][0]["top_texts"]) == 10
    assert len(results["t2i"]) == 80 and results["t2i"][0]["image_id"] == samples[0].meta["image_id"]


def test_itm_reranking_scores_itm_match_logit_plus_the_itc_logit(qformer_model, monkeypatch):
    model, _ = qformer_model
    qformer = model.connector
    with torch.no_grad():
        qformer.temp.fill_(0.02)
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])  # 2 images, 3 texts
    features, ids, mask = torch.randn(2, 16, 32), torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4)
    match = {(0, 0): 0.5, (0, 1): 3.0, (0, 2): -1.0, (1, 0): 2.0, (1, 1): -2.0, (1, 2): 1.0}

    def fake_match_logits(image_features, input_ids, text_mask):
        image = [int(torch.nonzero((features == f).flatten(1).all(1))[0]) for f in image_features]
        text = [int(t) for t in input_ids[:, 0]]
        return torch.tensor([[0.0, match[i, t]] for i, t in zip(image, text)])

    monkeypatch.setattr(qformer, "match_logits", fake_match_logits)
    ids[:, 0] = torch.arange(3)  # each text's index in its first id, for the fake head
    i2t, t2i = rerank_with_itm(model, sims, features, ids, mask, k=2)
    # image 0's two best texts are 0 and 1: 0.5 + 0.9/0.02 = 45.5 and 3.0 + 0.5/0.02 = 28.0
    assert i2t[0].tolist() == pytest.approx([45.5, 28.0, -1e4])
    # text 2's two best images are 1 and 0: 1.0 + 0.7/0.02 and -1.0 + 0.1/0.02
    assert t2i[:, 2].tolist() == pytest.approx([4.0, 36.0])
    # the ITM head's 3.0 for (0, 1) does not override ITC's confident 0.9 vs 0.5 (LAVIS's sum would)
    assert i2t[0].argmax() == 0 and (3.0 + 0.5) > (0.5 + 0.9)


def test_evaluate_retrieval_agrees_with_the_qformer_similarities(qformer_model, tokenizer, shapes_data):
    model, cfg = qformer_model
    processor = build_processor(model, tokenizer, cfg)
    test = shapes_data["test"]
    samples = read_dataset("coco_captions", path=test["captions"], image_root=test["image_root"], per="image")
    metrics, results = evaluate_retrieval(model, processor.load_image, samples, batch_size=3)
    qformer = model.connector
    with torch.no_grad():
        pixels = torch.stack([processor.load_image(s.images[0]) for s in samples])
        image_embeds = qformer.image_embeddings(model.vision(pixels))
        texts = [r for s in samples for r in s.meta["references"]]
        text_embeds = qformer.text_embeddings(*qformer.tokenize_texts(texts))
        sims = torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(-1)
    best_text = sims.argmax(dim=1)
    assert [r["top_texts"][0] for r in results["i2t"]] == [texts[i] for i in best_text.tolist()]


def test_retrieval_skips_and_counts_an_unreadable_image_with_its_captions(qformer_model, tokenizer, shapes_data,
                                                                         tmp_path, caplog):
    model, cfg = qformer_model
    processor = build_processor(model, tokenizer, cfg)
    train = shapes_data["train"]
    root = tmp_path / "images"
    shutil.copytree(train["image_root"], root)
    samples = read_dataset("coco_captions", path=train["captions"], image_root=str(root), per="image")
    broken = samples[2].images[0]
    with open(broken, "wb") as f:
        f.write(b"not a png")
    with caplog.at_level(logging.WARNING):
        metrics, results = evaluate_retrieval(model, processor.load_image, samples, rerank_k=3, batch_size=6)
    assert metrics["skipped_unreadable"] == 1
    assert any(os.path.basename(broken) in r.getMessage() for r in caplog.records)
    # the other 15 images and their 75 captions are ranked, exactly as without the broken one
    readable = [s for i, s in enumerate(samples) if i != 2]
    expected, expected_results = evaluate_retrieval(model, processor.load_image, readable, rerank_k=3, batch_size=6)
    assert {k: v for k, v in metrics.items() if k != "skipped_unreadable"} == expected
    assert results == expected_results and len(results["i2t"]) == 15 and len(results["t2i"]) == 75
    # nothing readable at all is an error naming the problem, not an empty table
    for sample in samples:
        with open(sample.images[0], "wb") as f:
            f.write(b"")
    with pytest.raises(ImageLoadError, match="none of the 16 images could be read"):
        evaluate_retrieval(model, processor.load_image, samples)


def test_retrieval_needs_a_connector_with_image_text_heads(tiny_model, model_config, tokenizer, shapes_data):
    processor = build_processor(tiny_model, tokenizer, model_config)
    test = shapes_data["test"]
    samples = read_dataset("coco_captions", path=test["captions"], image_root=test["image_root"], per="image")
    with pytest.raises(ValueError, match="retrieval needs a connector with image-text heads"):
        evaluate_retrieval(tiny_model, processor.load_image, samples)


def test_config_checks_retrieval_evals(tmp_path, tokenizer_dir):
    def load(ev):
        recipe = {"model": {"vision": {"arch": dict(VISION_ARCH), "preprocess": "resize"},
                            "connector": QFORMER, "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)}},
                  "evals": {"r": ev}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return load_run_config(path)

    good = {"task": "retrieval", "data": {"format": "coco_captions", "args": {"path": "x.json"}}, "rerank_k": 8}
    assert load(good).evals.r.rerank_k == 8
    with pytest.raises(ConfigError, match="evals.r.data.format: task 'retrieval' reads 'coco_captions'"):
        load({**good, "data": {"format": "vqav2", "args": {"questions_path": "q.json"}}})
    with pytest.raises(ConfigError, match="evals.r.rerank_k"):
        load({"task": "caption", "data": good["data"], "rerank_k": 4})
    with pytest.raises(ConfigError, match="evals.r.task: unknown task 'retreival' \\(did you mean 'retrieval'"):
        load({**good, "task": "retreival"})


def test_vlm_eval_retrieval_on_a_stage_output(tmp_path, tokenizer_dir, shapes_data, capsys):
    train, test = shapes_data["train"], shapes_data["test"]
    stage = {"objective": "qformer_stage1", "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
             "data": [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}],
             "batch_size": 8, "max_steps": 1}
    cfg = run_config(tmp_path, tokenizer_dir, {"s1": stage}, model={"connector": QFORMER})
    final = run_stage(cfg, "s1")
    code, out, err = run_vlm(["eval", "--task", "retrieval", "--checkpoint", final, "--captions", test["captions"],
                               "--image-root", test["image_root"], "--rerank-k", "2", "--out", tmp_path / "ev"],
                              capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])["retrieval"]
    assert {"i2t_r1", "t2i_r5", "itm_t2i_r1", "t2i_r5_chance"} <= set(metrics)
    assert (tmp_path / "ev" / "retrieval_results.json").is_file()
    code, _, err = run_vlm(["eval", "--task", "retrieval", "--checkpoint", final], capsys)
    assert code == 2 and "needs --checkpoint (a stage output) and --captions" in err
    code, _, err = run_vlm(["eval", str(tmp_path / "recipe_0.yaml"), "--rerank-k", "3"], capsys)
    assert code == 2 and "--rerank-k: only with `vlm eval --task`" in err
    code, _, err = run_vlm(["eval", "--task", "retreival", "--checkpoint", final], capsys)
    assert code == 2 and "--task: unknown task 'retreival' (did you mean 'retrieval'?)" in err
    # a config file named like a task is a config
    (tmp_path / "retrieval").write_text((tmp_path / "recipe_0.yaml").read_text())
    code, _, err = run_vlm(["eval", str(tmp_path / "retrieval"), "--checkpoint", final], capsys)
    assert code == 0, err
