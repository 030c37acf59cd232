"""Evaluating a model as this runtime runs it: perplexity on held-out text (`llmserve eval ppl`)."""
