"""R(I) = 1 − P(illusion | I), P asked of a vision LLM behind an OpenAI-compatible chat endpoint.

P is read from the top log-probs of the first answer token (softmax over yes/no variants), or parsed
from the answer text when the endpoint gives no log-probs. Answers are cached in the registry.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from loraforge.errors import RewardError
from loraforge.plugins import REWARDS
from loraforge.rewards.base import image_digest
from loraforge.rewards.cache import RewardCache, cache_key

VERSION = "1"
DEFAULT_ENDPOINT = "https://api.openai.com/v1"  # the openai client's default when no base_url is set
TEMPERATURE = 0
DEFAULT_QUESTION = ("Does this image contain an optical illusion (for example an image that shows something "
                    "different when flipped or rotated)? Answer with one word: yes or no.")
YES = {"yes", "y", "true"}
NO = {"no", "n", "false"}
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)\s*(%?)")


def _normalise(token: str) -> str:
    return token.strip().strip(".,!:;\"'").lower()


def probability_from_logprobs(top: Sequence[tuple[str, float]]) -> float | None:
    """P(yes) from (token, logprob) pairs: softmax restricted to yes/no variants; None if there are none."""
    p_yes = sum(math.exp(lp) for tok, lp in top if _normalise(tok) in YES)
    p_no = sum(math.exp(lp) for tok, lp in top if _normalise(tok) in NO)
    if p_yes + p_no <= 0:
        return None
    return p_yes / (p_yes + p_no)


def probability_from_text(text: str) -> float | None:
    """A probability written in the answer: "0.8", "80%", or a bare yes / no; None if there is none."""
    match = _NUMBER.search(text or "")
    if match:
        value = float(match.group(1))
        if match.group(2) == "%" or value > 1:
            value /= 100.0
        if 0.0 <= value <= 1.0:
            return value
    word = _normalise((text or "").split()[0]) if (text or "").split() else ""
    if word in YES:
        return 1.0
    if word in NO:
        return 0.0
    return None


def probability_from_choice(choice) -> float | None:
    logprobs = getattr(choice, "logprobs", None)
    content = getattr(logprobs, "content", None) or []
    for item in content:
        if not item.token.strip():
            continue  # a leading space or newline token: the answer word follows
        pairs = [(t.token, t.logprob) for t in (item.top_logprobs or [])] or [(item.token, item.logprob)]
        p = probability_from_logprobs(pairs)
        if p is not None:
            return p
        break
    return probability_from_text(choice.message.content or "")


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@REWARDS.register("gpt_illusion", version=VERSION, reference_url="https://arxiv.org/abs/2311.17919",
                  description="1 − P(illusion) judged by a vision LLM (OpenAI-compatible endpoint).")
class GptIllusionReward:
    """The seed's reward. The API key is read from the environment variable `api_key_env` and is never stored
    in configs, manifests or the cache; prices are USD per million tokens."""

    name = "gpt_illusion"
    version = VERSION

    def __init__(self, *, registry=None, model: str = "gpt-4o-mini", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", question: str = DEFAULT_QUESTION, concurrency: int = 4,
                 max_retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0, top_logprobs: int = 10,
                 max_tokens: int = 5, detail: str = "low", price_input_per_mtok: float = 0.15,
                 price_output_per_mtok: float = 0.60, cache: bool = True):
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise RewardError(f"gpt_illusion reward needs an API key: set ${api_key_env} "
                              "(or name another variable with the api_key_env option)")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise RewardError("gpt_illusion: concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        from openai import OpenAI

        self.model, self.question, self.detail = model, question, detail
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.concurrency, self.max_retries, self.backoff_s = int(concurrency), int(max_retries), float(backoff_s)
        self.top_logprobs, self.max_tokens = int(top_logprobs), int(max_tokens)
        self.prices = (float(price_input_per_mtok), float(price_output_per_mtok))
        # Retries are ours (counted, with our back-off); the client only times out.
        self._client = OpenAI(api_key=key, base_url=self.base_url, timeout=float(timeout_s), max_retries=0)
        self._cache = RewardCache(registry) if cache else None
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def __repr__(self) -> str:  # never the key
        return f"GptIllusionReward(model={self.model!r}, base_url={self.base_url!r})"

    def _answer_settings(self) -> dict:
        """What the answer depends on besides the image: the cache key. Never the API key (another key
        on the same endpoint gives the same answer, and keys must not be stored)."""
        endpoint = (self.base_url or DEFAULT_ENDPOINT).rstrip("/")
        return {"model": self.model, "base_url": endpoint, "question": self.question, "detail": self.detail,
                "top_logprobs": self.top_logprobs, "max_tokens": self.max_tokens, "temperature": TEMPERATURE}

    def probabilities(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """P(illusion) per image: cached answers first, the rest asked concurrently."""
        digests = [image_digest(im) for im in images]
        keys = [cache_key(reward=self.name, version=self.version, image_digest=d, prompt=p, settings=self._answer_settings())
                for d, p in zip(digests, prompts)]
        known = self._cache.get_many(keys) if self._cache is not None else {}
        todo, asked = [], set()
        for i, key in enumerate(keys):
            if key not in known and key not in asked:  # the same image and prompt twice: asked once
                asked.add(key)
                todo.append(i)
        with self._lock:
            self._stats["cache_hits"] += len(images) - len(todo)
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                answers = list(pool.map(lambda i: self._ask(images[i]), todo))
            rows = []
            for i, (p, text) in zip(todo, answers):
                known[keys[i]] = p
                rows.append({"key": keys[i], "reward": self.name, "version": self.version, "model": self.model,
                             "image_digest": digests[i], "prompt": prompts[i], "value": p,
                             "detail": {"answer": text[:200]}})
            if self._cache is not None:
                self._cache.put_many(rows)
        return [known[k] for k in keys]

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return [1.0 - p for p in self.probabilities(images, prompts)]

    def _ask(self, image) -> tuple[float, str]:
        import openai

        messages = [{"role": "user", "content": [
            {"type": "text", "text": self.question},
            {"type": "image_url", "image_url": {"url": _png_data_url(image), "detail": self.detail}},
        ]}]
        for attempt in range(self.max_retries + 1):
            try:
                with self._lock:
                    self._stats["requests"] += 1
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=TEMPERATURE,
                    logprobs=True, top_logprobs=self.top_logprobs)
                break
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                if attempt == self.max_retries:
                    raise RewardError(f"gpt_illusion: {self._describe(exc)} after {attempt + 1} attempt(s); "
                                      "try later or raise max_retries") from None
                with self._lock:
                    self._stats["retries"] += 1
                time.sleep(self._delay(exc, attempt))
            except openai.APIStatusError as exc:
                raise RewardError(f"gpt_illusion: {self._describe(exc)} from {self.base_url or 'the OpenAI API'} "
                                  f"(model {self.model!r})") from None
        usage = getattr(response, "usage", None)
        if usage is not None:
            with self._lock:
                self._stats["prompt_tokens"] += int(usage.prompt_tokens or 0)
                self._stats["completion_tokens"] += int(usage.completion_tokens or 0)
        if not response.choices:
            raise RewardError(f"gpt_illusion: the endpoint returned no answer (model {self.model!r})")
        choice = response.choices[0]
        p = probability_from_choice(choice)
        text = choice.message.content or ""
        if p is None:
            raise RewardError(f"gpt_illusion: cannot read a yes/no or a probability from the answer {text[:80]!r}; "
                              "ask for yes/no or a number in the question option")
        return p, text

    def _delay(self, exc, attempt: int) -> float:
        delay = self.backoff_s * 2**attempt
        response = getattr(exc, "response", None)
        try:
            retry_after = float(response.headers.get("retry-after")) if response is not None else None
        except (TypeError, ValueError):
            retry_after = None
        return min(60.0, max(delay, retry_after or 0.0))

    @staticmethod
    def _describe(exc) -> str:
        status = getattr(exc, "status_code", None)
        message = str(getattr(exc, "message", "") or exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"HTTP {status}: {message}" if status else f"{exc.__class__.__name__}: {message}"

    def metrics(self) -> dict:
        with self._lock:
            s = dict(self._stats)
        cost = s["prompt_tokens"] * self.prices[0] / 1e6 + s["completion_tokens"] * self.prices[1] / 1e6
        return {"reward_requests": s["requests"], "reward_cache_hits": s["cache_hits"], "reward_retries": s["retries"],
                "reward_prompt_tokens": s["prompt_tokens"], "reward_completion_tokens": s["completion_tokens"],
                "reward_cost_usd": round(cost, 6)}
