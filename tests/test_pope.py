"""POPE: the official evaluation script's numbers (golden), lmms-eval's, negative sampling, errors."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from vlm.core.errors import ConfigError, DataFormatError
from vlm.data import pope
from vlm.data.formats import read_dataset
from vlm.data.pope import ImageObjects, build_pope, build_pope_splits
from vlm.evaluation.pope_metric import (
    POPE_METRICS,
    normalize_answer,
    score_pope,
    score_pope_splits,
)

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "pope_official.json").read_text())
COUNTS = ("tp", "fp", "tn", "fn")

# a toy dataset: "person" most frequent, then "car"; "fork" goes with "knife", "dog" with "cat"
IMAGES = [
    ImageObjects(1, "1.png", ("person", "car", "dog")),
    ImageObjects(2, "2.png", ("person", "car", "cat")),
    ImageObjects(3, "3.png", ("person", "knife", "fork")),
    ImageObjects(4, "4.png", ("dog", "cat", "person")),
    ImageObjects(5, "5.png", ("knife", "fork", "cup")),
    ImageObjects(6, "6.png", ("car", "bus")),
    ImageObjects(7, "7.png", ("knife", "fork", "dog", "cat")),
]


# ---------------------------------------------------------------------------------------------
# the metric: equal to the official evaluate.py's printed numbers


@pytest.mark.parametrize("name", sorted(GOLDEN["sets"]))
def test_scores_equal_the_official_scripts_output(name):
    case = GOLDEN["sets"][name]
    got = score_pope(case["labels"], case["answers"])
    assert {k: got[k] for k in COUNTS} == {k: case["official"][k] for k in COUNTS}
    for k in POPE_METRICS:
        assert got[k] == case["official"][k], k  # exact: the same float operations


def test_answers_are_read_as_the_official_script_reads_them():
    readings = GOLDEN["readings"]
    assert {a: normalize_answer(a) for a in readings} == readings
    assert len(set(readings.values())) == 2 and len(readings) >= 30


def test_per_split_scores_are_each_splits_own_in_percent():
    results, expected = [], {}
    for split, name in zip(pope.POPE_SPLITS, sorted(GOLDEN["sets"])):
        case = GOLDEN["sets"][name]
        results += [{"split": split, "label": la, "answer": an} for la, an in zip(case["labels"], case["answers"])]
        expected.update({f"{split}_{k}": 100.0 * case["official"][k] for k in POPE_METRICS})
    scores = score_pope_splits(results[::-1])  # order inside a split does not matter
    assert scores == pytest.approx(expected, rel=1e-12, abs=0)
    assert list(scores)[0].startswith("adversarial_")  # splits in order of first appearance


def _official_files(folder, labels, answers):
    """The official layouts: a POPE question file and an answer file, JSON lines."""
    folder.mkdir(exist_ok=True)
    questions, results = folder / "questions.jsonl", folder / "answers.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i + 1, "image": f"{i // 6}.png", "text": "Is there a cat "
                                             "in the image?", "label": la}) + "\n" for i, la in enumerate(labels)))
    results.write_text("".join(json.dumps({"question_id": i + 1, "answer": an}) + "\n"
                               for i, an in reversed(list(enumerate(answers)))))  # matched by id, not by line
    return questions, results


@pytest.mark.parametrize("name", sorted(GOLDEN["sets"]))
def test_vlm_score_pope_reads_the_official_files(tmp_path, capsys, name):
    from conftest import run_vlm

    case = GOLDEN["sets"][name]
    questions, results = _official_files(tmp_path, case["labels"], case["answers"])
    code, out, err = run_vlm(["score", "pope", "--annotations", questions, "--results", results], capsys)
    assert code == 0, err
    assert json.loads(out) == {k: case["official"][k] for k in (*COUNTS, *POPE_METRICS)}


def test_vlm_score_pope_names_the_bad_line(tmp_path, capsys):
    from conftest import run_vlm

    questions, results = _official_files(tmp_path, ["yes", "no", "yes"], ["yes", "no", "no"])
    lines = results.read_text().split("\n")
    results.write_text("\n".join([lines[0], '{"question_id": 2}', *lines[2:]]))
    code, _, err = run_vlm(["score", "pope", "--annotations", questions, "--results", results], capsys)
    assert code != 0 and f"{results}:2: missing field 'answer'" in err
    results.write_text("\n".join(lines[:2]))
    code, _, err = run_vlm(["score", "pope", "--annotations", questions, "--results", results], capsys)
    assert code != 0 and f"unanswered questions of {questions}: 1 (first: [1])" in err


def test_no_yes_predicted_scores_zero_where_the_official_script_divides_by_zero():
    got = score_pope(["yes", "no", "no"], ["no", "No.", "not at all"])
    assert (got["precision"], got["recall"], got["f1"], got["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert got["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(DataFormatError, match="2 answers for 3 labels"):
        score_pope(["yes", "no", "no"], ["no", "no"])


def _lmms_eval_pope_utils():
    """lmms-eval's ``tasks/pope/utils.py`` (plain functions) loaded alone: importing it through
    its package would load every lmms-eval task (tens of seconds)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "pope" / "utils.py"
    module_spec = importlib.util.spec_from_file_location("lmms_eval_pope_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_lmms_eval_pope_processing_agrees_on_clean_answers():
    """lmms-eval's pope task compares the lower-cased answer with the label exactly, and its
    yes-ratio counts the labels, not the predictions; on answers that are exactly yes/no its
    accuracy, precision, recall and F1 equal the official script's (and ours)."""
    lmms = _lmms_eval_pope_utils()
    for name, case in GOLDEN["sets"].items():
        answers = [normalize_answer(a).capitalize() if i % 2 else normalize_answer(a)
                   for i, a in enumerate(case["answers"])]
        docs = [{"question_id": i, "answer": la} for i, la in enumerate(case["labels"])]
        per = [lmms.pope_process_results(d, [a]) for d, a in zip(docs, answers)]
        ours = score_pope(case["labels"], answers)
        assert ours == {**ours, **{k: case["official"][k] for k in COUNTS}}  # the answers' own reading
        assert lmms.pope_aggregate_accuracy([p["pope_accuracy"] for p in per]) == pytest.approx(ours["accuracy"])
        assert lmms.pope_aggregate_precision([p["pope_precision"] for p in per]) == pytest.approx(ours["precision"])
        assert lmms.pope_aggregate_recall([p["pope_recall"] for p in per]) == pytest.approx(ours["recall"])
        assert lmms.pope_aggregate_f1_score([p["pope_f1_score"] for p in per]) == pytest.approx(ours["f1"])
        label_yes = case["labels"].count("yes") / len(case["labels"])
        assert lmms.pope_aggregate_yes_ratio([p["pope_yes_ratio"] for p in per]) == pytest.approx(label_yes)


# ---------------------------------------------------------------------------------------------
# building the questions: the three negative samplings


def _per_image(questions):
    by = {}
    for q in questions:
        by.setdefault(q.image_id, []).append(q)
    return by


@pytest.mark.parametrize("split", pope.POPE_SPLITS)
def test_negatives_are_never_in_the_image_and_each_split_is_balanced(split):
    objects = {im.image_id: set(im.objects) for im in IMAGES}
    questions = build_pope(IMAGES, split, num_per_image=3, seed=5)
    for image_id, qs in _per_image(questions).items():
        labels = [q.label for q in qs]
        assert labels == ["yes", "no"] * (len(qs) // 2)  # each positive followed by its negative
        assert all(q.object in objects[image_id] for q in qs if q.label == "yes")
        assert all(q.object not in objects[image_id] for q in qs if q.label == "no")
        assert len({q.object for q in qs}) == len(qs)  # nothing asked twice about one image
    yes = Counter(q.label for q in questions)
    assert yes["yes"] == yes["no"] == sum(min(3, len(im.objects)) for im in IMAGES)
    assert [q.question_id for q in questions] == list(range(1, len(questions) + 1))
    assert questions == build_pope(IMAGES, split, num_per_image=3, seed=5)  # deterministic


def test_popular_negatives_are_the_most_frequent_absent_objects():
    counts = Counter(o for im in IMAGES for o in im.objects)
    for image_id, qs in _per_image(build_pope(IMAGES, "popular", num_per_image=3)).items():
        asked = set()
        for yes, no in zip(qs[::2], qs[1::2]):
            asked.add(yes.object)
            absent = [o for o in counts if o not in {*_objects(image_id), *asked}]
            assert counts[no.object] == max(counts[o] for o in absent)
            asked.add(no.object)
    first = build_pope(IMAGES, "popular")
    assert [q.object for q in first if q.image_id == 5 and q.label == "no"][:2] == ["person", "car"]


def test_adversarial_negatives_are_the_absent_objects_seen_most_with_the_positive():
    together = {}
    for im in IMAGES:
        for o in im.objects:
            together.setdefault(o, Counter()).update(x for x in im.objects if x != o)
    for image_id, qs in _per_image(build_pope(IMAGES, "adversarial", num_per_image=3)).items():
        asked = set()
        for yes, no in zip(qs[::2], qs[1::2]):
            asked.add(yes.object)
            absent = [o for o in together[yes.object] if o not in {*_objects(image_id), *asked}]
            if absent:
                assert together[yes.object][no.object] == max(together[yes.object][o] for o in absent)
            asked.add(no.object)
    # image 1 (person, car, dog): cat is seen twice with person; then bus, car's only partner left;
    # then dog's partners knife and fork tie (cat is taken): by name
    qs = [q for q in build_pope(IMAGES, "adversarial") if q.image_id == 1]
    assert [q.object for q in qs] == ["person", "cat", "car", "bus", "dog", "fork"]


def _objects(image_id):
    return next(set(im.objects) for im in IMAGES if im.image_id == image_id)


def test_random_negatives_follow_the_seed_and_cover_the_absent_objects():
    def negatives(seed):
        return [q.object for q in build_pope(IMAGES, "random", seed=seed) if q.label == "no"]

    assert negatives(0) == negatives(0)
    assert negatives(0) != negatives(1)
    assert len(set(negatives(0) + negatives(1) + negatives(2))) >= 6  # not one fixed order


def test_the_splits_share_their_images_and_a_subset_is_drawn_with_the_seed():
    questions = build_pope_splits(IMAGES, num_images=4, seed=3)
    by_split = {s: {q.image_id for q in questions if q.split == s} for s in pope.POPE_SPLITS}
    assert len(by_split["random"]) == 4 and by_split["random"] == by_split["popular"] == by_split["adversarial"]
    assert questions == build_pope_splits(IMAGES, num_images=4, seed=3)
    with pytest.raises(ConfigError, match="num_images: between 1 and the 7 images"):
        build_pope_splits(IMAGES, num_images=8)
    with pytest.raises(ConfigError, match="splits: each one of"):
        build_pope_splits(IMAGES, ["rnd"])


def test_question_text_uses_an_before_a_vowel_and_leaves_the_template_alone():
    assert pope.question_text("apple") == "Is there an apple in the image?"
    assert pope.question_text("car") == "Is there a car in the image?"


# ---------------------------------------------------------------------------------------------
# the reader: COCO instances or captions -> samples; bad files -> one line naming the place


def _instances(tmp_path, annotations=None, name="instances.json", indent=1):
    data = {"images": [{"id": im.image_id, "file_name": im.file_name} for im in IMAGES],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(sorted({o for im in IMAGES
                                                                                for o in im.objects}))]}
    ids = {c["name"]: c["id"] for c in data["categories"]}
    data["annotations"] = annotations if annotations is not None else [
        {"id": k, "image_id": im.image_id, "category_id": ids[o]}
        for k, (im, o) in enumerate(((im, o) for im in IMAGES for o in im.objects), start=1)]
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=indent))
    return path


def test_the_reader_builds_samples_from_instances_as_the_builder_does(tmp_path):
    path = _instances(tmp_path)
    assert pope.objects_from_instances(path) == IMAGES
    samples = read_dataset("pope", annotations=str(path), image_root=str(tmp_path))
    questions = sorted(build_pope_splits(IMAGES), key=lambda q: q.image_id)  # image by image, stable
    assert [(s.meta["split"], s.meta["question_id"], s.meta["object"], s.turns[-1].content) for s in samples] == \
        [(q.split, q.question_id, q.object, q.label) for q in questions]
    assert [s.meta["split"] for s in samples[:18]] == [s for s in pope.POPE_SPLITS for _ in range(6)]
    assert samples[0].turns[0].content.startswith("<image>\nIs there a person in the image?")
    assert samples[0].images == [str(tmp_path / "1.png")]


def test_objects_from_captions_finds_vocabulary_words_in_order(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 1, "caption": "Two Dogs chase a car."},
                            {"image_id": 1, "caption": "a dog near a person"},
                            {"image_id": 2, "caption": "an empty street"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="no question can be asked"):  # one image, holding every object
        read_dataset("pope", annotations=str(path), source="captions", vocabulary=["person", "dog", "car"])
    data["annotations"].append({"image_id": 2, "caption": "A cat crosses it."})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    assert pope.objects_from_captions(path, ["person", "dog", "car", "cat"]) == \
        [ImageObjects(1, "a.png", ("dog", "car", "person")), ImageObjects(2, "b.png", ("cat",))]
    samples = read_dataset("pope", annotations=str(path), source="captions", vocabulary=["person", "dog", "car",
                                                                                       "cat"], splits="popular")
    # one negative left for image 1; popular ties (each object in one image) break by name
    assert [(s.meta["object"], s.meta["label"]) for s in samples] == [("dog", "yes"), ("cat", "no"),
                                                                      ("cat", "yes"), ("car", "no")]
    with pytest.raises(ConfigError, match="vocabulary: a list of object names"):
        read_dataset("pope", annotations=str(path), source="captions")
    with pytest.raises(ConfigError, match="vocabulary: only with source: captions"):
        read_dataset("pope", annotations=str(path), vocabulary=["dog"])
    with pytest.raises(ConfigError, match="source must be one of"):
        read_dataset("pope", annotations=str(path), source="caption")


@pytest.mark.parametrize("bad, message", [
    ({"id": 1, "image_id": 1}, r"annotations\[1\]: missing field 'category_id'"),
    ({"id": 1, "image_id": 99, "category_id": 1}, r"annotations\[1\]: image_id 99 is not among the file's images"),
    ({"id": 1, "image_id": 1, "category_id": "1"}, r"annotations\[1\]: field 'category_id' has type str"),
    ("oops", r"annotations\[1\]: expected an object, got str"),
])
def test_a_bad_annotation_names_its_file_and_line(tmp_path, bad, message):
    good = {"id": 0, "image_id": 1, "category_id": 1}
    path = _instances(tmp_path, [good, bad])
    lines = path.read_text().split("\n")
    first = lines.index(' "annotations": [')
    line = lines.index("  },", first) + 2  # the second record starts after the first one's end
    with pytest.raises(DataFormatError, match=rf"^{path}:{line}: {message}$"):
        read_dataset("pope", annotations=str(path))


def test_invalid_json_names_its_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1, "file_name": "a.png"},\n  {"id": 2 "file_name": "b.png"}\n]}')
    with pytest.raises(DataFormatError, match=rf"^{path}:3: invalid JSON"):
        read_dataset("pope", annotations=str(path))


# ---------------------------------------------------------------------------------------------
# the scenes data: several shapes per image and the instances POPE is built from


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from vlm.data.synthetic_scenes import generate_scenes

    return generate_scenes(str(tmp_path_factory.mktemp("scenes")), shapes_per_image=(2, 4), num_train=40,
                           num_test=12, image_size=48, seed=3, progress=False)


def test_scenes_have_several_separate_shapes_named_by_their_instances(scenes):
    import numpy as np
    from PIL import Image, ImageDraw

    from vlm.data.synthetic_scenes import SCENE_SHAPES, _draw_kind

    split = scenes["train"]
    attributes = json.loads(Path(split["attributes"]).read_text())
    found = {im.image_id: im for im in pope.objects_from_instances(split["instances"])}
    assert sorted(found) == [a["image_id"] for a in attributes]
    counts = Counter()
    for a in attributes:
        kinds = [o["shape"] for o in a["objects"]]
        assert 2 <= len(kinds) <= 4 and len(set(kinds)) == len(kinds)
        assert found[a["image_id"]].objects == tuple(kinds)
        counts.update(kinds)
        masks = []
        for obj in a["objects"]:
            mask = Image.new("L", (48, 48), 0)
            _draw_kind(ImageDraw.Draw(mask), obj, 48, 255)
            masks.append(np.asarray(mask) > 0)
        assert all(m.any() for m in masks) and not (np.sum(masks, axis=0) > 1).any()  # none touch
        image = np.asarray(Image.open(Path(split["image_root"]) / a["file_name"]), dtype=int)
        assert image.shape == (48, 48, 3)
    assert set(counts) <= set(SCENE_SHAPES) and len(counts) >= 6
    instances = json.loads(Path(split["instances"]).read_text())["annotations"]
    assert all(0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and a_["area"] > 0
               for a_ in instances for x, y, w, h in [a_["bbox"]])


def test_scene_questions_are_balanced_existence_questions_true_to_the_instances(scenes):
    split = scenes["test"]
    found = {im.image_id: set(im.objects) for im in pope.objects_from_instances(split["instances"])}
    samples = read_dataset("vqav2", questions_path=split["questions"], annotations_path=split["annotations"],
                           image_root=split["image_root"], image_pattern=scenes["image_pattern"])
    labels = Counter()
    for s in samples:
        words = s.meta["question"].split(" ")
        assert words[:2] == ["Is", "there"] and words[-3:] == ["in", "the", "image?"]
        assert s.turns[-1].content == ("yes" if words[3] in found[s.meta["image_id"]] else "no")
        labels[s.turns[-1].content] += 1
    assert labels["yes"] == labels["no"] > 0


def test_the_same_seed_writes_the_same_scenes(scenes, tmp_path):
    from vlm.data.synthetic_scenes import generate_scenes

    again = generate_scenes(str(tmp_path), shapes_per_image=(2, 4), num_train=40, num_test=12, image_size=48,
                            seed=3, progress=False)
    for name in ("instances", "questions", "annotations", "captions", "conversations"):
        assert Path(again["train"][name]).read_bytes() == Path(scenes["train"][name]).read_bytes()
    first = sorted(Path(scenes["test"]["image_root"]).iterdir())[0]
    assert (Path(again["test"]["image_root"]) / first.name).read_bytes() == first.read_bytes()


def test_vlm_data_shapes_writes_scenes_only_when_asked(tmp_path, capsys):
    from conftest import run_vlm

    from vlm.data.synthetic import generate_shapes

    args = ["--num-train", "3", "--num-test", "2", "--image-size", "48", "--seed", "4"]
    code, out, err = run_vlm(["data", "shapes", "--out", tmp_path / "one", *args], capsys)
    assert code == 0, err
    assert not list((tmp_path / "one").glob("instances_*.json"))
    reference = generate_shapes(str(tmp_path / "ref"), num_train=3, num_test=2, image_size=48, seed=4,
                                progress=False)
    for name in ("captions", "questions", "annotations", "conversations"):
        assert (tmp_path / "one" / f"{name}_train.json").read_bytes() == Path(reference["train"][name]).read_bytes()
    code, out, err = run_vlm(["data", "shapes", "--out", tmp_path / "many", *args, "--scene-shapes", "2-3"], capsys)
    assert code == 0, err
    paths = json.loads(out)
    assert [len(im.objects) in (2, 3) for im in pope.objects_from_instances(paths["test"]["instances"])] == [True] * 2
    code, _, err = run_vlm(["data", "shapes", "--out", tmp_path / "bad", *args, "--scene-shapes", "3-9"], capsys)
    assert code == 2 and "--scene-shapes: MIN-MAX shapes per image with 1 <= MIN <= MAX <= 5" in err
    code, _, err = run_vlm(["data", "shapes", "--out", tmp_path / "bad", *args, "--scene-shapes", "2-3",
                            "--shapes-per-image", "2"], capsys)
    assert code == 2 and "--scene-shapes and --shapes-per-image 2 both set the shapes per image" in err
    code, out, err = run_vlm(["data", "shapes", "--out", tmp_path / "four", *args, "--shapes-per-image", "4"], capsys)
    assert code == 0, err
    found = pope.objects_from_instances(json.loads(out)["train"]["instances"])
    assert [len(im.objects) for im in found] == [4, 4, 4]


# ---------------------------------------------------------------------------------------------
# the task: an eval of a training stage and `vlm eval --task pope`


def test_pope_as_a_stage_eval_and_as_vlm_eval_task(tmp_path, tokenizer_dir, scenes, capsys):
    from conftest import LLM_ARCH, VISION_ARCH, run_vlm

    from vlm.app.stages import run_stage
    from vlm.app.wiring import load_run_config

    train, test = scenes["train"], scenes["test"]
    evaluation = {"task": "pope", "data": {"format": "pope", "args": {
        "annotations": test["instances"], "image_root": test["image_root"], "num_per_image": 1}},
        "max_new_tokens": 2, "batch_size": 8, "max_samples_in_training": 12}
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "full"},
             "data": [{"format": "pope", "args": {"annotations": train["instances"], "image_root": train["image_root"],
                                                  "num_per_image": 1}}],
             "batch_size": 8, "max_steps": 2, "eval_every": 2, "evals": ["pope"], "keep_best": "pope/adversarial_f1"}
    recipe = {"out_dir": str(tmp_path / "run"),
              "model": {"vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
                        "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)}, "template": "chatml"},
              "stages": {"s": stage}, "evals": {"pope": evaluation}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    final = run_stage(load_run_config(path), "s")
    logged = [json.loads(line) for line in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    during = next(r for r in logged if "eval/pope/adversarial_f1" in r)
    assert {f"eval/pope/{s}_{m}" for s in pope.POPE_SPLITS for m in POPE_METRICS} <= set(during)

    code, out, err = run_vlm(["eval", "--task", "pope", "--checkpoint", final, "--annotations", test["instances"],
                              "--image-root", test["image_root"], "--max-samples", "12", "--out", tmp_path / "ev"],
                             capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])["pope"]
    results = json.loads((tmp_path / "ev" / "pope_results.json").read_text())
    assert len(results) == 12 and {r["split"] for r in results} == set(pope.POPE_SPLITS)  # 2 images, each split
    assert metrics == pytest.approx(score_pope_splits(results), abs=1e-9)  # the answers written are the ones scored
    code, _, err = run_vlm(["eval", "--task", "pope", "--checkpoint", final], capsys)
    assert code == 2 and "vlm eval --task pope needs --checkpoint (a stage output) and --annotations" in err
    code, _, err = run_vlm(["eval", "--task", "retrieval", "--checkpoint", final, "--captions", test["captions"],
                            "--annotations", test["instances"]], capsys)
    assert code == 2 and "--annotations: for --task pope only" in err


def test_prepare_writes_scenes_and_checks_their_keys(tmp_path):
    from vlm.app.recipes import run_prepare
    from vlm.config import check_ranges, load_config

    scenes = {"out": str(tmp_path / "scenes"), "shapes_per_image": "3-3", "num_train": 2, "num_test": 1,
              "image_size": 48}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"prepare": {"scenes": scenes}}))
    run_prepare(load_config(path))
    found = pope.objects_from_instances(tmp_path / "scenes" / "instances_train.json")
    assert [len(im.objects) for im in found] == [3, 3]
    with pytest.raises(ConfigError, match=r"prepare\.scenes\.image_size = 32: must be >= 48"):
        check_ranges(load_config(path, ["prepare.scenes.image_size=32"]))
    with pytest.raises(ConfigError, match=r"^prepare\.scenes\.shapes_per_image: MIN-MAX .* got '2-7'"):
        run_prepare(load_config(path, ["prepare.scenes.shapes_per_image=2-7"]))
