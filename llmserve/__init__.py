"""llmserve: an OpenAI-compatible server for LLaMA-family models."""

from llmserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing LLM pulls in torch; keep `import llmserve` light for the CLI and bench.
    if name == "LLM":
        from llmserve.llm import LLM

        return LLM
    raise AttributeError(name)
