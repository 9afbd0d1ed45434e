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
    proc, url = start_server(tiny_model_dir)
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
