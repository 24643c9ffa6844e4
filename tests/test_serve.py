"""The local server: a real uvicorn process on a free port serving the tiny GGUF; hot swap under load, refused bad
files, the token rule for non-loopback clients, and the token kept out of the logs."""

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import REPO, run_module

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: bash scripts/install_llama_cpp.sh")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

TOKEN = "s3cret-T0KEN-never-logged-0123456789"


class Server:
    """`python -m qmd_unsloth.serve` as a user starts it, on a free port (--port 0, read from its first line)."""

    def __init__(self, tmp, model, *args, env=None):
        self.out, self.err = tmp / "serve.out", tmp / "serve.err"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "qmd_unsloth.serve", "--model", str(model),
                                          "--port", "0", *args], stdout=out, stderr=err, cwd=REPO, env=full_env)
        deadline = time.time() + 90
        while time.time() < deadline:
            first = self.out.read_text().split("\n", 1)[0]
            if first.startswith("serve: http://") and first.count(" ") > 1:
                self.url = first.split()[1].rstrip("/")
                self.port = int(self.url.rsplit(":", 1)[1])
                break
            assert self.proc.poll() is None, self.err.read_text()[-2000:]
            time.sleep(0.2)
        else:
            self.stop()
            raise AssertionError(f"server did not start: {self.err.read_text()[-2000:]}")
        while httpx.get(self.url + "/health", timeout=30).status_code != 200:  # pragma: no cover
            time.sleep(0.2)

    def get(self, path, **kw):
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path, **kw):
        return httpx.post(self.url + path, timeout=120, **kw)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        return self.out.read_text() + self.err.read_text()


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), tiny_gguf)
    yield s
    s.stop()


def _patched(src, dst, edit):
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _wrong_eos(data):  # tokenizer.ggml.eos_token_id (type u32, value) -> token 0
    i = data.index(b"tokenizer.ggml.eos_token_id") + len(b"tokenizer.ggml.eos_token_id")
    assert struct.unpack("<I", data[i:i + 4])[0] == 4
    data[i + 4:i + 8] = struct.pack("<I", 0)


def _other_template(data):  # the embedded template writes a different assistant header (same length)
    old, new = b"'<|im_start|>assistant\\n'", b"'<|im_start|>ASSISTANT\\n'"
    i = data.index(old)
    data[i:i + len(old)] = new


@pytest.fixture(scope="module")
def bad_ggufs(tiny_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    raw = tiny_gguf.read_bytes()
    (d / "truncated.gguf").write_bytes(raw[: len(raw) * 2 // 3])
    (d / "cut-header.gguf").write_bytes(raw[:3000])
    _patched(tiny_gguf, d / "corrupt.gguf", lambda b: b.__setitem__(slice(200, 4000), b"\xff" * 3800))
    (d / "not-a-gguf.gguf").write_text("<html>proxy error</html>\n")
    _patched(tiny_gguf, d / "wrong-eos.gguf", _wrong_eos)
    _patched(tiny_gguf, d / "other-template.gguf", _other_template)
    return {"truncated.gguf": "truncated or corrupt", "cut-header.gguf": "truncated or corrupt",
            "corrupt.gguf": "truncated or corrupt", "not-a-gguf.gguf": "not a GGUF file",
            "wrong-eos.gguf": "EOS token is '<|endoftext|>', expected '<|im_end|>'",
            "other-template.gguf": "chat template is neither Qwen's nor ChatML",
            "missing.gguf": "no such file"}, d


def test_health_models_expand_and_an_openai_client(server, tiny_gguf):
    from openai import OpenAI

    from qmd_unsloth.prompt import parse_completion

    before = server.get("/health").json()
    assert before["status"] == "ok" and before["model"] == str(tiny_gguf.resolve())
    assert before["file_type"] == "Q4_K_M" and before["load_seconds"] > 0 and before["loaded_at"]
    assert server.get("/v1/models").json()["data"][0]["id"] == tiny_gguf.name

    r = server.get("/expand", params={"q": "auth config", "max_tokens": 40, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] <= 40 and body["lines"]
    assert [(x["kind"], x["text"]) for x in body["lines"]] == parse_completion(body["text"])
    assert all(x["kind"] in ("lex", "vec", "hyde") for x in body["lines"])  # QMD's grammar
    assert 0 <= body["score"] <= 1
    again = server.get("/expand", params={"q": "auth config", "max_tokens": 40, "seed": 1}).json()
    assert again["text"] == body["text"]  # a given seed reproduces the sample
    assert server.get("/expand", params={"q": ""}).status_code == 400

    client = OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback")
    out = client.chat.completions.create(model=tiny_gguf.name, max_tokens=7,
                                         messages=[{"role": "user", "content": "/no_think Expand this search query: "
                                                                               "docker volumes"}])
    assert out.usage.completion_tokens <= 7 and out.choices[0].finish_reason in ("stop", "length")
    assert out.model == tiny_gguf.name and isinstance(out.choices[0].message.content, str)
    qmd = client.chat.completions.create(model="any", max_tokens=30, messages=[{"role": "user", "content": "x"}],
                                         extra_body={"grammar": "qmd"})
    assert parse_completion(qmd.choices[0].message.content)
    assert server.get("/health").json()["requests_served"] == before["requests_served"] + 4


def test_bad_files_are_refused_with_the_reason_and_the_old_model_keeps_serving(server, bad_ggufs):
    reasons, folder = bad_ggufs
    before = server.get("/health").json()
    for name, reason in reasons.items():
        r = server.post("/admin/reload-model", json={"path": str(folder / name)})
        assert r.status_code == 422, (name, r.text)
        assert reason in r.json()["error"]["message"], (name, r.text)
        assert server.get("/expand", params={"q": "nginx reload", "max_tokens": 8}).status_code == 200
    after = server.get("/health").json()
    assert after["model"] == before["model"] and after["reloads"] == before["reloads"]
    assert after["requests_on_this_model"] == before["requests_on_this_model"] + len(reasons)
    # the reload command says why, on one line
    r = run_module("qmd_unsloth.serve", "reload", "--model", str(folder / "truncated.gguf"), "--url", server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "reload refused (HTTP 422)" in r.stderr and "truncated or corrupt" in r.stderr


def test_concurrent_requests_during_reloads_all_succeed(server, tiny_gguf, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copyfile(tiny_gguf, other)
    paths = [other, tiny_gguf]
    before = server.get("/health").json()
    results, stop = [], threading.Event()

    def client(i):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                if i % 2:
                    r = c.get(server.url + "/expand", params={"q": f"query {i}", "max_tokens": 12})
                    results.append((r.status_code, r.json().get("model")))
                else:
                    r = c.post(server.url + "/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12})
                    results.append((r.status_code, r.json().get("model")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    reloads = []
    for k in range(4):
        time.sleep(0.3)
        reloads.append(server.post("/admin/reload-model", json={"path": str(paths[k % 2])}))
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in reloads] == [200] * 4, [r.text for r in reloads]
    assert results and [s for s, _ in results if s != 200] == []  # zero failures
    assert {m for _, m in results} == {other.name, tiny_gguf.name}  # both models served during the run
    after = server.get("/health").json()
    assert after["model"] == str(tiny_gguf.resolve()) and after["reloads"] == before["reloads"] + 4
    assert after["requests_served"] == before["requests_served"] + len(results)
    r = run_module("qmd_unsloth.serve", "reload", "--model", str(tiny_gguf), "--url", server.url)
    assert r.returncode == 0 and f"now serves {tiny_gguf.resolve()}" in r.stdout


def test_a_replaced_model_finishes_its_requests_before_it_is_closed(tiny_gguf):
    from qmd_unsloth.serve import ModelSlot, ServedModel

    slot = ModelSlot(ServedModel.load(tiny_gguf))
    old = slot.acquire()  # a request in flight on the old model
    new = ServedModel.load(tiny_gguf)
    slot.swap(new)
    assert slot.current is new and old.retired and not old.closed
    assert old.generate("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", 4)["tokens"] <= 4
    slot.release(old, served=True)
    assert old.closed and not new.closed and slot.requests_served == 1
    slot.swap(ServedModel.load(tiny_gguf))  # an idle model is closed at once
    assert new.closed
    slot.current.close()


def test_a_non_default_host_needs_a_token_which_never_reaches_the_logs(tiny_gguf, tmp_path):
    """A real server bound to a non-default address (127.0.0.2: still loopback, so no traffic leaves the machine)
    with a token.  The refusal of non-loopback clients is tested in process below, with the client address set:
    this machine's tests send traffic to loopback addresses only."""
    s = Server(tmp_path, tiny_gguf, "--host", "127.0.0.2", env={"QMD_UNSLOTH_SERVE_TOKEN": TOKEN})
    try:
        body = {"path": str(tiny_gguf)}
        ok = s.post("/admin/reload-model", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        # with a token configured, admin needs it from every client, loopback included
        refused = s.post("/admin/reload-model", json=body)
        assert refused.status_code == 401 and "this server has a token" in refused.json()["error"]["message"]
        assert s.get("/expand", params={"q": "nginx", "max_tokens": 4}).status_code == 200  # loopback: no token
        # a request through a proxy on this host carries a proxy header: not local, so the token is needed
        fwd = {"X-Forwarded-For": "203.0.113.7"}
        assert s.get("/expand", params={"q": "nginx", "max_tokens": 4}, headers=fwd).status_code == 401
        assert s.get("/expand", params={"q": "nginx", "max_tokens": 4},
                     headers={**fwd, "Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = run_module("qmd_unsloth.serve", "reload", "--model", str(tiny_gguf), "--url", s.url,
                       env={"QMD_UNSLOTH_SERVE_TOKEN": TOKEN})
        assert r.returncode == 0, r.stderr
        # a token a client wrongly puts in a URL would reach uvicorn's access log: it is redacted there too
        assert s.get("/expand", params={"q": TOKEN, "max_tokens": 4}).status_code == 200
        assert s.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()["reloads"] == 2
    finally:
        logs = s.stop()
    assert "/admin/reload-model" in logs and "200" in logs  # the log is there, and it was captured
    assert TOKEN not in logs


@pytest.mark.parametrize("header", [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7;proto=https"),
                                    ("X-Real-IP", "203.0.113.7"), ("x-forwarded-for", "127.0.0.1")])
def test_a_proxied_request_is_not_trusted_as_local(server, tiny_gguf, header):
    """A reverse proxy on the same host (nginx, Caddy, a tunnel) connects from 127.0.0.1 for every remote client and
    adds one of these headers: the server (no token configured here) must refuse admin and generation alike, with
    one line.  The headers are sent by the test client straight to the real server, as the proxy would send them."""
    before = server.get("/health").json()
    h = dict([header])
    r = server.post("/admin/reload-model", json={"path": str(tiny_gguf)}, headers=h)
    assert r.status_code == 401, r.text
    msg = r.json()["error"]["message"]
    assert msg == (f"admin calls through a proxy ({header[0].lower()} header) need a token, and this server has none "
                   "(start it with QMD_UNSLOTH_SERVE_TOKEN set)") and "\n" not in msg
    assert server.get("/expand", params={"q": "nginx", "max_tokens": 4}, headers=h).status_code == 401
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                    headers=h)
    assert r.status_code == 401
    after = server.get("/health").json()  # unproxied loopback: served; nothing was reloaded
    assert after["reloads"] == before["reloads"] and after["requests_served"] == before["requests_served"]


def test_an_over_long_prompt_is_a_400_with_one_line(server):
    long_query = " ".join(f"term{i} words" for i in range(1500))  # several thousand tokens: more than 2048
    r = server.get("/expand", params={"q": long_query, "max_tokens": 8})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("q: the query is too long: the prompt is ") and "the context holds" in msg
    assert "\n" not in msg
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_query}],
                                                  "max_tokens": 8})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("messages: the prompt is ")
    assert server.get("/expand", params={"q": "nginx", "max_tokens": 4}).status_code == 200  # still serving


def test_the_guard_with_a_non_loopback_client_address_in_process(tiny_gguf):
    """The same app through httpx's ASGI transport, with the client address set (e.g. behind a NAT or a proxy)."""
    from qmd_unsloth.serve import ModelSlot, ServedModel, create_app, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.10") and not is_loopback("10.0.0.1") and not is_loopback(None)
    slot = ModelSlot(ServedModel.load(tiny_gguf))

    async def call(client_addr, token, headers):
        app = create_app(slot, token)
        transport = httpx.ASGITransport(app=app, client=(client_addr, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            return await c.post("/admin/reload-model", json={"path": "/nonexistent.gguf"}, headers=headers)

    try:
        assert asyncio.run(call("192.0.2.10", TOKEN, {})).status_code == 401
        assert asyncio.run(call("192.0.2.10", None, {"Authorization": "Bearer "})).status_code == 401
        assert asyncio.run(call("192.0.2.10", TOKEN, {"Authorization": "Bearer x" + TOKEN})).status_code == 401
        # past the guard, the reload itself refuses the missing file
        assert asyncio.run(call("192.0.2.10", TOKEN, {"Authorization": f"Bearer {TOKEN}"})).status_code == 422
        assert asyncio.run(call("127.0.0.1", None, {})).status_code == 422  # no token configured: loopback may
        assert asyncio.run(call("127.0.0.1", TOKEN, {})).status_code == 401  # a token configured: admin needs it
        assert asyncio.run(call("127.0.0.1", None, {"X-Real-IP": "192.0.2.10"})).status_code == 401  # proxied
    finally:
        slot.current.close()


def test_non_loopback_host_without_a_token_and_a_port_in_use_are_one_line_errors(tiny_gguf):
    r = run_module("qmd_unsloth.serve", "--model", str(tiny_gguf), "--host", "0.0.0.0", timeout=60,
                   env={"QMD_UNSLOTH_SERVE_TOKEN": ""})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 is not loopback: give a token (--token or the environment variable "
        "QMD_UNSLOTH_SERVE_TOKEN) that non-loopback clients must send"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = run_module("qmd_unsloth.serve", "--model", str(tiny_gguf), "--port", str(port), timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: 127.0.0.1:{port}: address already in use; choose another --port or stop the process that holds it"]
    r = run_module("qmd_unsloth.serve", "reload", "--model", str(tiny_gguf), "--url", f"http://127.0.0.1:{port}",
                   timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cannot reach the server" in r.stderr


def test_export_reloads_the_server_and_installs_into_qmd(server, tiny_model, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "QMD_CONFIG_DIR": str(tmp_path / "qmdconf"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    (tmp_path / "qmdconf").mkdir()
    (tmp_path / "qmdconf" / "index.yml").write_text("# mine\ncollections: {}\n")
    r = run_module("qmd_unsloth.export", "--model", str(tiny_model), "--out", str(tmp_path / "gguf"),
                   "--reload", server.url, "--install-qmd", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    new = (tmp_path / "gguf" / "qmd-query-expansion-q4_k_m.gguf").resolve()
    assert f"now serves {new}" in r.stdout and server.get("/health").json()["model"] == str(new)
    placed = list((tmp_path / "data" / "qmd_unsloth" / "models").glob("qmd-query-expansion-q4_k_m-*.gguf"))
    assert len(placed) == 1 and placed[0].read_bytes() == new.read_bytes()
    index = (tmp_path / "qmdconf" / "index.yml").read_text()
    assert index.startswith("# mine\n") and f"generate: {json.dumps(str(placed[0]))}" in index
