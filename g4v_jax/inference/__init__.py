"""The one road from a loaded model to an answer, for chat, evals, the world demo and (next) the server.

``generate`` / ``stream`` (jitted prefill + decode loop over a preallocated KV cache), ``ChatSession`` (a conversation
with streamed text and ``<video>`` requests) and ``answer_requests`` / ``answer_batch_file`` (many requests in jitted
batches). ``g4v_jax.chat`` is only their command line.
"""

from g4v_jax.inference.batch import BatchOutputError, answer_batch_file, answer_requests, parse_request
from g4v_jax.inference.generate import GenerationResult, SamplingConfig, generate, stream
from g4v_jax.inference.session import Answer, ChatSession, StreamDecoder, clean_answer, finish_answer, make_renderer

__all__ = [
    "Answer", "BatchOutputError", "ChatSession", "GenerationResult", "SamplingConfig", "StreamDecoder",
    "answer_batch_file", "answer_requests", "clean_answer", "finish_answer", "generate", "make_renderer",
    "parse_request", "stream",
]
