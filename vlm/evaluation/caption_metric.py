"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) via pycocoevalcap.

Same pipeline as ``pycocoevalcap.eval.COCOEvalCap.evaluate`` restricted to the images that have a
result: PTB-tokenise references and candidates, then call the official scorers directly.
"""

from __future__ import annotations

from collections import defaultdict

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlm.errors import DataFormatError
from vlm.evaluation.vqa_metric import _load_json, _records, _require

__all__ = ["score_captions"]

_BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def _references(annotations, label: str) -> dict:
    refs = defaultdict(list)
    for i, ann in enumerate(_records(annotations, "annotations", label)):
        _require(ann, ("image_id", "caption"), f"annotation #{i} in {label}")
        if not isinstance(ann["caption"], str):
            raise DataFormatError(f"annotation #{i} in {label} has a non-string caption: {ann!r}")
        refs[ann["image_id"]].append({"caption": ann["caption"]})
    return refs


def _candidates(results, label: str, refs: dict, refs_label: str) -> dict:
    if not isinstance(results, list):
        raise DataFormatError(f"{label} must be a JSON list of {{'image_id', 'caption'}} objects, "
                         f"got {type(results).__name__}")
    if not results:
        raise DataFormatError(f"{label} is empty: no captions to score")
    cands = {}
    for i, res in enumerate(results):
        _require(res, ("image_id", "caption"), f"result #{i} in {label}")
        image_id = res["image_id"]
        if image_id not in refs:
            raise DataFormatError(f"result image_id {image_id!r} (result #{i} in {label}) has no "
                             f"reference caption in {refs_label}")
        if image_id in cands:
            raise DataFormatError(f"image_id {image_id!r} appears more than once in {label}")
        if not isinstance(res["caption"], str):
            raise DataFormatError(f"result for image_id {image_id!r} in {label} has a non-string "
                             f"caption: {res['caption']!r}")
        cands[image_id] = [{"caption": res["caption"]}]
    return cands


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
    at most one per image. Only images with a result are scored. Returns ``Bleu_1..Bleu_4``,
    ``METEOR``, ``ROUGE_L``, ``CIDEr`` (and ``SPICE`` if ``spice=True``; it needs a network
    connection on first use) on pycocoevalcap's raw scale.
    """
    ann_obj, ann_label = _load_json(annotations, "annotations")
    res_obj, res_label = _load_json(results, "results")
    refs = _references(ann_obj, ann_label)
    cands = _candidates(res_obj, res_label, refs, ann_label)

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
    return {name: float(value) for name, value in scores.items()}
