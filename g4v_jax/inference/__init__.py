"""The one road from a loaded model to an answer, for chat, evals, the world demo and (next) the server.

``Engine`` (continuous batching: slots of one preallocated KV cache, prefill -> insert -> step), which every answer
goes through: ``ChatSession`` (a conversation with streamed text and ``<video>`` requests, on a one-slot engine) and
``answer_requests`` / ``answer_batch_file`` (many requests queued on one engine). ``generate`` / ``stream`` are the
static-batch reference (one jitted prefill + decode loop per batch) the engine is tested and benchmarked against.
``g4v_jax.chat`` is only their command line.
"""

from g4v_jax.inference.batch import BatchOutputError, answer_batch_file, answer_requests, parse_request
from g4v_jax.inference.generate import GenerationResult, SamplingConfig, generate, stream
from g4v_jax.inference.engine import Engine, EngineRequest, EngineResult, RequestError
from g4v_jax.inference.session import ChatSession, make_renderer
from g4v_jax.inference.text import Answer, StreamDecoder, clean_answer, finish_answer

__all__ = [
    "Answer", "BatchOutputError", "ChatSession", "Engine", "EngineRequest", "EngineResult", "GenerationResult",
    "RequestError", "SamplingConfig", "StreamDecoder",
    "answer_batch_file", "answer_requests", "clean_answer", "finish_answer", "generate", "make_renderer",
    "parse_request", "stream",
]
