"""``vlm.chat``: the chat API at the package's top (:mod:`vlm.inference.chat`)."""

from vlm.inference.chat import answer, chat, task_prompt

__all__ = ["answer", "chat", "task_prompt"]
