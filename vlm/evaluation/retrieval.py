"""Image-text retrieval: recall@1/5/10 both ways from ITC similarities, optionally re-ranked by ITM.

The evaluation set is a COCO captions file read one sample per image (every caption of an image
is one text query, and counts as that image's text). Image -> text: an image scores a hit at k
when any of its captions is among its k best texts. Text -> image: a caption scores a hit at k
when its image is among its k best images. Chance for text -> image recall@k is k / images.

With ``rerank_k``, the k best candidates of every query (BLIP-2's ``k_test``) are scored again
by the ITM head: ITM match logit (mean over the queries) + ITC logit (the cosine similarity over
the learned temperature), so each head votes in the units it was trained in; LAVIS adds the bare
cosine, which lets the ITM head's errors override ITC's confident rankings (see docs/qformer.md).
Candidates outside the k best keep -1e4 and so stay behind them.

An image that cannot be read is skipped with a warning naming it, together with its captions;
the rest are ranked and ``skipped_unreadable`` counts the skipped images.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from vlm.core.errors import ConfigError, DataFormatError, ImageLoadError
from vlm.data.images import unless_unreadable
from vlm.data.types import Sample
from vlm.modeling.connectors.image_text import ImageTextMatcher, similarity

logger = logging.getLogger(__name__)

KS = (1, 5, 10)


def recall_at_k(scores: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Recall (in %) from an ``(n_images, n_texts)`` score matrix; ``text_image[t]`` is the image
    of text t. Keys ``i2t_r{k}``, ``t2i_r{k}`` and their mean ``r_mean``."""
    n_images, n_texts = scores.shape
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must give one image per text ({n_texts}), got shape {tuple(text_image.shape)}")
    # rank of a text for an image = number of texts scored strictly higher
    text_order = scores.argsort(dim=1, descending=True)
    text_rank = torch.empty_like(text_order)
    text_rank.scatter_(1, text_order, torch.arange(n_texts).expand(n_images, -1).contiguous())
    own = text_image.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # (n_images, n_texts)
    best_i2t = text_rank.masked_fill(~own, n_texts).amin(dim=1)  # best rank of an own caption
    image_order = scores.t().argsort(dim=1, descending=True)
    best_t2i = (image_order == text_image.unsqueeze(1)).float().argmax(dim=1)
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = 100.0 * (best_i2t < k).float().mean().item()
    for k in ks:
        metrics[f"t2i_r{k}"] = 100.0 * (best_t2i < k).float().mean().item()
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics


def retrieval_pairs(samples: Sequence[Sample]) -> Tuple[List[str], List[str], torch.Tensor]:
    """``(image paths, texts, text_image)`` from per-image caption samples (``meta["references"]``)."""
    images, texts, owner = [], [], []
    for index, sample in enumerate(samples):
        references = sample.meta.get("references")
        if len(sample.images) != 1 or not references:
            raise DataFormatError(f"retrieval needs one image and its captions per sample; sample {sample.id} has "
                             f"{len(sample.images)} image(s) and {len(references or [])} caption(s)")
        images.append(sample.images[0])
        texts.extend(references)
        owner.extend([index] * len(references))
    return images, texts, torch.tensor(owner, dtype=torch.long)


def _matcher(model) -> ImageTextMatcher:
    if not isinstance(model.connector, ImageTextMatcher):
        raise ConfigError(f"retrieval needs a connector with image-text heads (qformer); this model's connector "
                         f"is {type(model.connector).__name__}")
    return model.connector


@torch.no_grad()
def encode_images(model, load_image, samples: Sequence[Sample], batch_size: int = 64,
                  desc: str = "retrieval") -> Tuple[torch.Tensor, torch.Tensor, List[Sample]]:
    """``(image features, image embeddings, readable samples)``: each sample's one image encoded;
    a sample whose image cannot be read is left out with a warning naming the file."""
    matcher = _matcher(model)
    device = next(model.parameters()).device
    features, image_embeds, kept = [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=f"{desc} images", leave=False):
        chunk = samples[start:start + batch_size]
        loaded = [unless_unreadable(lambda s=s: load_image(s.images[0]), s, where=desc) for s in chunk]
        readable = [(s, pixels) for s, pixels in zip(chunk, loaded) if pixels is not None]
        if not readable:
            continue
        feats = model.vision(torch.stack([pixels for _, pixels in readable]).to(device))
        features.append(feats)
        image_embeds.append(matcher.image_embeddings(feats))
        kept.extend(s for s, _ in readable)
    if not kept:
        raise ImageLoadError(f"{desc}: none of the {len(samples)} images could be read (see the warnings); "
                             "check the eval's image_root")
    return torch.cat(features), torch.cat(image_embeds), kept


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], batch_size: int = 64, desc: str = "retrieval"):
    """``(text ids, text mask, text embeddings)`` on the model's device."""
    matcher = _matcher(model)
    device = next(model.parameters()).device
    ids, mask = matcher.tokenize_texts(texts, device=device)
    text_embeds = [matcher.text_embeddings(ids[s:s + batch_size], mask[s:s + batch_size])
                   for s in tqdm(range(0, len(texts), batch_size), desc=f"{desc} texts", leave=False)]
    return ids, mask, torch.cat(text_embeds)


@torch.no_grad()
def rerank_with_itm(model, sims: torch.Tensor, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    k: int, batch_size: int = 64, desc: str = "retrieval") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(i2t scores, t2i scores)``, both ``(n_images, n_texts)``: each query's k best ITC
    candidates rescored as ITM match logit + ITC similarity / ITC temperature, the rest -1e4."""
    matcher = _matcher(model)
    temperature = matcher.retrieval_temperature()

    def score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(image_index), batch_size):
            i, t = image_index[s:s + batch_size], text_index[s:s + batch_size]
            out.append(matcher.match_logits(features[i], ids[t], mask[t])[:, 1])
        return torch.cat(out)

    n_images, n_texts = sims.shape
    i2t = torch.full_like(sims, -1e4)
    top = sims.topk(min(k, n_texts), dim=1).indices  # (n_images, k)
    rows = torch.arange(n_images, device=sims.device).unsqueeze(1).expand_as(top).flatten()
    for start in tqdm(range(0, len(rows), 4096), desc=f"{desc} itm i2t", leave=False):
        r, c = rows[start:start + 4096], top.flatten()[start:start + 4096]
        i2t[r, c] = score(r, c) + sims[r, c] / temperature
    t2i = torch.full_like(sims, -1e4)
    top = sims.t().topk(min(k, n_images), dim=1).indices  # (n_texts, k)
    cols = torch.arange(n_texts, device=sims.device).unsqueeze(1).expand_as(top).flatten()
    for start in tqdm(range(0, len(cols), 4096), desc=f"{desc} itm t2i", leave=False):
        c, r = cols[start:start + 4096], top.flatten()[start:start + 4096]
        t2i[r, c] = score(r, c) + sims[r, c] / temperature
    return i2t, t2i


def evaluate_retrieval(model, load_image, samples: Sequence[Sample], rerank_k: Optional[int] = None,
                       batch_size: int = 64, desc: str = "retrieval") -> Tuple[Dict[str, float], dict]:
    """Recall metrics (ITC, and ``itm_*`` after re-ranking when ``rerank_k``; ``skipped_unreadable``
    when images could not be read) and the top-10 lists ``{"i2t": [...], "t2i": [...]}`` for a
    results file, over the samples whose image could be read."""
    model.eval()
    retrieval_pairs(samples)  # malformed samples fail before any image is read
    features, image_embeds, readable = encode_images(model, load_image, samples, batch_size, desc)
    skipped = len(samples) - len(readable)
    if skipped:
        logger.warning("%s: %d of %d images skipped as unreadable (with their captions); ranked the rest",
                       desc, skipped, len(samples))
    samples = readable
    image_paths, texts, text_image = retrieval_pairs(samples)
    ids, mask, text_embeds = encode_texts(model, texts, batch_size, desc)
    sims = similarity(image_embeds, text_embeds)
    metrics = recall_at_k(sims.cpu(), text_image)
    metrics["t2i_r5_chance"] = 100.0 * min(5, len(image_paths)) / len(image_paths)
    if skipped:
        metrics["skipped_unreadable"] = skipped
    i2t_scores, t2i_scores = sims, sims
    if rerank_k:
        i2t_scores, t2i_scores = rerank_with_itm(model, sims, features, ids, mask, rerank_k, batch_size, desc)
        i2t_metrics = recall_at_k(i2t_scores.cpu(), text_image)
        t2i_metrics = recall_at_k(t2i_scores.cpu(), text_image)
        reranked = {k: v for k, v in i2t_metrics.items() if k.startswith("i2t")}
        reranked.update({k: v for k, v in t2i_metrics.items() if k.startswith("t2i")})
        reranked["r_mean"] = sum(reranked.values()) / len(reranked)
        metrics.update({f"itm_{k}": v for k, v in reranked.items()})
    ids_of = [s.meta.get("image_id", s.id) for s in samples]
    top_texts = i2t_scores.topk(min(10, len(texts)), dim=1).indices.cpu()
    top_images = t2i_scores.t().topk(min(10, len(image_paths)), dim=1).indices.cpu()
    results = {
        "i2t": [{"image_id": ids_of[i], "top_texts": [texts[t] for t in top_texts[i].tolist()]}
                for i in range(len(image_paths))],
        "t2i": [{"text": texts[t], "image_id": ids_of[int(text_image[t])],
                 "top_image_ids": [ids_of[i] for i in top_images[t].tolist()]} for t in range(len(texts))],
    }
    return metrics, results
