"""COCO caption metrics: agreement with the official COCOEvalCap pipeline (minus SPICE) to 1e-6."""

import copy
import json

import pycocoevalcap.eval
import pytest
from pycocoevalcap.eval import COCOEvalCap
from pycocoevalcap.meteor.meteor import Meteor
from pycocotools.coco import COCO

from vlm.evaluation import caption_metric
from vlm.evaluation.caption_metric import score_captions

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]

REFERENCES = {
    1: ["A red square on a white background.", "a red box in the middle", "A small red square.",
        "there is a red square", "A red square sits on white."],
    2: ["Two blue circles next to each other.", "two blue discs side by side",
        "A pair of blue circles.", "Two circles, both blue.", "blue circles, two of them"],
    3: ["A green triangle pointing up.", "an upward green triangle", "A green triangle.",
        "green triangle on a grey background", "A triangle that is green."],
    4: ["A yellow star and a black line.", "a black line below a yellow star",
        "A star (yellow) with a line.", "yellow star, black line", "A line and a star."],
    5: ["Three small purple dots.", "three purple dots in a row", "Purple dots, three of them.",
        "a row of 3 purple dots", "Some purple dots."],
    6: ["An orange rectangle over a blue square.", "orange rectangle above blue square",
        "A blue square under an orange rectangle.", "two shapes: orange and blue",
        "A rectangle and a square."],
    7: ["A white cross on black.", "a cross in white", "White cross, black background.",
        "a plus sign", "A white plus."],  # no result: must not be scored
}
CANDIDATES = [
    {"image_id": 1, "caption": "A RED square on a white background!!"},
    {"image_id": 2, "caption": "two blue discs side by side"},  # identical to a reference
    {"image_id": 3, "caption": "a"},
    {"image_id": 4, "caption": "star star star star star yellow yellow"},
    {"image_id": 5, "caption": "Three purple dots,in a row... (small)"},
    {"image_id": 6, "caption": "An orange rectangle\nover a blue square's top-left corner."},
]


def _coco_annotations():
    anns = [{"image_id": image_id, "caption": caption, "id": 100 * image_id + k}
            for image_id, captions in REFERENCES.items() for k, caption in enumerate(captions)]
    return {"info": {}, "licenses": [], "type": "captions",
            "images": [{"id": image_id, "file_name": f"{image_id}.png"} for image_id in REFERENCES],
            "annotations": anns}


class _NoSpice:
    """Stands in for Spice in the official pipeline: SPICE needs CoreNLP from the network."""

    def compute_score(self, gts, res):
        return float("nan"), [float("nan")] * len(res)

    def method(self):
        return "SPICE (skipped)"


class _RecordingMeteor(Meteor):
    instances = []

    def __init__(self):
        super().__init__()
        _RecordingMeteor.instances.append(self)


def _official_scores(annotations, results):
    coco = COCO()
    coco.dataset = copy.deepcopy(annotations)
    coco.createIndex()
    coco_res = coco.loadRes(copy.deepcopy(results))
    evaluator = COCOEvalCap(coco, coco_res)
    evaluator.params["image_id"] = coco_res.getImgIds()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycocoevalcap.eval, "Spice", _NoSpice)
        evaluator.evaluate()
    return evaluator.eval


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """(ours, official, our Meteor instance): METEOR's java start is slow, so score once."""
    directory = tmp_path_factory.mktemp("captions")
    ann_path, res_path = directory / "captions.json", directory / "results.json"
    ann_path.write_text(json.dumps(_coco_annotations()))
    res_path.write_text(json.dumps(CANDIDATES))
    _RecordingMeteor.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption_metric, "Meteor", _RecordingMeteor)
        ours = score_captions(ann_path, res_path)
    official = _official_scores(_coco_annotations(), CANDIDATES)
    return ours, official, _RecordingMeteor.instances


def test_matches_official_cocoevalcap(scores):
    ours, official, _ = scores
    assert sorted(ours) == sorted(METRICS)
    for metric in METRICS:
        assert isinstance(ours[metric], float)
        assert ours[metric] == pytest.approx(official[metric], abs=1e-6), metric
    assert 0 < ours["CIDEr"] < 10 and 0 < ours["Bleu_1"] < 1


def test_meteor_process_is_closed(scores):
    _, _, meteors = scores
    assert len(meteors) == 1
    assert meteors[0].meteor_p.poll() is not None
    assert not meteors[0].lock.locked()


def test_meteor_process_is_closed_when_scoring_fails(monkeypatch):
    class FailingMeteor(_RecordingMeteor):
        def compute_score(self, gts, res):
            self.lock.acquire()
            raise RuntimeError("meteor failed")

    _RecordingMeteor.instances.clear()
    monkeypatch.setattr(caption_metric, "Meteor", FailingMeteor)
    with pytest.raises(RuntimeError, match="meteor failed"):
        score_captions(_coco_annotations(), CANDIDATES[:1])
    (meteor,) = _RecordingMeteor.instances
    assert meteor.meteor_p.poll() is not None
    assert not meteor.lock.locked()  # so Meteor.__del__ cannot deadlock


def test_unknown_image_id_names_id_and_file(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(_coco_annotations()))
    with pytest.raises(ValueError, match=r"image_id 999 .*annotations file .*captions\.json"):
        score_captions(path, CANDIDATES + [{"image_id": 999, "caption": "a shape"}])


def test_duplicate_image_id():
    with pytest.raises(ValueError, match="image_id 2 appears more than once"):
        score_captions(_coco_annotations(), CANDIDATES + [{"image_id": 2, "caption": "blue"}])


def test_empty_results():
    with pytest.raises(ValueError, match="empty"):
        score_captions(_coco_annotations(), [])


def test_missing_keys():
    with pytest.raises(ValueError, match=r"result #1 .*missing key\(s\) \['caption'\]"):
        score_captions(_coco_annotations(), [CANDIDATES[0], {"image_id": 2}])
    annotations = _coco_annotations()
    del annotations["annotations"][3]["image_id"]
    with pytest.raises(ValueError, match=r"annotation #3 .*missing key\(s\) \['image_id'\]"):
        score_captions(annotations, CANDIDATES)


def test_results_not_a_list():
    with pytest.raises(ValueError, match="must be a JSON list"):
        score_captions(_coco_annotations(), {"image_id": 1, "caption": "a red square"})


def test_images_listed_without_references_are_reported_not_scored(scores):
    annotations = _coco_annotations()
    annotations["images"].append({"id": 77, "file_name": "77.png"})  # listed, no caption
    with_extra = score_captions(annotations, CANDIDATES + [{"image_id": 77, "caption": "a shape"}])
    assert with_extra.pop("images_without_references") == 1
    ours, _, _ = scores
    assert with_extra == pytest.approx(ours)  # the same score as without that image
