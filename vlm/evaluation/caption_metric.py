"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) via pycocoevalcap.

Same pipeline as ``pycocoevalcap.eval.COCOEvalCap.evaluate`` restricted to the images that have a
result: PTB-tokenise references and candidates, then call the official scorers directly.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlm.core.errors import DataFormatError
from vlm.evaluation.results_file import load_json, record_list, require, results_by_id

__all__ = ["score_captions"]

logger = logging.getLogger(__name__)

_BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def _references(annotations, label: str) -> dict:
    refs = defaultdict(list)
    for i, ann in enumerate(record_list(annotations, "annotations", label)):
        require(ann, ("image_id", "caption"), f"annotation #{i} in {label}")
        if not isinstance(ann["caption"], str):
            raise DataFormatError(f"annotation #{i} in {label} has a non-string caption: {ann!r}")
        refs[ann["image_id"]].append({"caption": ann["caption"]})
    return refs


def _listed_images(annotations) -> set:
    """Ids of the file's ``images`` list (COCO files may list images that have no caption)."""
    images = annotations.get("images") if isinstance(annotations, dict) else None
    if not isinstance(images, list):
        return set()
    return {img["id"] for img in images if isinstance(img, dict) and "id" in img}


def _candidates(results, label: str, refs: dict, refs_label: str, listed: frozenset = frozenset(),
                unreferenced: list | None = None) -> dict:
    """Results by image id. A result for an image the annotations list without any caption is
    left out and its id appended to ``unreferenced``; any other unknown id is an error."""

    def known(i: int, image_id) -> bool:
        if image_id not in refs and image_id in listed and unreferenced is not None:
            unreferenced.append(image_id)
            return False
        if image_id not in refs:
            raise DataFormatError(f"result image_id {image_id!r} (result #{i} in {label}) has no "
                             f"reference caption in {refs_label}")
        return True

    captions = results_by_id(results, label, "image_id", "caption", known, nonempty="captions")
    return {image_id: [{"caption": caption}] for image_id, caption in captions.items()}


def _meteor_score(gts: dict, res: dict) -> float:
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        # Stop the java subprocess now rather than whenever the object is collected.
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        # compute_score holds the lock if it raised; Meteor.__del__ would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()
    return score


def score_captions(annotations, results, *, spice: bool = False) -> dict:
    """Score COCO-format captions with the official pycocoevalcap scorers.

    ``annotations`` is a COCO captions JSON (path or dict with an ``"annotations"`` list of
    ``{"image_id", "caption"}``); ``results`` a list of ``{"image_id", "caption"}`` (path or list),
    at most one per image. Only images with a result are scored; a result for an image that
    the file's ``images`` lists without any caption is left out, counted in
    ``images_without_references`` (present only then) and logged. Returns ``Bleu_1..Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` (and ``SPICE`` if ``spice=True``; it needs a network
    connection on first use) on pycocoevalcap's raw scale.
    """
    ann_obj, ann_label = load_json(annotations, "annotations")
    res_obj, res_label = load_json(results, "results")
    refs = _references(ann_obj, ann_label)
    unreferenced: list = []
    cands = _candidates(res_obj, res_label, refs, ann_label, _listed_images(ann_obj), unreferenced)
    if unreferenced:
        logger.warning("%d result(s) are for images %s lists without a reference caption; scored the %d "
                       "others (first ids left out: %s)", len(unreferenced), ann_label, len(cands),
                       unreferenced[:5])
    if not cands:
        raise ValueError(f"none of the results in {res_label} is for an image with a reference caption "
                         f"in {ann_label}")

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({image_id: refs[image_id] for image_id in cands})
    res = tokenizer.tokenize(cands)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = dict(zip(_BLEU_KEYS, bleu))
    scores["METEOR"] = _meteor_score(gts, res)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"], _ = Spice().compute_score(gts, res)
    scores = {name: float(value) for name, value in scores.items()}
    if unreferenced:
        scores["images_without_references"] = len(unreferenced)
    return scores
