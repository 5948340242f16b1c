#!/usr/bin/env python
"""Prepare public datasets you already have on disk for vlm's readers (nothing is downloaded).

    python scripts/prepare_data.py llava-pretrain --json blip_laion_cc_sbu_558k.json --images DIR --out DIR
    python scripts/prepare_data.py llava-instruct --json llava_v1_5_mix665k.json --images DIR --out DIR
    python scripts/prepare_data.py coco-karpathy --karpathy dataset_coco.json --out DIR [--images COCO_DIR]
    python scripts/prepare_data.py vqav2 --questions Q.json --annotations A.json --out DIR [--images COCO_DIR]

- ``llava-pretrain`` / ``llava-instruct`` (LLaVA's LCS-558K and mix-665K): keep the records whose
  images exist under ``--images`` (text-only records are kept), fix the image extensions that
  differ on disk (OCR-VQA's ``.jpg`` names saved as ``.png`` / ``.gif``), and write a
  ``llava_json`` file plus a report of what was dropped, per source folder.
- ``coco-karpathy``: the Karpathy split file -> one official-format COCO captions file per split
  (``captions_karpathy_{train,val,test}.json``; restval joins train): what ``coco_captions``
  evaluations read and score against.
- ``vqav2``: VQAv2 questions + annotations -> a ``llava_json`` training file (one conversation per
  question, answered with ``multiple_choice_answer``, LLaVA-1.5's short-answer prompt).

Each command prints a JSON report and writes it beside its outputs (``report_<command>.json``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

# LLaVA-1.5's short-answer instruction, as vlm's vqav2 reader uses it
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
OTHER_EXTENSIONS = (".jpg", ".png", ".gif", ".jpeg")


def _image_names(record: dict) -> List[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def _on_disk(root: Path, name: str) -> Optional[str]:
    """``name`` if it exists under ``root``, else the same path with another image extension
    that does, else None."""
    if (root / name).is_file():
        return name
    stem = Path(name).with_suffix("")
    for ext in OTHER_EXTENSIONS:
        if (root / stem.with_suffix(ext)).is_file():
            return str(stem.with_suffix(ext))
    return None


def prepare_llava(json_path: str, images: str, out: str, name: str, max_samples: Optional[int] = None) -> Dict:
    """Keep the LLaVA records whose images exist (fixing extensions); write ``out/name``."""
    root = Path(images)
    records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    kept, missing, renamed, text_only = [], Counter(), 0, 0
    by_source: Counter = Counter()
    for record in records[:max_samples] if max_samples else records:
        names = _image_names(record)
        found = [_on_disk(root, n) for n in names]
        source = Path(names[0]).parts[0] if names and len(Path(names[0]).parts) > 1 else ("text" if not names else ".")
        if any(f is None for f in found):
            missing[source] += 1
            continue
        if not names:
            text_only += 1
        if found != names:
            renamed += 1
            record = {**record, "image": found[0] if isinstance(record["image"], str) else found}
        by_source[source] += 1
        kept.append(record)
    target = Path(out) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(kept), encoding="utf-8")
    return {"written": str(target), "records": len(records), "kept": len(kept), "text_only": text_only,
            "extension_fixed": renamed, "dropped_missing_image": sum(missing.values()),
            "kept_by_source": dict(sorted(by_source.items())), "dropped_by_source": dict(sorted(missing.items()))}


def prepare_coco_karpathy(karpathy: str, out: str, images: Optional[str] = None) -> Dict:
    """One official-format captions file per Karpathy split (restval joins train)."""
    data = json.loads(Path(karpathy).read_text(encoding="utf-8"))
    splits: Dict[str, dict] = {s: {"images": [], "annotations": []} for s in ("train", "val", "test")}
    missing = 0
    for image in data["images"]:
        split = "train" if image["split"] == "restval" else image["split"]
        file_name = str(Path(image.get("filepath", "")) / image["filename"])
        if images is not None and not (Path(images) / file_name).is_file():
            missing += 1
            continue
        image_id = image.get("cocoid", image.get("imgid"))
        splits[split]["images"].append({"id": image_id, "file_name": file_name})
        for sentence in image["sentences"]:
            splits[split]["annotations"].append({"image_id": image_id, "id": sentence["sentid"],
                                                 "caption": sentence["raw"].strip()})
    Path(out).mkdir(parents=True, exist_ok=True)
    report: Dict = {"dropped_missing_image": missing}
    for split, content in splits.items():
        target = Path(out) / f"captions_karpathy_{split}.json"
        target.write_text(json.dumps({"info": {"description": f"COCO Karpathy {split}"}, **content}), encoding="utf-8")
        report[split] = {"written": str(target), "images": len(content["images"]),
                         "captions": len(content["annotations"])}
    return report


def prepare_vqav2(questions: str, annotations: str, out: str, images: Optional[str] = None,
                  image_pattern: str = "{subset}/COCO_{subset}_{image_id:012d}.jpg") -> Dict:
    """VQAv2 questions + annotations -> a llava_json training file, one conversation per question."""
    qs = json.loads(Path(questions).read_text(encoding="utf-8"))
    answers = {a["question_id"]: a for a in json.loads(Path(annotations).read_text(encoding="utf-8"))["annotations"]}
    subset = qs.get("data_subtype", "train2014")
    records, missing, unanswered = [], 0, 0
    for q in qs["questions"]:
        annotation = answers.get(q["question_id"])
        if annotation is None:
            unanswered += 1
            continue
        image = image_pattern.format(subset=subset, image_id=q["image_id"])
        if images is not None and not (Path(images) / image).is_file():
            missing += 1
            continue
        records.append({"id": str(q["question_id"]), "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + q["question"] + VQA_SUFFIX},
            {"from": "gpt", "value": annotation["multiple_choice_answer"]},
        ]})
    target = Path(out) / f"vqav2_{subset}_llava.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(records), encoding="utf-8")
    return {"written": str(target), "questions": len(qs["questions"]), "kept": len(records),
            "dropped_missing_image": missing, "dropped_unanswered": unanswered}


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, default_name in (("llava-pretrain", "llava_pretrain_558k.json"),
                                  ("llava-instruct", "llava_v1_5_mix665k.json")):
        p = sub.add_parser(command)
        p.add_argument("--json", required=True, help="LLaVA's JSON file")
        p.add_argument("--images", required=True, help="the folder its image paths are relative to")
        p.add_argument("--out", required=True)
        p.add_argument("--name", default=default_name, help="file name to write under --out")
        p.add_argument("--max-samples", type=int)
    p = sub.add_parser("coco-karpathy")
    p.add_argument("--karpathy", required=True, help="dataset_coco.json")
    p.add_argument("--out", required=True)
    p.add_argument("--images", help="COCO root (train2014/, val2014/): drop images not on disk")
    p = sub.add_parser("vqav2")
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images", help="COCO root (train2014/, val2014/): drop questions whose image is not on disk")
    args = parser.parse_args(argv)
    if args.command in ("llava-pretrain", "llava-instruct"):
        report = prepare_llava(args.json, args.images, args.out, args.name, args.max_samples)
    elif args.command == "coco-karpathy":
        report = prepare_coco_karpathy(args.karpathy, args.out, args.images)
    else:
        report = prepare_vqav2(args.questions, args.annotations, args.out, args.images)
    Path(args.out, f"report_{args.command}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
