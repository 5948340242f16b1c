"""Evaluation: official VQAv2 accuracy and COCO caption metrics."""
