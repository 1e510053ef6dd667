"""The judge client against a real OpenAI-compatible HTTP server on 127.0.0.1: 429 / 5xx retried with
backoff, other errors stop, replies that break the contract asked again then counted as failures,
entries merged across re-asks, every reply cached by request hash, the key sent and never written."""
import os

import pytest

from fastebm.eval.judge_client import API_KEY_ENV, Asker, JudgeCache, JudgeError, OpenAIJudge, json_object

from judge_server import JudgeServer, text_of

KEY = "sk-test-SECRET-0123456789"
MSGS = [{"role": "system", "content": "judge"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                                     {"type": "text", "text": "score A and B"}]}]


def parse_ab(reply):
    """A toy contract: {"A": number, "B": number}."""
    obj, err = json_object(reply)
    if err:
        return {}, [err]
    vals = {k: obj[k] for k in ("A", "B") if isinstance(obj.get(k), (int, float))}
    return vals, [f"{k} must be a number" for k in ("A", "B") if k in obj and k not in vals]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)


def judge(s, **kw):
    return OpenAIJudge(s.url, "test-judge", backoff_s=0.001, **kw)


def test_429_and_5xx_are_retried_with_the_key_sent(tmp_path):
    with JudgeServer(lambda b, n: '{"A": 1, "B": 2}', fail=[429, 503, 500], retry_after="0") as s:
        asker = Asker(judge(s), JudgeCache(str(tmp_path)))
        ans = asker.ask(MSGS, parse_ab, ["A", "B"])
    assert ans.values == {"A": 1, "B": 2} and not ans.missing
    assert asker.stats.to_dict() == {"requests": 1, "cache_hits": 0, "http_retries": 3, "http_failures": 0,
                                     "invalid_replies": 0, "reasks": 0, "failures": 0}
    assert len(s.requests) == 4
    for r in s.requests:
        assert r["headers"]["authorization"] == f"Bearer {KEY}"
        assert r["body"]["model"] == "test-judge" and r["body"]["temperature"] == 0.0
        assert r["body"]["messages"] == MSGS  # image parts go out as sent


def test_retries_exhausted_fail_the_question_not_the_run(tmp_path):
    with JudgeServer(lambda b, n: '{"A": 1, "B": 2}', fail=[429, 502, 429]) as s:
        asker = Asker(judge(s, max_retries=2), JudgeCache(str(tmp_path)))
        ans = asker.ask(MSGS, parse_ab, ["A", "B"])
    assert ans.http_failed and ans.missing == ["A", "B"] and ans.replies == []
    assert asker.stats.http_retries == 2 and asker.stats.http_failures == 1 and asker.stats.failures == 2
    assert len(s.requests) == 3


def test_other_http_errors_stop_without_leaking_the_key(tmp_path):
    with JudgeServer(lambda b, n: "{}", fail=[401]) as s:
        asker = Asker(judge(s), JudgeCache(str(tmp_path)))
        with pytest.raises(JudgeError, match="HTTP 401") as e:
            asker.ask(MSGS, parse_ab, ["A", "B"])
    assert KEY not in str(e.value) and len(s.requests) == 1


def test_invalid_replies_are_asked_again_then_counted(tmp_path):
    with JudgeServer(lambda b, n: ["I think A is better.", '```json\n{"A": "high"}\n```', "{oops"][n]) as s:
        asker = Asker(judge(s), JudgeCache(str(tmp_path)), max_reasks=2)
        ans = asker.ask(MSGS, parse_ab, ["A", "B"])
    assert ans.values == {} and ans.missing == ["A", "B"] and len(ans.replies) == 3
    assert asker.stats.to_dict() == {"requests": 3, "cache_hits": 0, "http_retries": 0, "http_failures": 0,
                                     "invalid_replies": 3, "reasks": 2, "failures": 2}
    # each re-ask continues the conversation: the previous reply, then what was wrong with it
    second, third = s.requests[1]["body"]["messages"], s.requests[2]["body"]["messages"]
    assert second[:2] == MSGS and second[2] == {"role": "assistant", "content": "I think A is better."}
    assert "holds no JSON object" in second[3]["content"] and "missing or invalid: A, B" in second[3]["content"]
    assert third[:4] == second and "A must be a number" in third[5]["content"]


def test_entries_merge_across_re_asks(tmp_path):
    with JudgeServer(lambda b, n: ['{"A": 70}', '{"B": 40, "A": "x"}'][n]) as s:
        asker = Asker(judge(s), JudgeCache(str(tmp_path)))
        ans = asker.ask(MSGS, parse_ab, ["A", "B"])
    assert ans.values == {"A": 70, "B": 40} and not ans.missing
    assert "missing or invalid: B" in text_of(s.requests[1]["body"])
    assert asker.stats.reasks == 1 and asker.stats.failures == 0


def test_replies_are_cached_by_request_hash(tmp_path):
    replies = ['{"A": 1}', '{"A": 1, "B": 3}', '{"A": 5, "B": 6}']
    with JudgeServer(lambda b, n: replies[n]) as s:
        first = Asker(judge(s), JudgeCache(str(tmp_path / "cache")))
        a1 = first.ask(MSGS, parse_ab, ["A", "B"])
        again = Asker(judge(s), JudgeCache(str(tmp_path / "cache")))   # a rerun: nothing asked twice
        a2 = again.ask(MSGS, parse_ab, ["A", "B"])
        other = Asker(OpenAIJudge(s.url, "another-judge", backoff_s=0.001), JudgeCache(str(tmp_path / "cache")))
        a3 = other.ask(MSGS, parse_ab, ["A", "B"])  # a different judge is a different request
    assert a1.values == a2.values == {"A": 1, "B": 3} and a3.values == {"A": 5, "B": 6}
    assert first.stats.requests == 2 and again.stats.requests == 0 and again.stats.cache_hits == 2
    assert other.stats.requests == 1 and len(s.requests) == 3
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(files) == 3 and all(KEY not in open(f).read() for f in files)


def test_json_object_reading():
    assert json_object('Sure!\n```json\n{"VEG": "A"}\n```') == ({"VEG": "A"}, None)
    assert json_object("") == (None, "the reply is empty")
    assert json_object("[1, 2]")[1] == "the reply holds no JSON object"
    assert "does not parse" in json_object('{"a": 1,}')[1]
