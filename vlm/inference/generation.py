"""Batched generation over Samples: left-padded prompts in, decoded answers out."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from vlm.data.batch import Collator, EncodedSample
from vlm.data.images import unless_unreadable
from vlm.data.processor import VLMProcessor, image_instructions
from vlm.data.types import Sample
from vlm.inference.decode import greedy_decode, greedy_decode_shared_prefixes


def stop_settings(processor: VLMProcessor) -> Dict:
    """``eos_token_id`` (eos plus single-token stop strings) and, if needed, ``stop_strings``."""
    tokenizer = processor.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    multi = []
    for text in processor.template.stop_strings():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.append(ids[0])
        else:
            multi.append(text)
    settings: Dict = {"eos_token_id": sorted(set(eos)), "pad_token_id": tokenizer.pad_token_id}
    if multi:
        settings.update(stop_strings=multi, tokenizer=tokenizer)
    return settings


def clean_answer(text: str, stops: Sequence[str]) -> str:
    """Cut at the first stop string and strip whitespace."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


def uses_lean_decode(settings: Dict, num_beams: int) -> bool:
    """Whether :func:`vlm.inference.decode.greedy_decode` can stand in for transformers'
    ``generate``: greedy, one beam, single-token stops, nothing else asked for."""
    plain = {"eos_token_id", "pad_token_id", "do_sample"}
    return num_beams == 1 and not settings.get("do_sample") and set(settings) <= plain


@torch.no_grad()
def generate_answers(model, processor: VLMProcessor, samples: Sequence[Sample], *, batch_size: int = 16,
                     max_new_tokens: int = 32, num_beams: int = 1, desc: str = "generate",
                     skip_unreadable: bool = False, lean: bool = True, **generation_kwargs) -> List[Optional[str]]:
    """One decoded answer per sample (greedy unless told otherwise), in order. With
    ``skip_unreadable``, a sample whose image cannot be read gets None instead of an error.

    Plain greedy decoding runs the lean loop of :mod:`vlm.inference.decode` (the same tokens as
    transformers' greedy ``generate``, less overhead); beam search, sampling, multi-token stop
    strings or ``lean=False`` go through transformers' ``generate``."""
    model.eval()
    device = next(model.parameters()).device
    settings = stop_settings(processor)
    settings.update(generation_kwargs)
    settings.setdefault("do_sample", False)
    # AnyRes (each image's token count and tiles from processor.encode) and videos (the batches say
    # which images are frames, to be pooled) take the padded path
    lean = (lean and uses_lean_decode(settings, num_beams) and processor.tiling is None
            and not any(s.videos for s in samples))
    stops = processor.template.stop_strings()
    if lean:
        return _lean_answers(model, processor, samples, batch_size, max_new_tokens, settings, stops, desc,
                             skip_unreadable)
    answers: List[str] = []
    collate = Collator(processor.tokenizer.pad_token_id, padding_side="left")
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        encoded = [unless_unreadable(lambda s=s: processor.encode(s, for_generation=True), s, skip_unreadable)
                   for s in samples[start:start + batch_size]]
        if not any(encoded):
            answers.extend([None] * len(encoded))
            continue
        batch = collate(encoded).to(device)
        new_tokens = model.generate(batch.input_ids, batch.attention_mask, batch.images,
                                    instructions=batch.instructions, image_layouts=batch.image_layouts,
                                    frame_mask=batch.frames,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, **settings)
        texts = iter(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        answers.extend(None if e is None else clean_answer(next(texts), stops) for e in encoded)
    return answers


def _lean_answers(model, processor: VLMProcessor, samples: Sequence[Sample], batch_size: int,
                  max_new_tokens: int, settings: Dict, stops: Sequence[str], desc: str,
                  skip_unreadable: bool = False) -> List[Optional[str]]:
    """Greedy answers by :func:`greedy_decode`, with the work a padded, one-image-per-question
    loop repeats removed: prompts batched by length (less left padding), each distinct image
    loaded once (kept while a byte budget allows) and, within a batch, encoded once unless the
    connector reads the question. Questions about one image whose prompts open alike (the
    template's opening and the image) are batched together and that shared prefix runs
    through the LLM once (:func:`greedy_decode_shared_prefixes`). Images may be paths or PIL
    images; with ``skip_unreadable`` a sample whose image cannot be read gets None."""
    device = next(model.parameters()).device
    prompts = [processor.tokenize(processor.prompt_turns(s.turns), add_generation_prompt=True)[0] for s in samples]
    images = _ImageMemo(processor.load_image)
    answers: List[Optional[str]] = [""] * len(samples)
    prefixes = _shared_prefix_keys(model, samples, prompts)
    order = _batch_order(prompts, prefixes)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch_ids = order[start:start + batch_size]
        chunk = [i for i in batch_ids if _images_readable(samples[i], images, skip_unreadable)]
        for i in set(batch_ids) - set(chunk):
            answers[i] = None
        if not chunk:
            continue
        distinct: Dict[object, int] = {}  # image key -> index among the batch's distinct images
        sources: List[object] = []
        image_index: List[int] = []
        instructions: List[str] = []
        for i in chunk:
            for image in samples[i].images:
                key = _image_key(image)
                if key not in distinct:
                    distinct[key] = len(sources)
                    sources.append(image)
                image_index.append(distinct[key])
            instructions += image_instructions(processor.prompt_turns(samples[i].turns))
        pixels = torch.stack([images.load(image) for image in sources]).to(device) if sources else None
        stop_args = dict(max_new_tokens=max_new_tokens, eos_token_ids=settings["eos_token_id"],
                         pad_token_id=settings["pad_token_id"])
        keys = [prefixes[i] for i in chunk]
        if all(k is not None for k in keys) and len(set(keys)) < len(keys):
            new_tokens = _decode_sharing_prefixes(model, processor, chunk, keys, prompts, distinct, pixels, device,
                                                  stop_args)
        else:
            batch = _prompt_batch([prompts[i] for i in chunk], processor.tokenizer.pad_token_id).to(device)
            new_tokens = greedy_decode(model, batch.input_ids, batch.attention_mask, pixels, instructions,
                                       image_index=torch.tensor(image_index, dtype=torch.long, device=device),
                                       **stop_args)
        texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            answers[i] = clean_answer(text, stops)
    return answers


def _prompt_batch(prompts: Sequence[Sequence[int]], pad_id: int):
    """Token-id prompts (their images passed apart), left-padded into a batch."""
    return Collator(pad_id, padding_side="left")([EncodedSample(list(ids), list(ids)) for ids in prompts])


def _shared_prefix_keys(model, samples: Sequence[Sample], prompts: Sequence[Sequence[int]]) -> List[Optional[tuple]]:
    """Per sample, ``(prefix ids, image keys)`` when its prompt can share a prefix: the tokens
    through its last image placeholder (which show all its images), with text after them;
    None otherwise (no image, a connector whose visual tokens depend on the question, or an
    encoder-decoder LLM, whose encoder reads the whole prompt at once)."""
    if getattr(model.connector, "instruction_aware", False) or getattr(model, "is_encoder_decoder", False):
        return [None] * len(samples)
    keys: List[Optional[tuple]] = []
    for sample, ids in zip(samples, prompts):
        placeholders = [j for j, t in enumerate(ids) if t == model.image_token_id]
        end = placeholders[-1] + 1 if placeholders and sample.images else 0
        keys.append((tuple(ids[:end]), tuple(_image_key(x) for x in sample.images)) if 0 < end < len(ids) else None)
    return keys


def _batch_order(prompts: Sequence[Sequence[int]], prefixes: Sequence[Optional[tuple]]) -> List[int]:
    """Samples by prompt length (less left padding), those sharing a prefix next to each other
    (at the length of their group's longest prompt)."""
    groups: Dict[tuple, List[int]] = {}
    for i, key in enumerate(prefixes):
        if key is not None:
            groups.setdefault(key, []).append(i)
    rank = {}
    for members in groups.values():
        longest = max(len(prompts[i]) for i in members)
        for i in members:
            rank[i] = (longest, members[0], i)
    return sorted(range(len(prompts)), key=lambda i: rank.get(i, (len(prompts[i]), i, i)))


def _decode_sharing_prefixes(model, processor: VLMProcessor, chunk: Sequence[int], keys: Sequence[tuple],
                             prompts: Sequence[Sequence[int]], distinct: Dict[object, int],
                             pixels: Optional[torch.Tensor], device, stop_args: Dict) -> torch.Tensor:
    """One batch through :func:`greedy_decode_shared_prefixes`: each distinct prefix once."""
    pad = processor.tokenizer.pad_token_id
    unique: Dict[tuple, int] = {}
    for key in keys:
        unique.setdefault(key, len(unique))
    prefix_batch = _prompt_batch([key[0] for key in unique], pad).to(device)
    image_index = [distinct[image] for key in unique for image in key[1]]
    suffixes = _prompt_batch([prompts[i][len(key[0]):] for i, key in zip(chunk, keys)], pad).to(device)
    return greedy_decode_shared_prefixes(
        model, prefix_batch.input_ids, prefix_batch.attention_mask, pixels,
        torch.tensor(image_index, dtype=torch.long, device=device),
        torch.tensor([unique[key] for key in keys], dtype=torch.long, device=device),
        suffixes.input_ids, suffixes.attention_mask, **stop_args)


def _images_readable(sample: Sample, images: "_ImageMemo", skip_unreadable: bool) -> bool:
    """Load ``sample``'s images into ``images``; False (logged) for an unreadable one when
    ``skip_unreadable``, else its ImageLoadError."""
    loaded = unless_unreadable(lambda: [images.load(image) for image in sample.images], sample, skip_unreadable)
    return loaded is not None


def _image_key(image) -> object:
    """A hashable key for an image given as a path or as a PIL image (by identity)."""
    return image if isinstance(image, str) else ("object", id(image))


class _ImageMemo:
    """Loaded images by path, least recently used dropped beyond ``max_bytes`` (an eval asks
    several questions about one image; loading it again is wasted work)."""

    def __init__(self, load, max_bytes: int = 256 * 2**20):
        from collections import OrderedDict

        self.load_image = load
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def load(self, path) -> torch.Tensor:
        """The transformed image of ``path`` (a path, or a PIL image kept by identity)."""
        key = _image_key(path)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        image = self.load_image(path)
        self.items[key] = image
        self.bytes += image.numel() * image.element_size()
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, dropped = self.items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        return image
