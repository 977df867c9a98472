"""vtprune: physical visual-token pruning for HuggingFace vision-language models."""
