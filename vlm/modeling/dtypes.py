"""The LLM weight dtypes a config may name (``model.llm.dtype``)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
