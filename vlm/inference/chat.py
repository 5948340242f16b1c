"""Chat with a trained model about one image, from the command line or Python."""

from __future__ import annotations

from typing import List, Optional

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.types import Sample, Turn, marking_images_with
from vlm.modeling.processing import build_processor


def answer(model, processor, image: str, turns: List[Turn], max_new_tokens: int = 64,
           temperature: float = 0.0) -> str:
    """The model's reply to a conversation whose first user turn refers to ``image``."""
    from vlm.inference.generation import generate_answers

    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    with marking_images_with(processor.image_token):
        sample = Sample(id="chat", turns=turns, images=[image])
    return generate_answers(model, processor, [sample], batch_size=1, max_new_tokens=max_new_tokens,
                            desc="chat", **sampling)[0]


def task_prompt(question: str, model_cfg, enabled: bool = True) -> str:
    """``question`` in the prompt format the model was trained with: ``model.task_prompt_suffix``
    appended (when set, ``enabled`` and not already there)."""
    suffix = model_cfg.get("task_prompt_suffix") if enabled else None
    if not suffix or question.endswith(suffix):
        return question
    return question + suffix


def chat(checkpoint: str, image: str, prompt: Optional[str] = None, max_new_tokens: int = 64,
         temperature: float = 0.0, template: Optional[str] = None, trust_remote_code: bool = False,
         use_task_prompt: bool = True) -> None:
    """Answer ``prompt`` about ``image``, or loop over questions read from stdin. Each question
    gets the checkpoint's ``task_prompt_suffix`` unless ``use_task_prompt`` is False."""
    model, tokenizer, model_cfg = load_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    processor = build_processor(model, tokenizer, model_cfg, template)
    turns: List[Turn] = []
    questions = [prompt] if prompt else None
    while True:
        if questions is not None:
            if not questions:
                return
            question = questions.pop(0)
        else:
            try:
                question = input("you> ").strip()
            except EOFError:
                return
            if question in ("", "exit", "quit"):
                return
        question = task_prompt(question, model_cfg, use_task_prompt)
        content = f"{processor.image_token}\n{question}" if not turns else question
        turns.append(Turn("user", content))
        reply = answer(model, processor, image, turns, max_new_tokens, temperature)
        turns.append(Turn("assistant", reply))
        print(reply if prompt else f"vlm> {reply}", flush=True)


def loglikelihood(model, processor, image, turns: List[Turn], continuation: str) -> float:
    """Sum of the log-probs of ``continuation`` as the reply to ``turns`` about ``image`` (a path
    or a PIL image)."""
    from vlm.inference.likelihood import loglikelihoods

    sample = Sample(id="chat", turns=turns, images=[image] if image is not None else [])
    return loglikelihoods(model, processor, [sample], [continuation])[0][0]
