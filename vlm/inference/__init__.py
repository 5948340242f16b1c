"""Using a trained model: generation, the lean decode, likelihoods, chat and the OpenAI-compatible server. Never imports vlm.training."""
