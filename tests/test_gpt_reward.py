"""The gpt_illusion reward against a local OpenAI-compatible server, with the real `openai` client."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from loraforge.errors import RewardError
from loraforge.registry.registry import Registry
from loraforge.rewards import load_reward
from loraforge.rewards.gpt_illusion import probability_from_logprobs, probability_from_text

SECRET = "sk-test-secret-value"


class FakeOpenAI:
    """POST /v1/chat/completions: scripted replies (an HTTP status, or an answer with optional top log-probs)."""

    def __init__(self):
        self.script: list = []
        self.default = {"content": "Yes", "top": [("Yes", math.log(0.7)), ("No", math.log(0.2)), ("yes", math.log(0.05))]}
        self.requests: list[dict] = []
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with threading.Lock():
                    outer.requests.append(body)
                    outer.auth.append(self.headers.get("Authorization", ""))
                    reply = outer.script.pop(0) if outer.script else outer.default
                if isinstance(reply, int):
                    data = json.dumps({"error": {"message": f"scripted {reply}", "type": "x", "code": None}}).encode()
                    self.send_response(reply)
                    self.send_header("Retry-After", "0")
                else:
                    data = json.dumps(outer.completion(reply)).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def completion(reply: dict) -> dict:
        top = reply.get("top")
        logprobs = None
        if top is not None:
            first = top[0] if top else (reply["content"], 0.0)
            logprobs = {"content": [{"token": first[0], "logprob": first[1], "bytes": None,
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake-vision",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": reply["content"]}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 2, "total_tokens": 1002}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(monkeypatch):
    server = FakeOpenAI()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    yield server
    server.close()


def _images(n: int = 2):
    return [Image.new("RGB", (16, 16), (40 * i, 80, 120)) for i in range(n)]


def _reward(api, registry=None, **options):
    options = {"base_url": api.base_url, "model": "fake-vision", "backoff_s": 0.01, "concurrency": 2, **options}
    return load_reward("gpt_illusion", options, registry=registry)


def test_probability_is_read_from_the_yes_no_logprobs(api):
    reward = _reward(api)
    scores = reward(_images(1), ["a cat | a dog"])
    # P(yes) = (0.7 + 0.05) / (0.7 + 0.05 + 0.2); the reward is 1 − P.
    assert scores == [pytest.approx(1 - 0.75 / 0.95, abs=1e-9)]
    body = api.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 10 and body["model"] == "fake-vision"
    parts = body["messages"][0]["content"]
    assert "optical illusion" in parts[0]["text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert api.auth[0] == f"Bearer {SECRET}"


@pytest.mark.parametrize("reply, p", [
    ({"content": "Probability: 0.3", "top": None}, 0.3),
    ({"content": "I'd say 85%", "top": None}, 0.85),
    ({"content": "No.", "top": None}, 0.0),
    ({"content": "0.6", "top": [("0", -0.1), (".", -3.0)]}, 0.6),  # log-probs without yes/no: the text counts
])
def test_falls_back_to_a_number_in_the_text(api, reply, p):
    api.script = [reply]
    assert _reward(api)(_images(1), ["x"]) == [pytest.approx(1 - p)]


def test_unreadable_answer_is_a_one_line_error(api):
    api.script = [{"content": "maybe", "top": None}]
    with pytest.raises(RewardError, match="cannot read a yes/no or a probability from the answer 'maybe'"):
        _reward(api)(_images(1), ["x"])


def test_cache_hits_avoid_a_second_request(api, home):
    registry = Registry(home)
    first = _reward(api, registry)(_images(2), ["p", "p"])
    assert len(api.requests) == 2
    reward = _reward(api, Registry(home))  # a new run, same registry: answers come from SQLite
    again = reward(_images(2), ["p", "p"])
    assert again == first and len(api.requests) == 2
    assert reward.metrics()["reward_cache_hits"] == 2 and reward.metrics()["reward_requests"] == 0
    _reward(api, registry)(_images(2), ["another prompt", "p"])  # the prompt is part of the key
    assert len(api.requests) == 3
    _reward(api, registry, model="other-model")(_images(1), ["p"])  # and so is the model
    assert len(api.requests) == 4
    rows = list(registry.db["reward_cache"].rows)
    assert len(rows) == 4 and all(SECRET not in json.dumps(r) for r in rows)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried(api, status):
    api.script = [status, status]
    reward = _reward(api)
    assert reward(_images(1), ["x"]) == [pytest.approx(1 - 0.75 / 0.95)]
    assert len(api.requests) == 3 and reward.metrics()["reward_retries"] == 2


def test_retries_give_up_with_one_line(api):
    api.script = [429] * 3
    with pytest.raises(RewardError, match=r"HTTP 429.*after 3 attempt\(s\)") as err:
        _reward(api, max_retries=2)(_images(1), ["x"])
    assert "\n" not in str(err.value) and len(api.requests) == 3


def test_client_errors_are_not_retried(api):
    api.script = [400]
    with pytest.raises(RewardError, match="HTTP 400"):
        _reward(api)(_images(1), ["x"])
    assert len(api.requests) == 1


def test_missing_key_fails_before_any_request(api, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RewardError) as err:
        _reward(api)
    assert str(err.value) == ("gpt_illusion reward needs an API key: set $OPENAI_API_KEY "
                              "(or name another variable with the api_key_env option)")
    assert api.requests == []


def test_tokens_and_cost_are_counted(api):
    reward = _reward(api, price_input_per_mtok=2.0, price_output_per_mtok=10.0)
    reward(_images(3), ["a", "b", "c"])
    m = reward.metrics()
    assert m["reward_requests"] == 3 and m["reward_prompt_tokens"] == 3000 and m["reward_completion_tokens"] == 6
    assert m["reward_cost_usd"] == pytest.approx(3000 * 2.0 / 1e6 + 6 * 10.0 / 1e6)
    assert SECRET not in repr(reward)


def test_base_url_comes_from_the_environment(api, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
    reward = load_reward("gpt_illusion", {"model": "fake-vision"})
    reward(_images(1), ["x"])
    assert len(api.requests) == 1


def test_probability_helpers():
    assert probability_from_logprobs([(" YES", math.log(0.3)), ("no.", math.log(0.1))]) == pytest.approx(0.75)
    assert probability_from_logprobs([("maybe", -0.1)]) is None
    assert probability_from_text("yes") == 1.0 and probability_from_text(".25") == 0.25
    assert probability_from_text("unsure") is None


@pytest.mark.parametrize("setting", [
    {"detail": "high"},           # the image is seen at another resolution
    {"top_logprobs": 3},          # P(yes) is renormalised over other tokens
    {"max_tokens": 20},           # a longer answer text
    {"question": "Is it an illusion? yes or no."},
])
def test_every_setting_that_changes_the_answer_is_part_of_the_cache_key(api, home, setting):
    _reward(api, Registry(home))(_images(1), ["p"])
    changed = _reward(api, Registry(home), **setting)
    changed(_images(1), ["p"])
    assert changed.metrics()["reward_cache_hits"] == 0 and len(api.requests) == 2
    again = _reward(api, Registry(home), **setting)  # the same settings: answered from the cache
    again(_images(1), ["p"])
    assert again.metrics()["reward_cache_hits"] == 1 and len(api.requests) == 2
    assert len(list(Registry(home).db["reward_cache"].rows)) == 2


def test_another_endpoint_is_asked_not_answered_from_the_cache(api, home):
    other = FakeOpenAI()
    other.default = {"content": "No", "top": [("No", math.log(0.9)), ("Yes", math.log(0.1))]}
    try:
        first = _reward(api, Registry(home))(_images(1), ["p"])
        scores = _reward(api, Registry(home), base_url=other.base_url)(_images(1), ["p"])
        assert len(other.requests) == 1 and scores == [pytest.approx(0.9)] != first
        again = _reward(api, Registry(home), base_url=other.base_url)
        assert again(_images(1), ["p"]) == scores and len(other.requests) == 1
    finally:
        other.close()


def test_the_api_key_is_not_part_of_the_cache_key(api, home, monkeypatch):
    _reward(api, Registry(home))(_images(1), ["p"])
    monkeypatch.setenv("OTHER_KEY", "sk-another-secret")
    again = _reward(api, Registry(home), api_key_env="OTHER_KEY")
    again(_images(1), ["p"])
    assert again.metrics()["reward_cache_hits"] == 1 and len(api.requests) == 1
    rows = list(Registry(home).db["reward_cache"].rows)
    assert len(rows) == 1 and not any(s in json.dumps(rows) for s in (SECRET, "sk-another-secret"))
