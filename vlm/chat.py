"""``vlm.chat``: the chat API at the package's top, as the README uses it (:mod:`vlm.inference.chat`)."""

from vlm.inference.chat import answer, chat, task_prompt

__all__ = ["answer", "chat", "task_prompt"]
