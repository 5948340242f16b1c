"""Train a small byte-level BPE tokenizer from scratch (for demos and tests without a hub)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm.core.errors import DataFormatError
from vlm.data.templates import VICUNA_SYSTEM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]

# A ChatML Jinja template, so that the 'tokenizer' chat template works with these tokenizers.
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATE_TEXT = [VICUNA_SYSTEM, "USER: ASSISTANT:", "system user assistant"]


def iter_text(paths: Sequence[str | Path]) -> Iterator[str]:
    """Text from ``.txt`` files (one line each), ``.jsonl`` files (``text`` or conversation
    values) and LLaVA conversation ``.json`` files (every turn)."""
    from vlm.data.formats import read_llava_json

    for path in map(Path, paths):
        if path.suffix == ".json":
            for sample in read_llava_json(path):
                yield from (turn.content.replace("<image>", "").strip() for turn in sample.turns)
            continue
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.suffix != ".jsonl":
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc}") from None
                if "text" in record:
                    yield record["text"]
                for turn in record.get("conversations", []):
                    yield turn["value"].replace("<image>", "")


def iter_dataset_text(datasets) -> Iterator[str]:
    """Every turn's text (``<image>`` markers removed) of datasets read with vlm's readers:
    each item has ``format``, ``args`` and optionally ``max_samples`` (a ``DataConfig``)."""
    from vlm.data.formats import read_dataset

    for data in datasets:
        samples = read_dataset(data.format, **dict(data.args))
        limit = getattr(data, "max_samples", None)
        for sample in samples[:limit] if limit else samples:
            for turn in sample.turns:
                text = turn.content.replace("<image>", "").strip()
                if text:
                    yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with bos/eos/pad/unk, ``<image>`` and ChatML tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus: List[str] = list(texts) + TEMPLATE_TEXT
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_JINJA
    return fast


def train_tokenizer_from_files(files: Sequence[str], out: str, vocab_size: int = 512, min_frequency: int = 1,
                               datasets=()) -> PreTrainedTokenizerFast:
    """Train on text files and on ``datasets`` (read by format name, see
    :func:`iter_dataset_text`) and save in transformers' format to ``out``."""
    texts = itertools.chain(iter_text(files), iter_dataset_text(datasets))
    tokenizer = train_tokenizer(texts, vocab_size, min_frequency)
    tokenizer.save_pretrained(out)
    return tokenizer
