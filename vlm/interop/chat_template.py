"""vlm's chat templates as Jinja, for exported folders (transformers processors, vLLM).

``jinja_chat_template(name, tokenizer, system_prompt, image_token)`` writes a Jinja
``chat_template`` that renders a conversation to exactly the text vlm's template of that name
builds (``plain``, ``vicuna_v1``, ``chatml``, ``blip2_qa``, ``instructblip``, or ``tokenizer``:
the tokenizer's own template), bos token included where vlm adds one. Message contents may be
strings (``"<image>\\nQ"``) or OpenAI-style lists of parts: ``{"type": "image"}`` (or
``image_url``) becomes ``<image>\\n``, ``{"type": "text", "text": T}`` becomes ``T``, in order, as
``vlm chat`` writes an image question; with ``video_token``, ``{"type": "video"}`` becomes
``<video>\n`` likewise (LLaVA-OneVision's processor expands it).
"""

from __future__ import annotations

import json
from typing import Optional

from vlm.core.errors import TemplateError
from vlm.data.templates import TEMPLATES, VICUNA_SYSTEM


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON's escapes are Jinja's)."""
    return json.dumps(text)


def _content_macro(image_text: str, images_first: bool = False, video_text: Optional[str] = None) -> str:
    image = "{{ " + _lit(image_text + "\n") + " }}"
    kinds = "['image', 'image_url'" + (", 'video'" if video_text is not None else "") + "]"
    if video_text is not None:  # a video part writes its own marker
        image = ("{%- if part['type'] == 'video' -%}{{ " + _lit(video_text + "\n") + " }}{%- else -%}" + image +
                 "{%- endif -%}")
    if images_first:  # model.image_placement "first": a message's images (and videos), then its text
        parts = ("{%- for part in content if part['type'] in " + kinds + " -%}" + image + "{%- endfor -%}"
                 "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}")
    else:
        parts = ("{%- for part in content -%}"
                 "{%- if part['type'] in " + kinds + " -%}" + image +
                 "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
                 "{%- endif -%}{%- endfor -%}")
    return ("{%- macro vlm_content(content) -%}"
            "{%- if content is string -%}{{ content }}"
            "{%- else -%}" + parts + "{%- endif -%}"
            "{%- endmacro -%}")


def _plain(image_token: str, bos: str) -> str:
    # a user turn gives only its image markers; an assistant turn its text and a newline
    return (bos +
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}"
            "{%- set text = vlm_content(m['content']) -%}"
            "{{ " + _lit(image_token) + " * (text.split(" + _lit(image_token) + ")|length - 1) }}"
            "{%- elif m['role'] == 'assistant' -%}{{ vlm_content(m['content']) + '\\n' }}"
            "{%- endif -%}{%- endfor -%}")


def _system_then_turns(system: str, default: str, user: str, assistant: str) -> str:
    """Jinja writing a leading system message by ``system`` (else ``default``), then each
    other message ``m`` by ``user`` or, when not a user's, ``assistant``."""
    return ("{%- if messages and messages[0]['role'] == 'system' -%}" + system +
            "{%- set rest = messages[1:] -%}"
            "{%- else -%}" + default + "{%- set rest = messages -%}{%- endif -%}"
            "{%- for m in rest -%}"
            "{%- if m['role'] == 'user' -%}" + user +
            "{%- else -%}" + assistant +
            "{%- endif -%}{%- endfor -%}")


def _vicuna(system_prompt: str, bos: str) -> str:
    return bos + _system_then_turns(
        system="{{ vlm_content(messages[0]['content']) + ' ' }}",
        default="{{ " + _lit(system_prompt + " ") + " }}",
        user="{{ 'USER: ' + vlm_content(m['content']) + ' ASSISTANT:' }}",
        assistant="{{ ' ' + vlm_content(m['content']) + eos_token }}")


def _chatml(system_prompt: Optional[str]) -> str:
    default = ("{{ " + _lit(f"<|im_start|>system\n{system_prompt}<|im_end|>\n") + " }}") if system_prompt else ""
    # as vlm's chatml: a user turn always opens the assistant's turn; an answer ends with
    # <|im_end|>, and a newline when more follows
    return _system_then_turns(
        system="{{ '<|im_start|>system\\n' + vlm_content(messages[0]['content']) + '<|im_end|>\\n' }}",
        default=default,
        user="{{ '<|im_start|>user\\n' + vlm_content(m['content']) + '<|im_end|>\\n<|im_start|>assistant\\n' }}",
        assistant=("{{ vlm_content(m['content']) + '<|im_end|>' }}"
                   "{%- if not (loop.last and add_generation_prompt) -%}{{ '\\n' }}{%- endif -%}"))


def _paper(template_cls, image_token: str) -> str:
    # as vlm's PaperPromptTemplate: a user turn's image markers, then its text in the question
    # format (or the caption prompt when it has none); an answer after a space, then eos
    before, after = template_cls.question.split("{}")
    return ("{%- set ns = namespace(open=false) -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}"
            "{%- set text = vlm_content(m['content']) -%}"
            "{%- if ns.open -%}{{ ' ' }}{%- endif -%}"
            "{{ " + _lit(image_token) + " * (text.split(" + _lit(image_token) + ")|length - 1) }}"
            "{%- set q = text.replace(" + _lit(image_token) + ", '')|trim -%}"
            "{%- if q -%}{{ " + _lit(before) + " + q + " + _lit(after) + " }}"
            "{%- else -%}{{ " + _lit(template_cls.caption) + " }}{%- endif -%}"
            "{%- set ns.open = true -%}"
            "{%- elif m['role'] == 'assistant' -%}{{ ' ' + vlm_content(m['content']) + eos_token }}"
            "{%- set ns.open = false -%}"
            "{%- endif -%}{%- endfor -%}")


def _tokenizer_own(tokenizer, system_prompt: Optional[str]) -> str:
    own = getattr(tokenizer, "chat_template", None)
    if not own or not isinstance(own, str):
        raise TemplateError("template 'tokenizer': this tokenizer has no (single) chat_template to export")
    # content parts become strings first, then the tokenizer's own template renders them
    prelude = "{%- set ns = namespace(msgs=[]) -%}"
    if system_prompt:
        prelude += ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                    "{%- set ns.msgs = [{'role': 'system', 'content': " + _lit(system_prompt) + "}] -%}"
                    "{%- endif -%}")
    prelude += ("{%- for m in messages -%}"
                "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': vlm_content(m['content'])}] -%}"
                "{%- endfor -%}{%- set messages = ns.msgs -%}")
    return prelude + own


def jinja_chat_template(name: str, tokenizer, system_prompt: Optional[str] = None,
                        image_token: str = "<image>", image_text: Optional[str] = None,
                        image_placement: Optional[str] = None, video_token: Optional[str] = None) -> str:
    """The Jinja chat template rendering what vlm's template ``name`` renders (see the module
    docstring); an image part is written ``image_text`` (default ``image_token``; e.g. the
    token repeated once per visual token, for a processor that does not expand it).
    ``image_placement`` ``"first"`` (the model's, :mod:`vlm.data.placement`) writes a list
    content's image parts before its text parts, as vlm's processor places them. ``video_token``:
    a video part is written as that marker (None: video parts are not rendered).
    TemplateError for an unknown name or a tokenizer without a template."""
    if name != "tokenizer":
        try:
            cls = TEMPLATES.get(name)
        except KeyError as exc:
            raise TemplateError(str(exc.args[0])) from None
    else:
        cls = None
    bos = "{{ bos_token }}" if cls is not None and cls.add_bos and tokenizer.bos_token else ""
    body = {
        "plain": lambda: _plain(image_token, bos),
        "vicuna_v1": lambda: _vicuna(system_prompt or VICUNA_SYSTEM, bos),
        "chatml": lambda: _chatml(system_prompt),
        "tokenizer": lambda: _tokenizer_own(tokenizer, system_prompt),
        "blip2_qa": lambda: _paper(cls, image_token),
        "instructblip": lambda: _paper(cls, image_token),
    }
    if name not in body:
        raise TemplateError(f"template '{name}' has no Jinja export (exportable: {sorted(body)})")
    return _content_macro(image_token if image_text is None else image_text,
                          image_placement == "first", video_token) + body[name]()
