"""`vlm import hf-blip2` of InstructBLIP folders (causal and T5 LLMs): the same greedy tokens as
the original and as transformers, the Q-Former's tokenizer carried in the stage output, a stage
output that trains and evaluates; seq2seq log-likelihoods against transformers' T5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, run_vlm, write_images
from test_hf_blip2_export import QFORMER, blip2_config
from test_hf_blip2_t5_export import T5_ARCH
from test_hf_llava_export import QUESTION
from test_hf_llava_interop import write_stage_output
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.inference.likelihood import loglikelihoods
from vlm.interop.hf_blip2 import export_hf_blip2
from vlm.modeling.processing import build_processor


def instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, family):
    """A tiny instruction-aware Q-Former model (causal or T5 LLM, weights wide enough that greedy
    decoding varies) written as a stage output."""
    overrides = {"llm.arch": dict(T5_ARCH), "llm.kind": "seq2seq"} if family == "seq2seq" else {}
    cfg = blip2_config(tokenizer_dir, template="blip2_qa",
                       **{**overrides, "connector.options": {**QFORMER, "instruction_aware": True, "dropout": 0.0}})
    ours = build_tiny_model(cfg, tokenizer, seed=4)
    with torch.no_grad():
        for param in ours.llm.parameters():
            if param.dim() == 2:
                param.normal_(std=0.2)
        ours.connector.word_embeddings.weight.normal_(std=0.5)  # so that the instruction matters
    return write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer)


def greedy(folder, image, question=QUESTION, max_new_tokens=8):
    """``(prompt ids, greedy tokens)`` of the stage output ``folder`` on ``image`` and ``question``."""
    model, tok, model_cfg = load_pretrained(folder, device="cpu")
    processor = build_processor(model, tok, model_cfg)
    ids, _ = processor.tokenize([Turn("user", f"<image>\n{question}")], add_generation_prompt=True)
    pixels = processor.load_image(image)[None]
    out = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                         instructions=[question], max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    return ids, out[0].tolist()


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_imported_instructblip_gives_the_originals_and_transformers_tokens(tmp_path, tokenizer_dir, tokenizer, family,
                                                                          capsys):
    stage_out = instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, family)
    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    imported = tmp_path / "imported"
    code, out, err = run_vlm(["import", "hf-blip2", hf_dir, "--out", imported], capsys)
    assert code == 0 and f"imported: {imported}" in out, err[-2000:]
    saved = yaml.safe_load((imported / "model.yaml").read_text())
    assert saved["template"] == "instructblip" and saved["connector"]["options"]["instruction_aware"]
    assert (imported / "connector_tokenizer").is_dir()

    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    ids, expected = greedy(stage_out, image)
    assert len(set(expected)) > 2
    assert greedy(stage_out, image, "is it blue?")[1] != expected  # the instruction reaches the Q-Former

    # transformers on the exported folder, its own processor writing the Q-Former's ids
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    q = hf_processor.qformer_tokenizer([QUESTION], return_tensors="pt", truncation=True)
    prompt = ids + ([tokenizer.eos_token_id] if family == "seq2seq" else [])  # T5's encoder input ends with eos
    with torch.no_grad():
        got = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          pixel_values=build_processor(*load_pretrained(stage_out, device="cpu")).load_image(image)[None],
                          qformer_input_ids=q["input_ids"], qformer_attention_mask=q["attention_mask"],
                          max_new_tokens=8, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.pad_token_id)
    got = got[0, 1:] if family == "seq2seq" else got[0, len(prompt):]
    assert got.tolist() == expected

    # the import needs nothing outside itself: the source folder gone, it still answers the same
    moved = tmp_path / "moved"
    shutil.rmtree(hf_dir)
    shutil.move(str(imported), str(moved))
    assert greedy(moved, image) == (ids, expected)


def test_imported_instructblip_trains(tmp_path, tokenizer_dir, tokenizer, capsys):
    stage_out = instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, "seq2seq")
    imported = tmp_path / "imported"
    assert run_vlm(["import", "hf-blip2", export_hf_blip2(stage_out, tmp_path / "hf"), "--out", imported], capsys)[0] == 0
    images = write_images(tmp_path / "img", sizes=[(40, 40), (36, 44)])

    model, tok, model_cfg = load_pretrained(imported, device="cpu")
    processor = build_processor(model, tok, model_cfg)
    samples = [Sample(f"s{i}", [Turn("user", f"<image>\n{QUESTION}"), Turn("assistant", answer)], [image])
               for i, (image, answer) in enumerate(zip(images, ["red square", "two blue circles"]))]
    batch = Collator(tok.pad_token_id)([processor.encode(s) for s in samples])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch.model_inputs()).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow  # the caption metrics' own start-up (METEOR) dominates
def test_vlm_eval_generates_on_an_imported_instructblip(tmp_path, tokenizer_dir, tokenizer, capsys):
    stage_out = instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, "seq2seq")
    imported = tmp_path / "imported"
    assert run_vlm(["import", "hf-blip2", export_hf_blip2(stage_out, tmp_path / "hf"), "--out", imported], capsys)[0] == 0
    images = write_images(tmp_path / "img", sizes=[(40, 40), (36, 44)])
    # vlm eval's generation path (captioning) on the imported stage output
    captions = {"images": [{"id": i, "file_name": Path(p).name} for i, p in enumerate(images)],
                "annotations": [{"id": i, "image_id": i, "caption": "a shape"} for i in range(len(images))]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    code, out, err = run_vlm(["eval", "--task", "caption", "--checkpoint", imported, "--captions",
                              tmp_path / "captions.json", "--image-root", Path(images[0]).parent, "--out", tmp_path / "ev"],
                             capsys)
    assert code == 0, err[-2000:]
    assert any(p.name.startswith("caption") for p in (tmp_path / "ev").iterdir())


def test_import_refuses_a_folder_of_another_model_type(tmp_path, tokenizer_dir, tokenizer, capsys):
    stage_out = instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, "causal")
    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    code, _, err = run_vlm(["import", "hf-blip2", hf_dir, "--out", tmp_path / "imported"], capsys)
    assert code == 2 and not (tmp_path / "imported").exists()
    line = err.strip().splitlines()[-1]
    assert "model_type is 'llava'" in line and "'blip-2' or 'instructblip'" in line


def test_seq2seq_loglikelihood_equals_transformers_t5(tmp_path, tokenizer_dir, tokenizer):
    stage_out = instructblip_stage_output(tmp_path, tokenizer_dir, tokenizer, "seq2seq")
    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    processor = build_processor(model, tok, model_cfg)
    ids, greedy_tokens = greedy(stage_out, image, max_new_tokens=3)
    greedy_tokens = greedy_tokens[:3]
    other = tok("a red circle", add_special_tokens=False)["input_ids"]
    turns = [Turn("user", f"<image>\n{QUESTION}")]
    samples = [Sample("a", turns, [image]), Sample("b", turns, [image])]
    results = loglikelihoods(model, processor, samples, [tok.decode(other), tok.decode(greedy_tokens)], batch_size=2)
    assert tok(tok.decode(greedy_tokens), add_special_tokens=False)["input_ids"] == greedy_tokens

    # the same numbers from transformers' InstructBLIP-T5 on the exported folder
    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    q = AutoProcessor.from_pretrained(str(hf_dir)).qformer_tokenizer([QUESTION], return_tensors="pt", truncation=True)
    prompt = torch.tensor([ids + [tok.eos_token_id]])
    for (total, is_greedy), target in zip(results, [other, greedy_tokens]):
        with torch.no_grad():
            logits = hf(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                        pixel_values=processor.load_image(image)[None], qformer_input_ids=q["input_ids"],
                        qformer_attention_mask=q["attention_mask"], labels=torch.tensor([target])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        expected = logprobs.gather(-1, torch.tensor(target)[:, None]).sum().item()
        assert abs(total - expected) < 1e-5
        assert is_greedy is bool((logprobs.argmax(-1) == torch.tensor(target)).all())
    assert results[1][1] is True and results[0][1] is False


def test_text_specials_frame_instructions_as_the_qformer_tokenizer_does(tmp_path):
    """InstructBLIP's qformer_tokenizer (BERT WordPiece, [DEC] added, truncation on the left):
    with ``text_specials`` the Q-Former's ids are that tokenizer's, truncation included."""
    from test_qformer import MINILM
    from transformers import AutoTokenizer

    from vlm.modeling.connectors.base import BuildContext
    from vlm.modeling.connectors.qformer import QFormer

    bert = AutoTokenizer.from_pretrained(MINILM, truncation_side="left")
    bert.add_special_tokens({"bos_token": "[DEC]"})
    bert.save_pretrained(str(tmp_path / "qformer_tokenizer"))
    sizes = {"num_queries": 2, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
             "max_text_positions": 16, "max_text_tokens": 6, "text_tokenizer": str(tmp_path / "qformer_tokenizer")}
    texts = ["what color is the big shape on the left?", "red"]
    framed = QFormer.from_config({**sizes, "text_specials": True}, BuildContext(vision_dim=8, llm_dim=12))
    ids, mask = framed.tokenize_texts(texts)
    expected = bert(texts, truncation=True, max_length=6, padding=True, return_tensors="pt")
    assert ids[mask.bool()].tolist() == expected["input_ids"][expected["attention_mask"].bool()].tolist()
    assert mask.tolist() == expected["attention_mask"].tolist() and ids[0, 0].item() == bert.cls_token_id
    assert framed.own_tokenizer() is framed.text_tokenizer
    plain = QFormer.from_config(sizes, BuildContext(vision_dim=8, llm_dim=12))
    assert plain.tokenize_texts(texts)[0][0, 0].item() == plain.cls_token_id == len(bert)  # vlm's own [CLS] row


def test_import_of_a_transformers_made_instructblip_folder(tmp_path, tokenizer_dir, tokenizer, capsys):
    """A folder as transformers' InstructBLIP checkpoints are laid out (not written by vlm): a BERT
    qformer_tokenizer with [DEC] added and left truncation, Q-Former word embeddings of its size;
    vlm's greedy tokens equal transformers' ``generate`` fed the same Q-Former text."""
    from conftest import LLM_ARCH
    from test_hf_blip2_export import BLIP2_VISION
    from test_qformer import MINILM
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
    )

    bert = AutoTokenizer.from_pretrained(MINILM, truncation_side="left")
    bert.add_special_tokens({"bos_token": "[DEC]"})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token is not None and image_token != tokenizer.unk_token_id
    text_config = AutoConfig.for_model(**LLM_ARCH, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    qformer = InstructBlipQFormerConfig(vocab_size=len(bert), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = InstructBlipConfig(vision_config=dict(BLIP2_VISION), qformer_config=qformer.to_dict(),
                                text_config=text_config.to_dict(), num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(7)
    hf = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # wide enough that greedy decoding writes varied tokens and the instruction matters
        for name, param in hf.named_parameters():
            if param.dim() == 2 and ("language_model" in name or "word_embeddings" in name):
                param.normal_(std=0.3)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(str(hf_dir))
    InstructBlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, bert,
                          num_query_tokens=4).save_pretrained(str(hf_dir))

    imported = tmp_path / "imported"
    code, out, err = run_vlm(["import", "hf-blip2", hf_dir, "--out", imported, "--template", "blip2_qa"], capsys)
    assert code == 0, err[-2000:]
    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    question = "what color is the shape on the left of the picture, and how big is it?"
    ids, expected = greedy(imported, image, question)
    assert len(set(expected)) > 2 and greedy(imported, image, "is it blue?")[1] != expected
    model, _, model_cfg = load_pretrained(imported, device="cpu")
    assert model_cfg.connector.options.max_text_tokens == 64  # the Q-Former's positions bound BERT's 512
    q = bert([question], return_tensors="pt", truncation=True, max_length=64)
    pixels = build_processor(model, tokenizer, model_cfg).load_image(image)[None]
    with torch.no_grad():
        got = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=pixels, qformer_input_ids=q["input_ids"],
                          qformer_attention_mask=q["attention_mask"], max_new_tokens=8, do_sample=False,
                          eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert got[0, len(ids):].tolist() == expected
