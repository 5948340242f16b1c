"""Preference tuning: the pair reader and its layouts, pair batches, the dpo / simpo objectives."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, run_config
from preference_data import write_vqa_pairs

import vlm.app.stages
from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.formats import read_dataset
from vlm.data.pairs import PairCollator, PairDataset


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    return str(path)


def _record_line(path, n):
    """The line record ``n`` of a JSON list written by :func:`_write` starts on."""
    return [i for i, line in enumerate(open(path).read().split("\n"), start=1) if line == " {"][n]


GOOD = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"}],
        "chosen": "red", "rejected": "blue"}


# ------------------------------------------------------------------------------------- reader

def test_native_pairs_read_with_prompt_turns_and_answers(tmp_path):
    path = _write(tmp_path / "p.json", [GOOD, {**GOOD, "id": "b", "chosen": "green"}])
    samples = read_dataset("preference_json", path=path, image_root=str(tmp_path))
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].turns[-1].role == "user" and samples[0].images == [str(tmp_path / "x.png")]
    assert (samples[1].meta["chosen"], samples[1].meta["rejected"]) == ("green", "blue")
    assert samples[1].meta["source"] == f"{path}:{_record_line(path, 1)}"  # the line its record starts on


@pytest.mark.parametrize("change, message", [
    ({"chosen": None}, "missing field 'chosen'"),
    ({"rejected": "  "}, "field 'rejected' is empty"),
    ({"rejected": "red"}, "fields 'chosen' and 'rejected' are the same answer"),
    ({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "must end with a user turn"),
])
def test_reader_errors_name_the_record(tmp_path, change, message):
    bad = {**GOOD, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    for jsonl in (False, True):
        path = _write(tmp_path / ("p.jsonl" if jsonl else "p.json"), [GOOD, bad], jsonl=jsonl)
        with pytest.raises(DataFormatError) as err:
            read_dataset("preference_json", path=path, image_root=str(tmp_path))
        line = 2 if jsonl else _record_line(path, 1)
        assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_layouts_map_to_pairs(tmp_path):
    rlaif = _write(tmp_path / "r.jsonl", [{"idx": "7", "image_path": "i.png", "question": "Describe.",
                                           "chosen": "a cat", "rejected": "a dog", "ds_name": "x"}], jsonl=True)
    [s] = read_dataset("preference_json", path=rlaif, layout="rlaif_v", image_root=str(tmp_path))
    assert (s.id, s.turns[0].content, s.meta["chosen"], s.images) == ("7", "<image>\nDescribe.", "a cat",
                                                                        [str(tmp_path / "i.png")])
    nxt = _write(tmp_path / "n.json", [{"id": 3, "image": "i.png", "prompt": "<image>\nWhat?", "chosen": "x",
                                        "rejected": "y"}])
    [s] = read_dataset("preference_json", path=nxt, layout="llava_next", image_root=str(tmp_path))
    assert s.turns[0].content == "<image>\nWhat?" and s.meta["rejected"] == "y"

    def completion(text, *ratings):
        return {"model": "m", "response": text,
                "annotations": {k: {"Rating": str(r), "Rationale": ""} for k, r in zip("ABC", ratings)}}
    vlf = _write(tmp_path / "v.jsonl", [
        {"id": "q1", "img_path": "i.png", "prompt": "Q?", "models": ["m"],
         "completions": [completion("ok", 3, 3, 3), completion("best", 5, 4, 5), completion("bad", 1, 2, 1)]},
        {"id": "q2", "img_path": "i.png", "prompt": "Q?", "models": ["m"],
         "completions": [completion("same", 3, 3, 3), completion("alike", 3, 3, 3)]}], jsonl=True)
    [s] = read_dataset("preference_json", path=vlf, layout="vlfeedback", image_root=str(tmp_path))
    assert (s.id, s.meta["chosen"], s.meta["rejected"]) == ("q1", "best", "bad")
    with pytest.raises(ConfigError, match="unknown preference layout 'rlaifv'"):
        read_dataset("preference_json", path=vlf, layout="rlaifv")


def test_hf_dataset_columns_and_embedded_images(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8), (255, 0, 0))
    table = datasets.Dataset.from_dict({"idx": ["1"], "image": [image], "question": ["Color?"],
                                        "chosen": ["red"], "rejected": ["blue"]},
                                       features=datasets.Features({"idx": datasets.Value("string"),
                                                                   "image": datasets.Image(),
                                                                   "question": datasets.Value("string"),
                                                                   "chosen": datasets.Value("string"),
                                                                   "rejected": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataFormatError, match=r"hf#0: field 'image' holds an embedded image; set .*extract_images_to"):
        read_dataset("preference_json", hf_dataset=str(tmp_path / "hf"), layout="rlaif_v")
    for source in ("hf", "t.parquet"):
        [s] = read_dataset("preference_json", hf_dataset=str(tmp_path / source), layout="rlaif_v",
                           extract_images_to=str(tmp_path / "img"))
        assert s.meta["chosen"] == "red" and Image.open(s.images[0]).getpixel((0, 0)) == (255, 0, 0)


# -------------------------------------------------------------------------------- pair batches

def test_pairs_batch_chosen_then_rejected_and_encode_each_image_once(tmp_path, tiny_model, model_config,
                                                                     shapes_data, tokenizer):
    from vlm.modeling.processing import build_processor

    path = write_vqa_pairs(shapes_data["train"], tmp_path / "pairs.json", limit=3)
    samples = read_dataset("preference_json", path=str(path), image_root=shapes_data["train"]["image_root"],
                           image_token="<image>")
    processor = build_processor(tiny_model, tokenizer, model_config, "plain", 128)
    dataset = PairDataset(samples, processor, progress=False)
    batch = PairCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch.input_ids.shape[0] == 6 and batch.images.shape[0] == 3 and batch.num_samples == 3
    answers = [tokenizer.decode(row[row != -100]) for row in batch.labels]
    assert [a.strip() for a in answers[:3]] == [s.meta["chosen"] for s in samples]
    assert [a.strip() for a in answers[3:]] == [s.meta["rejected"] for s in samples]
    calls = []
    hook = tiny_model.vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = tiny_model(**batch.model_inputs(with_labels=False))
    hook.remove()
    assert calls == [3] and out.logits.shape[0] == 6
    # the same rows with each image given twice: the same logits
    twice = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       pixel_values=torch.cat([batch.images, batch.images]),
                       instructions=batch.instructions * 2).logits
    torch.testing.assert_close(out.logits, twice)


# ------------------------------------------------------------------------------ TRL parity

def _pair_batch(tmp_path, model, model_config, shapes_data, tokenizer, limit=3):
    from vlm.modeling.processing import build_processor

    path = write_vqa_pairs(shapes_data["train"], tmp_path / "pairs.json", limit=limit)
    samples = read_dataset("preference_json", path=str(path), image_root=shapes_data["train"]["image_root"],
                           image_token="<image>")
    processor = build_processor(model, tokenizer, model_config, "plain", 128)
    return PairDataset(samples, processor, progress=False), PairCollator(tokenizer.pad_token_id)


class _TRLStub:
    """What ``DPOTrainer._compute_loss`` reads of its trainer, for one process, without building one."""

    def __init__(self, model, ref_model, beta, loss_type, label_smoothing=0.0):
        import types
        from collections import defaultdict

        self.model, self.ref_model, self.beta, self.label_smoothing = model, ref_model, beta, label_smoothing
        self.loss_types, self.loss_weights, self.ld_alpha, self.f_divergence_type = [loss_type], [1.0], None, "reverse_kl"
        self.precompute_ref_logps, self.use_weighting, self.aux_loss_enabled = False, False, False
        self._metrics, self._total_train_tokens, self._tp_size = {"train": defaultdict(list)}, 0, 1
        self.args = types.SimpleNamespace(gradient_checkpointing_kwargs=None)
        self.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                                 gather_for_metrics=lambda t: t)


def _hf_grads(llava):
    """transformers LLaVA gradients under vlm's parameter names."""
    names = {"model.multi_modal_projector.linear_1.": "connector.proj.0.",
             "model.multi_modal_projector.linear_2.": "connector.proj.2.",
             "model.vision_tower.": "vision.model.", "model.language_model.": "llm.model.", "lm_head.": "llm.lm_head."}
    grads = {}
    for name, param in llava.named_parameters():
        if param.grad is not None:
            prefix = next(p for p in names if name.startswith(p))
            grads[names[prefix] + name[len(prefix):]] = param.grad
    return grads


@pytest.mark.parametrize("loss_type, label_smoothing, pairs", [("sigmoid", 0.0, 3), ("ipo", 0.0, 3),
                                                               ("sigmoid", 0.2, 1)])
def test_dpo_loss_rewards_and_gradients_equal_trl(tmp_path, model_config, shapes_data, tokenizer, loss_type,
                                                 label_smoothing, pairs):
    """vlm's dpo (reference log-probabilities precomputed from the starting weights) against TRL's
    DPOTrainer loss on the same model exported to transformers' LLaVA, the same pairs, fp32.
    TRL 1.16's sigmoid has no label smoothing: the conservative loss is its ``aot`` on one pair
    (sorting one pair changes nothing)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from vlm.interop.hf_llava import to_hf_llava
    from vlm.training.objectives import OBJECTIVES, ObjectiveContext
    from vlm.training.objectives.preference import precomputed_reference

    start = build_tiny_model(model_config, tokenizer)
    policy = build_tiny_model(model_config, tokenizer)
    torch.manual_seed(5)
    with torch.no_grad():  # the policy has moved away from its starting weights
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    dataset, collate = _pair_batch(tmp_path, start, model_config, shapes_data, tokenizer, limit=pairs)
    dataset.reference = precomputed_reference(start, dataset, collate, 2, tmp_path / "ref.pt", True)
    batch = collate([dataset[i] for i in range(len(dataset))])
    options = {"beta": 0.3, "loss_type": loss_type, "label_smoothing": label_smoothing, "precompute_reference": True}
    objective = OBJECTIVES.get("dpo").build(options, ObjectiveContext(policy, tokenizer))
    policy.train()
    out = objective(policy, batch)
    out.loss.backward()

    hf_policy, hf_ref = to_hf_llava(policy).train(), to_hf_llava(start)
    add_fused_lm_head(hf_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_ref)
    trl_loss_type = "aot" if label_smoothing else loss_type
    stub = _TRLStub(hf_policy, hf_ref, 0.3, trl_loss_type, label_smoothing)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": (batch.labels != -100).long(),
              "pixel_values": torch.cat([batch.images, batch.images])}  # TRL: one image per row
    trl_loss = DPOTrainer._compute_loss(stub, hf_policy, inputs, False)
    trl_loss.backward()

    assert out.losses["rewards/chosen"].abs() > 1e-3  # the policy is not its reference
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-5, rtol=1e-5)
    logged = stub._metrics["train"]
    for ours, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")):
        assert abs(out.losses[ours].item() - logged[theirs][0]) < 1e-5, ours
    theirs = _hf_grads(hf_policy)
    ours = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
    assert set(ours) <= set(theirs) and len(ours) > 20
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(grad.abs().max() > 1e-3 for grad in ours.values())


# ------------------------------------------------------------------ the LoRA reference

def _parameters_in_memory() -> int:
    """Elements of every live ``nn.Parameter`` of the process (a second model copy would add its own)."""
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))


def test_lora_reference_is_the_model_with_its_adapters_disabled_not_a_second_model(tmp_path, model_config,
                                                                                   shapes_data, tokenizer):
    from conftest import lora_instruct_model

    from vlm.training.objectives import OBJECTIVES, ObjectiveContext
    from vlm.training.objectives.preference import answer_logps

    base = build_tiny_model(model_config, tokenizer)
    dataset, collate = _pair_batch(tmp_path, base, model_config, shapes_data, tokenizer)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        starting, _ = answer_logps(base, batch)
    del base
    model = lora_instruct_model(build_tiny_model(model_config, tokenizer))  # the same base weights, + LoRA
    before = _parameters_in_memory()
    objective = OBJECTIVES.get("dpo").build({"beta": 0.1}, ObjectiveContext(model, tokenizer))
    model.train()
    out = objective(model, batch)
    out.loss.backward()
    assert _parameters_in_memory() == before and not list(objective.parameters())
    reference = objective.reference_logps(model, batch)
    torch.testing.assert_close(reference, starting, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        policy, _ = answer_logps(model, batch)  # the adapters are back on after the reference
    assert (policy - reference).abs().max() > 1e-3
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n} == {
        "connector"}  # lora_instruct_model leaves the connector trainable


def test_dpo_without_lora_needs_precomputed_reference(tmp_path, tokenizer_dir, shapes_data):
    with pytest.raises(ConfigError, match=r"^stages\.dpo\.train: dpo's reference .*precompute_reference"):
        run_config(tmp_path, tokenizer_dir, {"dpo": _pref_stage(tmp_path, shapes_data, "dpo", connector="full")})
    with pytest.raises(ConfigError, match=r"^stages\.dpo\.objective_options\.betta: "):
        run_config(tmp_path, tokenizer_dir, {"dpo": _pref_stage(tmp_path, shapes_data, "dpo", betta=0.1)})
    with pytest.raises(ConfigError, match=r"^stages\.dpo\.objective_options\.loss_type: unknown 'hinge'"):
        run_config(tmp_path, tokenizer_dir, {"dpo": _pref_stage(tmp_path, shapes_data, "dpo", loss_type="hinge")})


# ----------------------------------------------------------------------- training stages

@pytest.fixture(scope="module")
def base_final(tmp_path_factory, tokenizer_dir, shapes_data):
    """A stage output whose LLM trained fully (one step): what a LoRA stage may start from."""
    root = tmp_path_factory.mktemp("prefs_base")
    split = shapes_data["train"]
    base = {"train": {"vision": "frozen", "connector": "full", "llm": "full"},
            "data": [{"format": "coco_captions", "args": {"path": split["captions"], "image_root": split["image_root"]},
                      "max_samples": 4}], "batch_size": 4, "max_steps": 1, "warmup_ratio": 0.0}
    return vlm.app.stages.run_stage(run_config(root, tokenizer_dir, {"base": base}), "base")


def _pref_stage(tmp_path, shapes_data, objective, connector="frozen", llm="lora", steps=16, init_from=None,
                lr=5e-3, **options):
    split = shapes_data["train"]
    pairs = write_vqa_pairs(split, tmp_path / "train_pairs.json", limit=8)
    return {"objective": objective, "objective_options": options, "init_from": init_from,
            "train": {"vision": "frozen", "connector": connector, "llm": llm},
            "data": [{"format": "preference_json", "args": {"path": str(pairs), "image_root": split["image_root"]}}],
            "learning_rate": lr, "batch_size": 4, "max_steps": steps, "log_every": 4, "warmup_ratio": 0.0,
            "seed": 0}


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("objective, connector, llm, lr, options", [
    ("dpo", "frozen", "lora", 3e-2, {"beta": 0.5}),
    pytest.param("dpo", "full", "frozen", 1e-2, {"beta": 0.5, "precompute_reference": True}, marks=pytest.mark.slow),
    pytest.param("simpo", "frozen", "lora", 3e-2, {}, marks=pytest.mark.slow),
])
def test_a_preference_stage_learns_to_prefer_the_chosen_answers(tmp_path, tokenizer_dir, shapes_data, base_final,
                                                                objective, connector, llm, lr, options):
    """8 pairs, 16 steps of 4 (8 epochs): the loss falls, the margin widens, the chosen answers win."""
    stage = _pref_stage(tmp_path, shapes_data, objective, connector, llm, init_from=str(base_final), lr=lr,
                        **options)
    cfg = run_config(tmp_path, tokenizer_dir, {"prefs": stage})
    final = vlm.app.stages.run_stage(cfg, "prefs")
    records = _records(tmp_path / "run" / "prefs")
    first, last = records[0], records[-1]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(first)
    assert last["loss"] < first["loss"] - 0.05, (first, last)
    assert last["rewards/margin"] > first["rewards/margin"] + 0.1 and last["rewards/accuracy"] >= 0.75
    assert (final / "manifest.json").exists()
    reference = tmp_path / "run" / "prefs" / "reference_logps.pt"
    assert reference.exists() == bool(options.get("precompute_reference"))


def test_precomputed_reference_is_kept_for_a_resume_and_recomputed_for_other_pairs(tmp_path, model_config,
                                                                                 shapes_data, tokenizer):
    from vlm.training.objectives.preference import answer_logps, precomputed_reference

    start = build_tiny_model(model_config, tokenizer)
    dataset, collate = _pair_batch(tmp_path, start, model_config, shapes_data, tokenizer, limit=3)
    path = tmp_path / "stage" / "reference_logps.pt"
    first = precomputed_reference(start, dataset, collate, 2, path, True)
    with torch.no_grad():
        logps, _ = answer_logps(start, collate([dataset[i] for i in range(3)]))
    torch.testing.assert_close(first, torch.stack([logps[:3], logps[3:]], dim=1))
    moved = build_tiny_model(model_config, tokenizer, seed=1)  # a resume's weights have moved on
    torch.testing.assert_close(precomputed_reference(moved, dataset, collate, 2, path, True), first)
    fewer, _ = _pair_batch(tmp_path, start, model_config, shapes_data, tokenizer, limit=2)
    other = precomputed_reference(moved, fewer, collate, 2, path, True)  # other pairs: computed again
    assert other.shape == (2, 2) and not torch.allclose(other, first[:2])


# ----------------------------------------------------------------------- vlm prefs generate

def test_the_vqa_judge_scores_answers_and_the_pair_is_the_best_and_a_worse_one():
    from vlm.data.types import Sample
    from vlm.evaluation.judges import JUDGES
    from vlm.evaluation.preference_pairs import choose_pair

    judge = JUDGES.get("vqa_accuracy").build(None, None)
    sample = Sample(id="1", turns=[], meta={"answers": ["red"] * 7 + ["blue"] * 3})
    assert judge.score(sample, ["red", "Blue", "green"]) == [1.0, pytest.approx(0.9), 0.0]
    with pytest.raises(DataFormatError, match="needs the reference answers"):
        judge.score(Sample(id="2", turns=[]), ["red"])
    assert choose_pair(["a", "b", "c", "b"], [0.5, 1.0, 0.0, 1.0]) == (1, 2)
    assert choose_pair(["a", "a "], [1.0, 0.0]) is None  # the same answer
    assert choose_pair(["a", "b"], [1.0, 1.0]) is None  # nothing worse


def _prefs_config(tmp_path, tokenizer_dir, shapes_data):
    import yaml
    from conftest import LLM_ARCH, VISION_ARCH

    split = shapes_data["train"]
    recipe = {"out_dir": str(tmp_path / "run"), "plugins": ["answer_length_judge"],
              "model": {"vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
                        "connector": {"name": "mlp2x_gelu"},
                        "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)}, "template": "plain"},
              "stages": {},
              "evals": {"vqa": {"task": "vqa", "max_new_tokens": 6,
                                "data": {"format": "vqav2", "max_samples": 4,
                                         "args": {"questions_path": split["questions"],
                                                  "annotations_path": split["annotations"],
                                                  "image_root": split["image_root"],
                                                  "image_pattern": "{image_id:012d}.png"}}}}}
    path = tmp_path / "prefs.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_prefs_generate_with_a_plugin_judge_writes_pairs_and_resumes(tmp_path, tokenizer_dir, shapes_data,
                                                                    base_final, capsys, monkeypatch):
    from pathlib import Path

    from conftest import run_vlm

    import vlm.evaluation.preference_pairs as pp

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "plugins"))
    config = _prefs_config(tmp_path, tokenizer_dir, shapes_data)
    argv = ["prefs", "generate", base_final, config, "--judge", "answer_length", "--n", "4", "--batch-size", "2",
            "--temperature", "1.5", "--top-p", "1.0"]
    code, out, err = run_vlm([*argv, "--out", tmp_path / "whole.json"], capsys)
    assert code == 0, err
    counts = json.loads(out.strip().splitlines()[-1])
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert counts["pairs"] == len(whole) >= 2 and counts["pairs"] + counts["skipped"] == 4
    for pair in whole:
        assert pair["scores"]["chosen"] > pair["scores"]["rejected"]
        assert len(pair["chosen"].strip()) == pair["scores"]["chosen"]
    samples = read_dataset("preference_json", path=str(tmp_path / "whole.json"))  # the pairs read back
    assert [s.meta["chosen"] for s in samples] == [p["chosen"] for p in whole]
    assert samples[0].turns[-1].role == "user" and samples[0].images

    original, calls = pp.generate_answers, []

    def interrupted(*args, **kwargs):  # the run stops while sampling its second chunk
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pp, "generate_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_vlm([*argv, "--out", tmp_path / "again.json"], capsys)
    assert (tmp_path / "again.json.partial").exists() and not (tmp_path / "again.json").exists()
    monkeypatch.setattr(pp, "generate_answers", original)
    code, out, err = run_vlm([*argv, "--out", tmp_path / "again.json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["resumed"] == 2
    assert json.loads((tmp_path / "again.json").read_text()) == whole  # the same pairs as without a stop
    code, _, err = run_vlm([*argv[:4], "--judge", "answer_lenght", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "did you mean 'answer_length'" in err
    code, _, err = run_vlm([*argv, "--temperature", "0", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "--temperature must be > 0" in err


# ----------------------------------------------------------------------- a stage's generate_pairs

def _generating_recipe(tmp_path, tokenizer_dir, shapes_data, init_from, **block):
    """The prefs test recipe plus a dpo stage that first writes its pairs (``block`` over the defaults)."""
    import yaml

    recipe = yaml.safe_load(_prefs_config(tmp_path, tokenizer_dir, shapes_data).read_text())
    pairs = str(tmp_path / "run" / "pairs" / "train_pairs.json")
    recipe["stages"]["dpo"] = {
        "init_from": str(init_from), "objective": "dpo", "objective_options": {"beta": 0.5},
        "generate_pairs": {"out": pairs, "eval": "vqa", "judge": "answer_length", "n": 4, "temperature": 1.5,
                           "top_p": 1.0, "batch_size": 2, **block},
        "train": {"vision": "frozen", "connector": "frozen", "llm": "lora"},
        "data": [{"format": "preference_json", "args": {"path": "${stages.dpo.generate_pairs.out}"}}],
        "learning_rate": 1e-2, "batch_size": 2, "max_steps": 2, "warmup_ratio": 0.0, "seed": 0}
    path = tmp_path / "generating.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_stage_writes_pairs_from_its_start_and_trains_on_them(tmp_path, tokenizer_dir, shapes_data, base_final,
                                                                monkeypatch):
    """generate_pairs samples the stage's init_from (the same function as ``vlm prefs generate``),
    the stage then reads those pairs; a complete pairs file is kept on the next run."""
    from pathlib import Path

    import vlm.app.prefs
    from vlm.app.wiring import load_run_config

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "plugins"))
    cfg = load_run_config(_generating_recipe(tmp_path, tokenizer_dir, shapes_data, base_final))
    calls = []
    original = vlm.app.prefs.write_pairs

    def recorded(cfg, checkpoint, *args):
        calls.append(checkpoint)
        return original(cfg, checkpoint, *args)

    monkeypatch.setattr(vlm.app.prefs, "write_pairs", recorded)
    final = vlm.app.stages.run_stage(cfg, "dpo")
    assert calls == [str(base_final)] and (final / "manifest.json").exists()
    out = tmp_path / "run" / "pairs" / "train_pairs.json"
    pairs = json.loads(out.read_text())
    assert len(pairs) >= 2 and all(p["scores"]["chosen"] > p["scores"]["rejected"] for p in pairs)
    assert not out.with_name(out.name + ".partial").exists()
    records = _records(tmp_path / "run" / "dpo")
    assert records and {"rewards/margin", "rewards/accuracy"} <= set(records[0])

    counts = vlm.app.prefs.stage_pairs(cfg, "dpo")  # complete: kept, nothing sampled again
    assert calls == [str(base_final)] and counts == {"out": str(out), "pairs": len(pairs), "kept": True}
    run = vlm.app.stages.build_stage(cfg, "dpo", out_dir=tmp_path / "again")
    assert [s.meta["chosen"] for s, _, _ in run.dataset.entries] == [p["chosen"] for p in pairs]


@pytest.mark.parametrize("block, message", [
    ({"judge": "answer_lenght"}, "stages.dpo.generate_pairs.judge: unknown judge 'answer_lenght' (did you mean "
                                 "'answer_length'?)"),
    ({"eval": "vqa2"}, "stages.dpo.generate_pairs.eval: the config has no evals entry 'vqa2' (did you mean 'vqa'?)"),
    ({"out": None}, "stages.dpo.generate_pairs.out: required"),
    ({"temperature": 0}, "stages.dpo.generate_pairs.temperature = 0.0: must be > 0"),
    ({"top_p": 1.5}, "stages.dpo.generate_pairs.top_p = 1.5: must be in (0, 1]"),
    ({"temprature": 1.0}, "invalid config key 'stages.dpo.generate_pairs.temprature'"),
])
def test_a_bad_generate_pairs_block_is_refused_at_load_naming_the_key(tmp_path, tokenizer_dir, shapes_data, block,
                                                                      message, monkeypatch):
    from pathlib import Path

    from vlm.app.wiring import load_run_config

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "plugins"))
    path = _generating_recipe(tmp_path, tokenizer_dir, shapes_data, tmp_path / "start", **block)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------- two processes: DDP, FSDP, resume

@pytest.mark.slow  # four 2-process launches
@pytest.mark.parametrize("connector, options", [("frozen", {}), ("full", {"precompute_reference": True})])
def test_dpo_under_ddp_and_fsdp_survives_sigkill_and_resumes_bit_identically(tmp_path, tokenizer_dir, shapes_data,
                                                                            connector, options):
    from safetensors.torch import load_file
    from test_distributed import WORKER, launch, torchrun

    split = shapes_data["train"]
    pairs = write_vqa_pairs(split, tmp_path / "pairs.json", limit=12)
    base = {"train": {"vision": "frozen", "connector": "full", "llm": "full"},
            "data": [{"format": "coco_captions", "args": {"path": split["captions"], "image_root": split["image_root"]},
                      "max_samples": 4}], "batch_size": 4, "max_steps": 1, "warmup_ratio": 0.0}
    dpo = {"init_from": str(tmp_path / "run" / "base" / "final"), "objective": "dpo",
           "objective_options": {"beta": 0.5, **options},
           "train": {"vision": "frozen", "connector": connector, "llm": "lora"}, "lora": {"r": 4, "alpha": 8},
           "data": [{"format": "preference_json", "args": {"path": str(pairs), "image_root": split["image_root"]}}],
           "learning_rate": 1e-2, "batch_size": 2, "max_steps": 6, "save_every": 3, "log_every": 1,
           "warmup_ratio": 0.0}
    cfg = run_config(tmp_path, tokenizer_dir, {"base": base, "p": dpo})
    vlm.app.stages.run_stage(cfg, "base")
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    fsdp = ["stages.p.strategy=fsdp"]

    def weights(final):
        out = {f"llm.{k}": v for k, v in load_file(str(final / "llm_adapter" / "adapter_model.safetensors")).items()}
        if connector == "full":
            out.update({f"connector.{k}": v for k, v in load_file(str(final / "connector.safetensors")).items()})
        return out

    done = launch(torchrun(WORKER, "train", config, "p", str(tmp_path / "ddp"), "--then", str(tmp_path / "fsdp"), *fsdp))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = launch(torchrun(WORKER, "train", config, "p", str(tmp_path / "resumed"), "--kill-after-step", "4", *fsdp))
    assert killed.returncode != 0
    out = tmp_path / "resumed" / "p"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000003"] and not (out / "final").exists()
    resumed = launch(torchrun("-m", "vlm", "train", config, *fsdp, "--stage", "p", "--out", str(tmp_path / "resumed"),
                              "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    ddp_w, fsdp_w, resumed_w = (weights(tmp_path / run / "p" / "final") for run in ("ddp", "fsdp", "resumed"))
    assert ddp_w.keys() == fsdp_w.keys() == resumed_w.keys() and any("lora_B" in k for k in ddp_w)
    for key in ddp_w:
        assert torch.equal(fsdp_w[key], resumed_w[key]), key
        assert torch.allclose(fsdp_w[key], ddp_w[key], atol=1e-5, rtol=0), (key, (fsdp_w[key] - ddp_w[key]).abs().max())
    assert any(v.abs().max() > 0 for k, v in fsdp_w.items() if "lora_B" in k)  # the adapters trained
    losses = [r["loss"] for r in _records(tmp_path / "fsdp" / "p")]
    assert [r["loss"] for r in _records(out)] == losses and len(losses) == 6
    assert [r["rewards/margin"] for r in _records(out)] == [r["rewards/margin"] for r in _records(tmp_path / "fsdp" / "p")]


def test_the_dpo_demo_recipe_validates_and_passes_preflight(tmp_path):
    """configs/demo/dpo_shapes.yaml: instruct, then dpo writing pairs from instruct's answers to
    training-split questions; its preflight counts the prepared scenes and the pairs as planned."""
    from pathlib import Path

    from vlm.app.preflight import preflight
    from vlm.app.prefs import pairs_checkpoint
    from vlm.app.wiring import load_run_config

    path = Path(__file__).resolve().parent.parent / "configs" / "demo" / "dpo_shapes.yaml"
    cfg = load_run_config(path, [f"out_dir={tmp_path}"])
    names = list(cfg.stages)
    assert names.index("instruct") == names.index("dpo") - 1 and cfg.stages.dpo.objective == "dpo"
    block = cfg.stages.dpo.generate_pairs
    assert pairs_checkpoint(cfg.stages.dpo) == f"{tmp_path}/instruct/final" and block.judge == "vqa_accuracy"
    assert "_train.json" in cfg.evals[block.eval].data.args.questions_path
    assert cfg.stages.dpo.data[0].args.path == block.out and cfg.stages.dpo.train.llm.value == "lora"
    assert {"pope", "vqa"} <= set(cfg.evals) and cfg.evals.pope.task == "pope"
    preflight(cfg, names, whole_recipe=True)  # nothing exists yet: prepare and generate_pairs write it
