"""A real server on loopback, spoken to with the official openai client."""

import shutil
import socket
import subprocess
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

LOWBIT = shutil.which("lowbit")
pytestmark = pytest.mark.skipif(LOWBIT is None, reason="the lowbit command is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra):
    port = free_port()
    proc = subprocess.Popen(
        [LOWBIT, "serve", str(model_dir), "--port", str(port), "--quantization", "int4", "--max-model-len", "96",
         "--served-model-name", "tiny", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--max-body-mb", "1")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_and_its_stream_agree(client):
    full = client.completions.create(model="tiny", prompt="a single man", max_tokens=8, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0
    pieces = client.completions.create(model="tiny", prompt="a single man", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == full.choices[0].text


def test_chat_completion_and_its_stream_agree(client):
    messages = [{"role": "user", "content": "tell me about fortune"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt="fortune " * 200, max_tokens=4),
        dict(prompt="hi", max_tokens=10_000),
        dict(prompt="hi", max_tokens=0),
        dict(prompt="hi", temperature="hot"),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_error_and_the_server_keeps_serving(client, kwargs):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", **kwargs)
    assert info.value.body["message"]
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_malformed_json_and_unknown_model(server, client):
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_several_clients_at_once_are_served_correctly(client):
    expected = client.completions.create(model="tiny", prompt="the truth", max_tokens=6, temperature=0).choices[0].text
    results, errors = [], []

    def ask():
        try:
            out = client.completions.create(model="tiny", prompt="the truth", max_tokens=6, temperature=0)
            results.append(out.choices[0].text)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == [expected] * 4


def test_a_client_that_disconnects_mid_stream_frees_the_model(server, client):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 80, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    start = time.time()
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
    assert out.choices and time.time() - start < 30


def test_api_key_is_enforced(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_stop_string_spanning_tokens_never_leaks_a_prefix(client):
    free = client.completions.create(model="tiny", prompt="a single man", max_tokens=12, temperature=0).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " ".join(words[1:3])  # several tokens long
    expected = free[: free.index(stop)]
    out = client.completions.create(model="tiny", prompt="a single man", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model="tiny", prompt="a single man", max_tokens=12, temperature=0, stop=[stop],
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == expected


def test_chat_logprobs_with_top_alternatives(client):
    messages = [{"role": "user", "content": "tell me about fortune"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy picks the top
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in entries]


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="the truth", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)


def test_stream_usage_when_asked(client):
    full = client.completions.create(model="tiny", prompt="the truth", max_tokens=7, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="the truth", max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_messages_as_clients_send_them(client):
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about fortune"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "tell me about fortune"}]}]
    ask = dict(model="tiny", max_tokens=5, temperature=0)
    expected = client.chat.completions.create(messages=plain, **ask).choices[0].message.content
    assert client.chat.completions.create(messages=parts, **ask).choices[0].message.content == expected
    history = plain + [{"role": "assistant", "content": None}, {"role": "user", "content": "and then?"}]
    assert client.chat.completions.create(messages=history, **ask).choices[0].message.role == "assistant"


def test_top_p_zero_is_greedy(client):
    greedy = client.completions.create(model="tiny", prompt="the truth", max_tokens=6, temperature=0).choices[0].text
    out = client.completions.create(model="tiny", prompt="the truth", max_tokens=6, temperature=1.0, top_p=0, seed=1)
    assert out.choices[0].text == greedy


@pytest.mark.parametrize(
    "body, says",
    [
        (dict(max_tokens=True), "integer"),
        (dict(n=2), "n = 2 is not supported"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=["a", "b", "c", "d", "e"]), "at most 4 stop"),
    ],
)
def test_fields_lowbit_refuses_say_why(server, body, says):
    r = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hi", **body}, timeout=30)
    assert r.status_code == 400 and says in r.json()["error"]["message"]


def test_a_long_prompt_without_max_tokens_gets_the_context_left(client):
    prompt = "fortune " * 60
    prompt_tokens = client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage.prompt_tokens
    out = client.completions.create(model="tiny", prompt=prompt, temperature=1.0, seed=0)
    assert prompt_tokens + out.usage.completion_tokens <= 96
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_body_over_the_limit_gets_413_and_health_stays_fast(server):
    r = httpx.post(server + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "larger than 1 MiB" in r.json()["error"]["message"]
    body = {"model": "tiny", "prompt": "a", "max_tokens": 80, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as stream:
        next(stream.iter_lines())
        start = time.time()
        assert httpx.get(server + "/health", timeout=10).status_code == 200
        assert time.time() - start < 1.0


def test_a_taken_port_is_refused_in_one_line(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([LOWBIT, "serve", str(tiny_model_dir), "--port", str(port)], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2 and "cannot listen on 127.0.0.1" in done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr


def test_non_text_content_is_refused_by_name(server):
    image = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [image]}]}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert "'image_url' are not supported" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages.0.content.0"


def test_concurrent_requests_decode_together_and_each_gets_its_own_answer(client):
    asks = [dict(prompt="the truth", max_tokens=9), dict(prompt="a single man in possession", max_tokens=4),
            dict(prompt="fortune", max_tokens=12, stop=["e"]), dict(prompt="it is", max_tokens=7, seed=3, temperature=1.0),
            dict(prompt="truth universally", max_tokens=6)]
    alone = [client.completions.create(model="tiny", **{"temperature": 0, **a}).choices[0].text for a in asks]
    together, errors = [None] * len(asks), []

    def ask(i):
        try:
            together[i] = client.completions.create(model="tiny", **{"temperature": 0, **asks[i]}).choices[0].text
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and together == alone


def test_a_bounded_load_test_has_no_failures(server, client):
    """8 streaming clients, two requests each, every third abandoned mid-answer, beside a body over the limit:
    no well-formed request fails, /health stays fast, and the server serves normally afterwards."""
    import asyncio

    from lowbit.serving.loadtest import health_while, run_clients

    prompts = ["the truth", "a single man in possession of a good fortune", "it is", "fortune " * 12]

    async def load():
        busy = asyncio.ensure_future(run_clients(server, "tiny", prompts, 8, 2, 24, abandon_every=3))
        probe = await health_while(server, busy, big_body_mb=2)
        return probe, await busy

    probe, summary = asyncio.run(load())
    assert summary["failed"] == 0, summary["failures"]
    assert summary["completed"] + summary["abandoned"] == 16 and summary["abandoned"] >= 1  # 5 unless one ends first
    assert summary["completion_tokens"] > 0 and summary["ttft_p95_s"] is not None
    assert probe["big_body_status"] != "200" and probe["health_p99_s"] < 0.5
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
