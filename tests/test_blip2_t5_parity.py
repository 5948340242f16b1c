"""Parity with transformers' BLIP-2 and InstructBLIP on a T5 language model (fp32, within 1e-5).

``Blip2ForConditionalGeneration`` and ``InstructBlipForConditionalGeneration`` with a tiny
``T5ForConditionalGeneration`` are mapped into our ``Seq2SeqVisionLanguageModel``: logits and
loss for encoder inputs padded on either side, the training split of the processor's rows
(prompt to the encoder, answer + eos as the target), and greedy tokens through transformers'
``generate``, our ``generate`` and the lean eval decode.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from vlm.config import VisionConfig
from vlm.data.processor import IGNORE_INDEX
from vlm.data.tokenizer_training import train_tokenizer
from vlm.inference.decode import greedy_decode
from vlm.interop.blip2 import (
    load_blip2_for_conditional_generation,
    load_instructblip_for_conditional_generation,
)
from vlm.modeling.connectors.qformer import QFormer, QFormerOptions
from vlm.modeling.seq2seq_vlm import (
    Seq2SeqVisionLanguageModel,
    last_labelled_run,
    split_prompt_target,
)
from vlm.modeling.vision.hf_blip2 import HFBlip2VisionEncoder

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               cross_attention_frequency=1)
NUM_QUERIES = 4


@pytest.fixture(scope="module")
def tokenizer():
    sentences = ["a red circle in the center", "what color is the shape?", "a small blue square at the top",
                 "Question: is it red? Short answer: yes"] * 4
    return train_tokenizer(sentences, vocab_size=300)


def t5_config(tokenizer) -> T5Config:
    return T5Config(vocab_size=len(tokenizer), d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def qformer_options(**overrides) -> QFormerOptions:
    opts = dict(num_queries=NUM_QUERIES, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                cross_attention_freq=1, vision_layernorm=False, embed_dim=16, dropout=0.0, attention_dropout=0.0)
    opts.update(overrides)
    return QFormerOptions(**opts)


def our_model(ref, tokenizer, **options) -> Seq2SeqVisionLanguageModel:
    vision = HFBlip2VisionEncoder(VisionConfig(name="hf_blip2_vision", feature_layer=-1, keep_cls=True),
                                  type(ref.vision_model)(Blip2VisionConfig(**VISION)))
    connector = QFormer(32, 48, tokenizer, qformer_options(**options))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return Seq2SeqVisionLanguageModel(vision, connector, T5ForConditionalGeneration(t5_config(tokenizer)), image_id)


def spread_weights(ref) -> None:
    """Queries as trained ones are, and LLM matrices wide enough that greedy decoding of the random
    T5 writes varied tokens (at its own init it repeats one), so that stops land at different steps."""
    with torch.no_grad():
        ref.query_tokens.normal_(std=0.02)
        for param in ref.language_model.parameters():
            if param.dim() == 2:
                param.normal_(std=0.2)


@pytest.fixture(scope="module")
def blip2_pair(tokenizer):
    torch.manual_seed(0)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=t5_config(tokenizer).to_dict(),
                         num_query_tokens=NUM_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    ref = Blip2ForConditionalGeneration(config).eval()
    assert isinstance(ref.language_model, T5ForConditionalGeneration)
    spread_weights(ref)
    ours = our_model(ref, tokenizer)
    load_blip2_for_conditional_generation(ours, ref)
    return ref, ours.eval()


@pytest.fixture(scope="module")
def instructblip_pair(tokenizer):
    torch.manual_seed(0)
    config = InstructBlipConfig(vision_config=VISION, qformer_config=dict(vocab_size=len(tokenizer) + 2, **QFORMER),
                                text_config=t5_config(tokenizer).to_dict(), num_query_tokens=NUM_QUERIES,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    ref = InstructBlipForConditionalGeneration(config).eval()
    assert isinstance(ref.language_model, T5ForConditionalGeneration)
    spread_weights(ref)
    ours = our_model(ref, tokenizer, instruction_aware=True)
    load_instructblip_for_conditional_generation(ours, ref)
    return ref, ours.eval()


def encoder_batch(tokenizer, padding_side: str, eos: bool = True):
    """Two prompts (query placeholders first, as BLIP-2's processor writes them), padded."""
    image = [tokenizer.convert_tokens_to_ids("<image>")] * NUM_QUERIES
    texts = ["Question: what color is the shape? Short answer:", "a small"]
    rows = [image + tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
            for t in texts]
    longest = max(map(len, rows))
    ids = torch.full((2, longest), tokenizer.pad_token_id)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels, texts


def targets(tokenizer):
    rows = [tokenizer("red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            tokenizer("blue square at the top", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    labels = torch.full((2, max(map(len, rows))), IGNORE_INDEX)
    for i, row in enumerate(rows):
        labels[i, :len(row)] = torch.tensor(row)
    return labels


def instruction_inputs(ours, texts):
    qids, qmask = ours.connector.tokenize_texts(texts)
    return dict(qformer_input_ids=qids, qformer_attention_mask=qmask)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_and_loss_match_transformers_with_t5(request, tokenizer, family, padding_side):
    ref, ours = request.getfixturevalue(f"{family}_pair")
    ids, mask, pixels, texts = encoder_batch(tokenizer, padding_side)
    labels = targets(tokenizer)
    extra = instruction_inputs(ours, texts) if family == "instructblip" else {}
    instructions = texts if family == "instructblip" else None
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **extra)
        got = ours.encoder_decoder_forward(ids, mask, pixels, labels=labels, instructions=instructions)
    assert got.logits.shape == expected.logits.shape == (2, labels.shape[1], len(tokenizer))
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    if family == "instructblip":  # the instruction steers the visual tokens, so the logits
        with torch.no_grad():
            other = ours.encoder_decoder_forward(ids, mask, pixels, labels=labels, instructions=texts[::-1])
        assert not torch.allclose(other.logits, got.logits, atol=1e-4)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_training_rows_split_into_prompt_and_target_give_transformers_loss(request, tokenizer, family):
    """The processor's rows (prompt then answer in one right-padded sequence, labels on the
    answer) train the same loss as transformers fed the prompt + eos and the answer + eos."""
    ref, ours = request.getfixturevalue(f"{family}_pair")
    ids, mask, pixels, texts = encoder_batch(tokenizer, "right", eos=False)
    labels = targets(tokenizer)
    rows, row_labels = [], []
    for i in range(2):
        prompt = ids[i][mask[i].bool()].tolist()
        answer = [t for t in labels[i].tolist() if t != IGNORE_INDEX][:-1]  # without eos: the model appends it
        rows.append(prompt + answer)
        row_labels.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(map(len, rows))
    train_ids = torch.full((2, width), tokenizer.pad_token_id)
    train_labels = torch.full((2, width), IGNORE_INDEX)
    train_mask = torch.zeros((2, width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        train_ids[i, :len(row)], train_labels[i, :len(row)], train_mask[i, :len(row)] = (
            torch.tensor(row), torch.tensor(lab), 1)
    enc_ids, enc_mask, _ = encoder_batch(tokenizer, "right", eos=True)[:3]
    extra = instruction_inputs(ours, texts) if family == "instructblip" else {}
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=enc_ids, attention_mask=enc_mask, labels=labels, **extra).loss
        got = ours(train_ids, attention_mask=train_mask, pixel_values=pixels, labels=train_labels,
                   instructions=texts if family == "instructblip" else None, return_logits=False).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_greedy_tokens_match_transformers_generate(request, tokenizer, family):
    ref, ours = request.getfixturevalue(f"{family}_pair")
    ids, mask, pixels, texts = encoder_batch(tokenizer, "left")
    extra = instruction_inputs(ours, texts) if family == "instructblip" else {}
    instructions = texts if family == "instructblip" else None
    # a frequent token as a second stop, so that rows stop at different steps
    with torch.no_grad():
        first = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             do_sample=False, **extra)
    stops = [tokenizer.eos_token_id, int(first[0, 3])]
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs, **extra)[:, 1:]
    prompts = ids.masked_fill(ids == tokenizer.eos_token_id, tokenizer.pad_token_id)  # ours appends eos itself
    prompts, prompt_mask = prompts[:, :-1], mask[:, :-1]
    got = ours.generate(prompts, prompt_mask, pixels, instructions=instructions, **kwargs)
    lean = greedy_decode(ours, prompts, prompt_mask, pixels, instructions, max_new_tokens=8, eos_token_ids=stops,
                         pad_token_id=tokenizer.pad_token_id)
    assert expected.shape[1] >= 2
    assert torch.equal(got, expected)
    assert torch.equal(lean, expected)


def test_split_prompt_target_takes_the_last_answer_and_appends_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[7, 8, 9, 10, 11, 12, 13, pad], [7, 8, 20, 21, pad, pad, pad, pad]])
    mask = (ids != pad).long()
    labels = torch.tensor([[-100, 8, -100, -100, 11, 12, -100, -100], [-100, -100, 20, 21, -100, -100, -100, -100]])
    enc, enc_mask, target = split_prompt_target(ids, mask, labels, eos, pad)
    assert enc.tolist() == [[7, 8, 9, 10, eos], [7, 8, eos, pad, pad]]
    assert enc_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert target.tolist() == [[11, 12, eos], [20, 21, eos]]
    assert last_labelled_run([-100, -100]) == (2, 2)
    assert last_labelled_run([5, 2]) == (0, 2)
    _, _, kept = split_prompt_target(torch.tensor([[7, 5, eos]]), None, torch.tensor([[-100, 5, eos]]), eos, pad)
    assert kept.tolist() == [[5, eos]]  # an answer that ends with eos gets no second one
