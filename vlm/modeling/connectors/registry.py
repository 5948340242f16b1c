"""The registry of connectors, by exact name (built-ins imported on first use)."""

from vlm.core.registry import Registry

CONNECTORS: Registry = Registry("connector", {
    "beit3_query": "vlm.modeling.connectors.beit3_query:BEiT3QueryConnector",
    "linear": "vlm.modeling.connectors.mlp:LinearProjector",
    "mlp2x_gelu": "vlm.modeling.connectors.mlp:MLPProjector",
    "qformer": "vlm.modeling.connectors.qformer:QFormer",
    "question_aware_mlp": "vlm.modeling.connectors.question_aware:QuestionAwareMLPProjector",
})
