"""glm_engine: the library behind build.py, run.py and summarize.py.

It plays the part that the `tensorrt_llm` package plays for TensorRT-LLM's
ChatGLM2-6B example: model configuration, engine format, tokenizer, KV cache
and the generation session, on PyTorch.
"""

__version__ = "0.1.0"


class GlmEngineError(Exception):
    """A problem with the user's input (flags, files, prompts) that the tools
    report as a one-line error instead of a traceback."""
