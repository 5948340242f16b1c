"""Using a trained model: generation, decode, likelihoods, chat, serving; never imports training."""
