"""LLM judges for open-ended video QA: the Video-ChatGPT evaluation protocol (Maaz et al., 2023).

A judge reads a question, the correct answer and the model's prediction and replies with a Python dict string
``{'pred': 'yes', 'score': 4}``: ``pred`` says whether the prediction matches the answer, ``score`` (an integer 0-5)
how well. Accuracy is the fraction of ``yes``; the score is averaged. The prompts below restate the protocol's
instructions in our own words.

- ``OpenAIJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (temperature 0) through the shared
  ``g4v_jax.endpoint.ChatEndpoint``: HTTP 408/409/429/5xx, timeouts and connection errors are retried
  with exponential backoff (honouring ``Retry-After``); a reply that does not parse is asked again; after
  ``max_retries`` retries the call raises ``JudgeError``, as does a non-retryable 4xx at once. Every parsed verdict
  is cached on disk under ``sha256(model, system prompt, user prompt)``, so a rerun makes no calls.
- ``ModelJudge``: our own model (or any ``prompt -> reply`` function) with the same prompt and parsing.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from g4v_jax.endpoint import ChatEndpoint, EndpointRejected, EndpointUnavailable

SYSTEM_PROMPT = (
    "You evaluate answers to questions about videos. You are given a question, the correct answer and a predicted "
    "answer. Decide whether the prediction means the same as the correct answer.\n"
    "Instructions:\n"
    "- Judge meaning, not wording: synonyms and paraphrases of the correct answer count as matches.\n"
    "- A prediction that contradicts the correct answer, or does not answer the question, is not a match.\n"
    "- Also rate how well the prediction matches with an integer from 0 (not at all) to 5 (perfectly)."
)

USER_TEMPLATE = (
    "Evaluate this question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Predicted answer: {prediction}\n\n"
    "Reply ONLY with a Python dictionary string with the keys 'pred' ('yes' if the prediction matches the correct "
    "answer, otherwise 'no') and 'score' (an integer from 0 to 5), for example {{'pred': 'yes', 'score': 4}}. "
    "Write nothing else: no explanation, no other text."
)


class JudgeError(RuntimeError):
    """The judge could not give a verdict (unparseable replies, HTTP errors after all retries)."""


@runtime_checkable
class Judge(Protocol):
    def judge(self, question: str, answer: str, prediction: str) -> dict:
        """``{"pred": "yes" | "no", "score": int 0-5}``; raises ``JudgeError``."""
        ...


def user_prompt(question: str, answer: str, prediction: str) -> str:
    return USER_TEMPLATE.format(question=question.strip(), answer=str(answer).strip(), prediction=prediction.strip())


_DICT = re.compile(r"\{[^{}]*\}", re.S)
_PRED = re.compile(r"""['"]?pred['"]?\s*[:=]\s*['"]?\s*(yes|no)\b""", re.I)
_SCORE = re.compile(r"""['"]?score['"]?\s*[:=]\s*['"]?\s*(\d+(?:\.\d+)?)""", re.I)


def _verdict(pred, score) -> dict | None:
    if not isinstance(pred, str) or pred.strip().lower() not in ("yes", "no"):
        return None
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score) or not 0 <= score <= 5:
        return None
    return {"pred": pred.strip().lower(), "score": int(score)}


def parse_judgement(text: str) -> dict:
    """``{"pred", "score"}`` from a judge reply; ``ValueError`` when it holds no valid verdict.

    Tries each ``{...}`` in the reply with ``ast.literal_eval`` (then as JSON), then falls back to a regex for
    ``pred: yes/no`` and ``score: N``. ``pred`` must be yes/no (any case), ``score`` an integer 0-5 (``"4"``, ``4.0``
    accepted)."""
    if not isinstance(text, str):
        raise ValueError(f"judge reply is not text: {text!r}")
    for block in _DICT.findall(text):
        for load in (ast.literal_eval, json.loads):
            try:
                obj = load(block)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(obj, dict):
                low = {str(k).strip().lower(): v for k, v in obj.items()}
                v = _verdict(low.get("pred"), low.get("score"))
                if v is not None:
                    return v
    p, s = _PRED.search(text), _SCORE.search(text)
    if p and s:
        v = _verdict(p.group(1), s.group(1))
        if v is not None:
            return v
    raise ValueError(f"no {{'pred': 'yes'|'no', 'score': 0-5}} in the judge reply {text[:200]!r}")


class ModelJudge:
    """A judge from a ``prompt -> reply`` function (e.g. our model's chat); same prompt (system + user in one
    message) and parsing as ``OpenAIJudge``. A reply that does not parse is asked again up to ``max_retries`` times
    (useful only when ``ask`` samples), then ``JudgeError``."""

    def __init__(self, ask: Callable[[str], str], *, max_retries: int = 0) -> None:
        self.ask, self.max_retries = ask, max_retries

    def judge(self, question: str, answer: str, prediction: str) -> dict:
        prompt = f"{SYSTEM_PROMPT}\n\n{user_prompt(question, answer, prediction)}"
        reply = ""
        for _ in range(self.max_retries + 1):
            reply = self.ask(prompt)
            try:
                return parse_judgement(reply)
            except ValueError:
                continue
        raise JudgeError(f"unparseable judge reply after {self.max_retries + 1} attempt(s): {str(reply)[:200]!r}")


def read_key_file(path: str | os.PathLike | None) -> str | None:
    """The API key in ``path`` (surrounding whitespace stripped); None without a path ($OPENAI_API_KEY then)."""
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"judge key file {path}: {e.strerror}") from None
    if not key:
        raise ValueError(f"judge key file {path} is empty")
    return key


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    ``url``: the server base (``http://host:port`` or ``.../v1``) or the full ``.../chat/completions`` URL.
    ``api_key`` defaults to ``$OPENAI_API_KEY`` (sent as a Bearer token when set). ``backoff``: seconds before the
    first retry, doubled each time (capped at 60). ``calls`` counts HTTP requests made (cache hits make none).
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, cache_dir: str | os.PathLike,
                 max_retries: int = 5, timeout: float = 60, backoff: float = 1.0,
                 requests_per_minute: float | None = None) -> None:
        self.endpoint = ChatEndpoint(url, model, api_key, max_retries=max_retries, backoff=backoff, timeout=timeout,
                                     requests_per_minute=requests_per_minute)
        self.model = model
        self.cache_dir = Path(cache_dir)

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def calls(self) -> int:
        return self.endpoint.calls

    # ---- cache -------------------------------------------------------------------------------------------------
    def cache_key(self, user: str) -> str:
        blob = json.dumps([self.model, SYSTEM_PROMPT, user], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> dict | None:
        p = self._cache_path(key)
        try:
            return _verdict(*(lambda d: (d["pred"], d["score"]))(json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _store(self, key: str, verdict: dict, reply: str) -> None:
        p = self._cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({**verdict, "reply": reply, "model": self.model}), encoding="utf-8")
        os.replace(tmp, p)

    def judge(self, question: str, answer: str, prediction: str) -> dict:
        user = user_prompt(question, answer, prediction)
        key = self.cache_key(user)
        hit = self._cached(key)
        if hit is not None:
            return hit
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        try:
            reply, verdict = self.endpoint.complete_checked(messages, parse_judgement, temperature=0)
        except EndpointRejected as e:
            raise JudgeError(f"judge request failed: {e}") from None
        except EndpointUnavailable as e:
            raise JudgeError(f"no verdict after {e.attempts} attempt(s); last: {e.last}") from None
        self._store(key, verdict, reply)
        return verdict
