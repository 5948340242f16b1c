"""BLIP-2 stage 1: the three attention masks, hard-negative sampling, ITC in one process, the
objective end to end, and stage 2 leaving the text path alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, run_config, tiny_model_config
from safetensors.torch import load_file

from vlm.app.stages import run_stage
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import ConfigError
from vlm.data.batch import Batch, Collator
from vlm.modeling.connectors.image_text import similarity
from vlm.modeling.processing import build_processor
from vlm.training.objectives.qformer_stage1 import (
    QFormerStage1,
    bidirectional_mask,
    gather_batches,
    multimodal_causal_mask,
    sample_hard_negatives,
    unimodal_mask,
)

QFORMER = {"name": "qformer", "options": {"num_queries": 4, "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                                          "intermediate_size": 64, "embed_dim": 16, "cross_attention_freq": 1,
                                          "dropout": 0.0, "attention_dropout": 0.0}}

# two queries (q q), then three text tokens of which the last is padding (t t _)
TEXT_MASK = torch.tensor([[1, 1, 0]])


def as_rows(mask: torch.Tensor) -> list:
    return ["".join("x" if v else "." for v in row) for row in mask[0].tolist()]


def test_unimodal_mask_keeps_queries_and_text_apart():
    assert as_rows(unimodal_mask(2, TEXT_MASK)) == [
        "xx...",
        "xx...",
        "..xx.",
        "..xx.",
        "..xx.",
    ]


def test_bidirectional_mask_lets_everything_see_everything_but_padding():
    assert as_rows(bidirectional_mask(2, TEXT_MASK)) == [
        "xxxx.",
        "xxxx.",
        "xxxx.",
        "xxxx.",
        "xxxx.",
    ]


def test_multimodal_causal_mask_queries_see_queries_text_sees_queries_and_earlier_text():
    assert as_rows(multimodal_causal_mask(2, TEXT_MASK)) == [
        "xx...",
        "xx...",
        "xxx..",
        "xxxx.",
        "xxxx.",
    ]
    longer = multimodal_causal_mask(3, torch.ones(2, 4, dtype=torch.long))
    assert longer.shape == (2, 7, 7)
    assert torch.equal(longer[0, 3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.fixture
def qformer_model(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "qformer", "connector.options": QFORMER["options"]})
    return build_tiny_model(cfg, tokenizer), cfg


def test_masks_do_what_they_say_inside_the_qformer(qformer_model):
    model, _ = qformer_model
    qformer = model.connector
    features = torch.randn(2, 16, 32)
    ids, mask = qformer.tokenize_texts(["a red circle", "a small blue square at the top left"])
    other = ids.clone()
    other[:, 2] = 5  # change the third text token
    q = qformer.num_queries
    with torch.no_grad():
        # unimodal: the joint pass equals the two separate passes
        joint = qformer.encode(features, ids, mask, attention=unimodal_mask(q, mask))
        torch.testing.assert_close(joint[:, :q], qformer.query_outputs(features), atol=1e-5, rtol=0)
        text_alone = qformer.encode(input_ids=ids, text_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(joint[:, q:][real], text_alone[real], atol=1e-5, rtol=0)
        # causal: a later token changes neither the queries nor earlier text, only itself onwards
        a = qformer.encode(features, ids, mask, attention=multimodal_causal_mask(q, mask))
        b = qformer.encode(features, other, mask, attention=multimodal_causal_mask(q, mask))
        torch.testing.assert_close(a[:, : q + 2], b[:, : q + 2], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, q + 2:], b[:, q + 2:])
        # ...and the text reads the image through the queries
        c = qformer.encode(features.flip(0), ids, mask, attention=multimodal_causal_mask(q, mask))
        assert not torch.allclose(a[:, q:], c[:, q:])
        # bidirectional: the text changes what the queries extract
        a = qformer.encode(features, ids, mask, attention=bidirectional_mask(q, mask))
        b = qformer.encode(features, other, mask, attention=bidirectional_mask(q, mask))
        assert not torch.allclose(a[:, :q], b[:, :q])


def test_hard_negatives_never_pick_the_positive_and_prefer_similar_ones():
    generator = torch.Generator().manual_seed(0)
    sim = torch.tensor([[9.0, 3.0, 0.0, 0.0],   # the positive is by far the most similar
                        [0.0, 9.0, 0.0, 3.0],
                        [0.0, 0.0, 0.0, 0.0],
                        [-9.0, -9.0, 1.0, 9.0]])
    positives = torch.arange(4)
    draws = torch.stack([sample_hard_negatives(sim, positives, generator) for _ in range(2000)])
    assert not (draws == positives).any()
    frequency = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(4)]) / 2000
    assert frequency[0].argmax() == 1 and frequency[1].argmax() == 3 and frequency[3].argmax() == 2
    # softmax over the similarities plus LAVIS's 1e-4 floor, the positive removed
    expected = F.softmax(sim, dim=1) + 1e-4
    expected[positives, positives] = 0
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(frequency, expected, atol=0.035, rtol=0)


def test_hard_negatives_with_offset_positives_of_a_gathered_batch():
    sim = torch.zeros(2, 6)
    positives = torch.tensor([2, 3])  # this process's rows start at 2
    draws = torch.stack([sample_hard_negatives(sim, positives) for _ in range(500)])
    assert not (draws == positives).any()
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3, 4, 5}


def test_hard_negatives_need_two_candidates():
    with pytest.raises(ValueError, match="at least two"):
        sample_hard_negatives(torch.zeros(1, 1), torch.tensor([0]))


def test_gather_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_batches(x, with_grad=True)
    assert gathered is x and offset == 0


def caption_batch(model, tokenizer, cfg, shapes_data, n=6):
    from vlm.data.formats import read_dataset

    processor = build_processor(model, tokenizer, cfg, "plain")
    train = shapes_data["train"]
    samples = read_dataset("coco_captions", path=train["captions"], image_root=train["image_root"])[:n]
    return Collator(tokenizer.pad_token_id)([processor.encode(s) for s in samples]), samples


def test_itc_in_one_process_is_in_batch_contrastive_over_max_query_similarity(qformer_model, tokenizer, shapes_data):
    model, cfg = qformer_model
    objective = QFormerStage1(model, tokenizer)
    batch, samples = caption_batch(model, tokenizer, cfg, shapes_data)
    texts = objective.texts(batch.labels)
    assert texts == [s.turns[-1].content for s in samples]  # the captions, recovered from the labels
    with torch.no_grad():
        out = objective(model, batch)
        qformer = model.connector
        features = model.vision(batch.images)
        ids, mask = qformer.tokenize_texts(texts)
        sim = similarity(qformer.image_embeddings(features), qformer.text_embeddings(ids, mask)) / 0.07
        targets = torch.arange(len(texts))
        expected = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.t(), targets)) / 2
    torch.testing.assert_close(out.losses["loss_itc"], expected, atol=1e-5, rtol=0)
    assert set(out.losses) == {"loss_itc", "loss_itm", "loss_itg"}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))


def feature_batch(tokenizer, texts, seed=0):
    """A batch of distinct random image features (as the feature cache serves them) and texts
    (as trained labels)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    labels = torch.full((len(rows), max(map(len, rows))), -100)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    features = torch.randn(len(rows), 16, 32, generator=torch.Generator().manual_seed(seed))
    return Batch(input_ids=labels.clamp(min=0), labels=labels, images=features, image_kind="features")


TEXTS = ["red circle", "blue square", "green triangle", "yellow cross", "small red square", "large blue circle",
         "top left", "bottom right"]


def test_itc_and_itg_fall_when_fitting_a_batch(qformer_model, tokenizer):
    model, _ = qformer_model
    torch.manual_seed(0)
    objective = QFormerStage1(model, tokenizer)
    for param in QFormerStage1.frozen_parameters(model):  # as apply_stage does
        param.requires_grad_(False)
    assert not any(p.requires_grad for p in model.connector.proj.parameters())  # no LLM in stage 1
    batch = feature_batch(tokenizer, TEXTS)
    params = [p for p in model.connector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.connector.train()
    history = []
    for _ in range(60):
        out = objective(model, batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in out.losses.items()})
    for key in ("loss_itc", "loss_itg"):
        assert history[-1][key] < 0.5 * history[0][key], key
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)


def test_itm_pairs_positives_with_hard_negatives_both_ways(qformer_model, tokenizer, monkeypatch):
    model, _ = qformer_model
    objective = QFormerStage1(model, tokenizer)
    batch = feature_batch(tokenizer, TEXTS)
    qformer = model.connector
    seen = {}
    real = qformer.match_logits

    def spy(images, ids, mask, attention=None):
        seen.update(images=images, ids=ids, mask=mask, attention=attention)
        return real(images, ids, mask, attention)

    monkeypatch.setattr(qformer, "match_logits", spy)
    objective(model, batch)
    b = len(TEXTS)
    ids, mask = qformer.tokenize_texts(TEXTS)
    features = batch.images
    images, itm_ids = seen["images"], seen["ids"][:, : ids.shape[1]]
    assert images.shape[0] == itm_ids.shape[0] == 3 * b
    # block 1: the true pairs; block 2: each text with another image; block 3: each image with another text
    assert torch.equal(images[:b], features) and torch.equal(itm_ids[:b], ids)
    assert torch.equal(itm_ids[b:2 * b], ids) and torch.equal(images[2 * b:], features)
    for i in range(b):
        assert not torch.equal(images[b + i], features[i])
        assert not torch.equal(itm_ids[2 * b + i], ids[i])
    assert torch.equal(seen["attention"], bidirectional_mask(qformer.num_queries, seen["mask"]))


def test_the_itm_head_learns_to_match(qformer_model):
    """ITM alone on a fixed set: from chance (0.64 for one positive in three) to clearly better."""
    model, _ = qformer_model
    qformer = model.connector.train()
    torch.manual_seed(0)
    ids, mask = qformer.tokenize_texts(TEXTS)
    features = torch.randn(len(TEXTS), 16, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(qformer.parameters(), lr=1e-3)
    labels = torch.cat([torch.ones(8), torch.zeros(16)]).long()
    losses = []
    for _ in range(200):
        other = (torch.arange(8) + torch.randint(1, 8, (8,))) % 8
        images = torch.cat([features, features[other], features])
        texts, masks = torch.cat([ids, ids, ids[other]]), torch.cat([mask, mask, mask[other]])
        loss = F.cross_entropy(qformer.match_logits(images, texts, masks), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5  # chance: 0.64


def test_a_batch_of_one_has_no_itm_negative_and_still_trains(qformer_model, tokenizer):
    model, _ = qformer_model
    objective = QFormerStage1(model, tokenizer)
    out = objective(model, feature_batch(tokenizer, TEXTS[:1]))
    assert out.losses["loss_itm"].item() == 0.0 and out.losses["loss_itc"].item() == 0.0
    out.loss.backward()  # ITG still trains
    assert model.connector.lm_head.dense.weight.grad is not None


def test_stage1_refuses_a_non_qformer_connector_and_an_llm_that_trains(tmp_path, tokenizer_dir, tokenizer,
                                                                      tiny_model, shapes_data):
    with pytest.raises(ConfigError, match="needs model.connector.name: qformer"):
        QFormerStage1(tiny_model, tokenizer)
    stage = {"objective": "qformer_stage1", "train": {"vision": "frozen", "connector": "full", "llm": "full"},
             "data": [{"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"]}}]}
    with pytest.raises(ConfigError, match="stages.s1.train: objective 'qformer_stage1'"):
        run_config(tmp_path, tokenizer_dir, {"s1": stage}, model={"connector": QFORMER})


def test_stage1_trains_from_the_feature_cache(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    stage = {"objective": "qformer_stage1", "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
             "data": [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}],
             "batch_size": 8, "max_steps": 2, "log_every": 1, "feature_cache": True,
             "feature_cache_dir": str(tmp_path / "cache")}
    cfg = run_config(tmp_path, tokenizer_dir, {"s1": stage}, model={"connector": QFORMER})
    run_stage(cfg, "s1")
    records = [json.loads(line) for line in (tmp_path / "run" / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss_itc"] > 0 for r in records)
    assert any((tmp_path / "cache").rglob("*.safetensors"))


def test_stage1_then_stage2_logs_each_loss_and_stage2_leaves_the_text_path_alone(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    data = [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}]
    stages = {
        "s1": {"objective": "qformer_stage1", "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
               "data": data, "learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "log_every": 2},
        "s2": {"init_from": str(tmp_path / "run" / "s1" / "final"), "train": {"connector": "full"},
               "data": data, "learning_rate": 1e-3, "batch_size": 8, "max_steps": 2, "weight_decay": 0.1},
    }
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"connector": QFORMER})
    s1 = run_stage(cfg, "s1")
    records = [json.loads(line) for line in (tmp_path / "run" / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert {"loss_itc", "loss_itm", "loss_itg"} <= set(record)
        assert record["loss"] == pytest.approx(record["loss_itc"] + record["loss_itm"] + record["loss_itg"], rel=1e-5)
    s2 = run_stage(cfg, "s2")
    before, after = load_file(str(s1 / "connector.safetensors")), load_file(str(s2 / "connector.safetensors"))
    for key in ("word_embeddings.weight", "text_proj.weight", "itm_head.weight", "layers.0.text_ffn.up.weight"):
        assert torch.equal(before[key], after[key]), key  # frozen in stage 2, despite weight decay
    assert not torch.equal(before["proj.weight"], after["proj.weight"])
    assert not torch.equal(before["query_tokens"], after["query_tokens"])


def retrieval_outputs(qformer, seed=0):
    """ITC embeddings both ways and ITM logits of fixed random features and texts."""
    features = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(seed))
    ids, mask = qformer.tokenize_texts(TEXTS[:3])
    with torch.no_grad():
        return (qformer.image_embeddings(features), qformer.text_embeddings(ids, mask),
                qformer.match_logits(features, ids, mask))


def test_separate_retrieval_keeps_the_stage1_qformer_once_a_later_stage_begins(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "qformer",
                                              "connector.options": {**QFORMER["options"], "separate_retrieval": True}})
    model = build_tiny_model(cfg, tokenizer)
    plain = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.name": "qformer",
                                                                "connector.options": QFORMER["options"]}), tokenizer)
    # the copy draws no random numbers: everything else starts (and so trains) as without it
    own = {k: v for k, v in model.state_dict().items() if ".retrieval." not in k}
    assert own.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in own.items())
    qformer = model.connector
    qformer.begin_stage(trains_matching=True)  # stage 1: retrieval reads the Q-Former it trains
    assert qformer.matching() is qformer
    with torch.no_grad():
        qformer.query_tokens.add_(1.0)  # what stage 1 learned
    stage1 = retrieval_outputs(qformer)
    qformer.begin_stage(trains_matching=False)  # stage 2 begins: the Q-Former as it is now is kept
    assert qformer.matching() is qformer.retrieval and bool(qformer.retrieval.kept)
    with torch.no_grad():
        for name, param in qformer.named_parameters():
            if not name.startswith("retrieval."):
                param.add_(0.1)  # stage 2 moves everything but the frozen copy
    qformer.begin_stage(trains_matching=False)  # instruction tuning: still stage 1's, not stage 2's
    for kept, before in zip(retrieval_outputs(qformer), stage1):
        torch.testing.assert_close(kept, before, rtol=0, atol=0)
    qformer.retrieval.kept.fill_(False)  # what retrieval would read without the copy: moved away
    assert not torch.allclose(retrieval_outputs(qformer)[0], stage1[0])
    qformer.begin_stage(trains_matching=True)  # another stage 1 trains the Q-Former's own heads again
    assert qformer.matching() is qformer
    assert {id(p) for p in qformer.retrieval.parameters()} <= {id(p) for p in qformer.llm_unused_parameters()}
    assert {id(p) for p in qformer.retrieval.parameters()} <= {id(p) for p in qformer.stage1_unused_parameters()}


def test_separate_retrieval_after_stage2_ranks_as_stage1_did(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    data = [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}]
    stages = {
        "s1": {"objective": "qformer_stage1", "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
               "data": data, "learning_rate": 1e-3, "batch_size": 8, "max_steps": 3},
        "s2": {"init_from": str(tmp_path / "run" / "s1" / "final"), "train": {"connector": "full"},
               "data": data, "learning_rate": 1e-2, "batch_size": 8, "max_steps": 2},
    }
    qformer = {"name": "qformer", "options": {**QFORMER["options"], "separate_retrieval": True}}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"connector": qformer})
    s1, s2 = run_stage(cfg, "s1"), run_stage(cfg, "s2")
    after_stage1 = load_pretrained(s1, device="cpu")[0].connector.eval()
    after_stage2 = load_pretrained(s2, device="cpu")[0].connector.eval()
    assert after_stage1.matching() is after_stage1 and after_stage2.matching() is after_stage2.retrieval
    for kept, before in zip(retrieval_outputs(after_stage2), retrieval_outputs(after_stage1)):
        torch.testing.assert_close(kept, before, rtol=0, atol=0)
    saved1, saved2 = load_file(str(s1 / "connector.safetensors")), load_file(str(s2 / "connector.safetensors"))
    for key in ("query_tokens", "layers.0.cross_attn.query.weight", "vision_proj.weight", "itm_head.weight"):
        assert torch.equal(saved2[f"retrieval.{key}"], saved1[key]), key
    assert not torch.equal(saved2["query_tokens"], saved1["query_tokens"])  # stage 2 trained the Q-Former


# ---------------------------------------------------------------------------------------------
# ITC across processes (gloo, CPU): gathered with gradient, equal to one process on the whole batch


def _itc_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from vlm.training.objectives.qformer_stage1 import contrastive_loss, gather_batches

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images, texts = itc_inputs()
        rows = slice(rank * 3, rank * 3 + 3)
        image_feats = images[rows].clone().requires_grad_(True)
        text_feat = texts[rows].clone().requires_grad_(True)
        temperature = torch.tensor(0.07, requires_grad=True)
        loss, sim_i2t, _, targets = contrastive_loss(image_feats, text_feat, temperature)
        loss.backward()
        padded, offset = gather_batches(torch.ones(rank + 1, 2 + rank), with_grad=False)  # ragged
        torch.save({"loss": loss.detach(), "image_grad": image_feats.grad, "text_grad": text_feat.grad,
                    "temp_grad": temperature.grad, "targets": targets, "sim_shape": tuple(sim_i2t.shape),
                    "ragged": (tuple(padded.shape), offset)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def itc_inputs():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 4, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    return images, texts


@pytest.mark.slow  # two spawned processes import torch and vlm: ~30 s on 2 shared cores
def test_itc_gathers_with_gradient_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    from vlm.training.objectives.qformer_stage1 import contrastive_loss

    mp.spawn(_itc_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    images, texts = itc_inputs()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    temperature = torch.tensor(0.07, requires_grad=True)
    loss, *_ = contrastive_loss(images, texts, temperature)  # one process, the whole batch
    loss.backward()
    assert results[0]["sim_shape"] == results[1]["sim_shape"] == (3, 6)  # in-batch negatives from both
    assert results[1]["targets"].tolist() == [3, 4, 5]
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss.detach())
    # each process's gradient, averaged over processes as DDP does, is the whole batch's gradient
    for r in range(2):
        rows = slice(r * 3, r * 3 + 3)
        torch.testing.assert_close(results[r]["image_grad"] / 2, images.grad[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(results[r]["text_grad"] / 2, texts.grad[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close((results[0]["temp_grad"] + results[1]["temp_grad"]) / 2, temperature.grad)
    assert results[0]["ragged"] == ((3, 3), 0) and results[1]["ragged"] == ((3, 3), 1)
