"""The runtime registry cannot be turned against the server: path loads read only regular files under the
operator's load folders, without blocking and with a hard byte bound, and every refusal is one message that
says nothing of the server's files (whether a path exists, its size, its bytes); uploads are refused as soon
as they pass the size bound; reading happens before the registry's lock, so a stuck load holds up nothing;
listings show no paths; with --api-key every registry route needs the key; and the steer file parser, fed
thousands of mutated files, only ever accepts a valid steer or refuses with a SteerFileError.

The path probes run on the session's steer server (its load folder: pytest's temporary folder); the upload,
key and stuck-load tests on a server of the tiny Llama with --api-key and a small --max-load-size."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import (
    CPU_SERVER_ARGS,
    PROMPTS,
    SERVER_ENV,
    complete,
    load_dir_args,
    open_playground,
    random_steer,
    text_of,
)
from selenium.webdriver.common.by import By

from vllm_steer import SteerFile, SteerFileError, embedding_fingerprint
from vllm_steer.serving.load_sources import LoadRefused, path_refusal, read_under_roots
from vllm_steer.testing import ServerProcess, steer_server_command

API_KEY = "test-key-123"
LOAD_LIMIT = 256 * 1024  # the tiny server's --max-load-size: its steers are about 130 KiB


# ---------------------------------------------------------------------------- reading a path, no server


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


def test_only_regular_files_under_a_root_are_read_and_every_refusal_is_the_same(root, tmp_path):
    roots = (os.path.realpath(root),)
    (root / "ok.safetensors").write_bytes(b"the bytes")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret outside")
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo")
    os.symlink(outside, root / "link-out")
    os.symlink("/dev/zero", root / "zero")
    os.symlink(root / "ok.safetensors", root / "link-in")
    assert read_under_roots(str(root / "ok.safetensors"), roots, 100) == b"the bytes"
    assert read_under_roots(str(root / "link-in"), roots, 100) == b"the bytes"  # a link inside stays inside
    assert read_under_roots(str(root / "sub" / ".." / "ok.safetensors"), roots, 100) == b"the bytes"
    refused = [str(outside), "/etc/passwd", "/etc/no-such-file", "/dev/zero", str(root / "fifo"), str(root / "sub"),
               str(root / "link-out"), str(root / "zero"), str(root / "missing.safetensors"),
               str(root / ".." / "outside.safetensors"), f"{root}-sibling/x", "", "relative/path"]
    for path in refused:
        started = time.monotonic()
        with pytest.raises(LoadRefused) as info:
            read_under_roots(path, roots, 1 << 20)
        assert time.monotonic() - started < 5, path  # a FIFO does not wait for a writer
        assert str(info.value) == path_refusal(path, roots) and info.value.status == 400, path
        assert "secret" not in str(info.value)
    with pytest.raises(LoadRefused) as info:
        read_under_roots(str(root / "ok.safetensors"), roots, 4)
    assert info.value.status == 413  # the limit is said, not the file's size
    assert str(info.value) == (f"the steer file is larger than the {4 / 2**20:g} MiB a runtime load accepts "
                               "(--max-load-size): its bytes are sent to every worker")
    with pytest.raises(LoadRefused, match="path loads are off on this server"):
        read_under_roots(str(root / "ok.safetensors"), (), 100)


# ---------------------------------------------------------------------------- the session's server


def listed(server, headers=None) -> dict[str, dict]:
    r = httpx.get(server.url + "/steers", timeout=30, headers=headers)
    assert r.status_code == 200, r.text
    return {s["name"]: s for s in r.json()["data"]}


def test_path_probes_learn_nothing_and_change_nothing(servers, tmp_path):
    """Each probe of the issue that exposed the registry: a path outside the load folder (existing or not),
    /dev/zero, a FIFO, a folder, a symlink out of the folder, `..`, a file whose first bytes are secret. The
    answers are 400s with one message per path that says nothing of the file; the server answers well-formed
    requests with the same texts afterwards, and lists no paths."""
    s = servers["steer"]
    before = [complete(s, p, x).choices[0].text for p in PROMPTS[:2] for x in (None, {"steer_alpha": 4})]
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    outside = Path("/tmp") / f"vllm-steer-outside-{os.getpid()}.safetensors"
    outside.write_bytes(b"root:*:SECRET-OUTSIDE")
    os.symlink(outside, tmp_path / "link-out")
    (tmp_path / "secret.safetensors").write_bytes(b"root:*:SECRET-INSIDE-and-more-bytes")
    try:
        probes = {"/etc/shadow": "same", "/etc/no-such-file": "same", str(outside): "same", "/dev/zero": "same",
                  "/proc/self/environ": "same", str(tmp_path / "fifo"): "same", str(tmp_path / "folder"): "same",
                  str(tmp_path / "link-out"): "same", str(tmp_path / ".." / ".." / ".." / "etc" / "passwd"): "same",
                  str(tmp_path / "secret.safetensors"): "not a valid steer file: it is not a safetensors file"}
        for i, (path, expected) in enumerate(probes.items()):
            started = time.monotonic()
            r = httpx.post(s.url + "/load_steer", json={"name": f"probe{i}", "path": path}, timeout=60)
            assert time.monotonic() - started < 20, path
            assert r.status_code == 400, (path, r.text)
            message = r.json()["error"]["message"]
            if expected == "same":  # the server has a load folder: the refusal for any path that cannot be read
                assert message == f"cannot load the steer: {path_refusal(path, ('a load folder',))}", message
            else:
                assert message == f"cannot load steer 'probe{i}': {expected}", message
            for leak in ("SECRET", "root:", "header length", "bytes)", "No such file", "Errno"):
                assert leak not in message, (path, message)
        steers = listed(s)
        assert not any(name.startswith("probe") for name in steers) and not any("path" in v for v in steers.values())
        after = [complete(s, p, x).choices[0].text for p in PROMPTS[:2] for x in (None, {"steer_alpha": 4})]
        assert after == before
    finally:
        outside.unlink()


def test_an_upload_loads_from_python_and_from_curl(servers, output_embedding, tmp_path):
    """The file itself, as multipart/form-data: the documented Python call (httpx) and the documented curl
    command; the steer then steers, and is listed without a path."""
    s = servers["steer"]
    fp = embedding_fingerprint(output_embedding)
    random_steer(["up"], 8, 31, fp).save(tmp_path / "up.safetensors")
    random_steer(["curl"], 8, 32, fp).save(tmp_path / "curl.safetensors")
    unsteered = complete(s, PROMPTS[0], None).choices[0].text
    with open(tmp_path / "up.safetensors", "rb") as f:
        r = httpx.post(s.url + "/load_steer", data={"name": "up", "max_abs_value": "9"}, files={"file": f}, timeout=300)
    assert r.status_code == 200, r.text
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-F", "name=curl", "-F",
                           f"file=@{tmp_path / 'curl.safetensors'}", s.url + "/load_steer"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("200"), done.stdout
    try:
        steers = listed(s)
        assert steers["up"]["max_abs_value"] == 9 and "path" not in steers["up"] and "curl" in steers
        assert complete(s, PROMPTS[0], {"steer_up": 6}).choices[0].text != unsteered
        assert complete(s, PROMPTS[0], {"steer_curl": 6}).choices[0].text != unsteered
    finally:
        for name in ("up", "curl"):
            assert httpx.post(s.url + "/unload_steer", json={"name": name}, timeout=300).status_code == 200


# ---------------------------------------------------------------------------- a server with --api-key


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    folder, _, _, steer_path = tiny_model
    log = tmp_path_factory.mktemp("keyed_logs") / "server.log"
    command = steer_server_command(str(folder), {"gamma": str(steer_path)}, *CPU_SERVER_ARGS, "--enforce-eager",
                                   "--allow-runtime-updates", "--max-load-size", str(LOAD_LIMIT), "--api-key", API_KEY,
                                   "--steer-playground", *load_dir_args(tmp_path_factory))
    with ServerProcess(command, log, env=SERVER_ENV) as server:
        yield server


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def tiny_steer_bytes(tiny_model, seed: int) -> bytes:
    """A valid steer file for the tiny Llama (K=2 with a bias dim), as bytes."""
    import torch

    _, model, _, _ = tiny_model
    g = torch.Generator().manual_seed(seed)
    steer = SteerFile.create(torch.randn(2, 256, 16, generator=g) * 0.5, torch.randn(2, 256, 16, generator=g) * 0.5,
                             dim_names=[f"s{seed}", "bias"], bias_dims={"bias": 1.0}, epsilon=1e-2, base_model="tiny",
                             fingerprint=embedding_fingerprint(model.get_output_embeddings().weight.detach()))
    path = Path(f"/tmp/vllm-steer-tiny-{os.getpid()}-{seed}.safetensors")
    steer.save(path)
    try:
        return path.read_bytes()
    finally:
        path.unlink()


def upload(server, name: str, data: bytes, headers=AUTH) -> httpx.Response:
    return httpx.post(server.url + "/load_steer", data={"name": name}, files={"file": ("s.safetensors", data)},
                      headers=headers, timeout=300)


def test_every_registry_route_needs_the_key(keyed, tiny_model):
    data = tiny_steer_bytes(tiny_model, 1)
    assert httpx.get(keyed.url + "/steers", timeout=30).status_code == 401
    assert upload(keyed, "k1", data, headers={}).status_code == 401
    assert httpx.post(keyed.url + "/load_steer", json={"name": "k1", "path": "/x"}, timeout=30).status_code == 401
    assert httpx.post(keyed.url + "/unload_steer", json={"name": "gamma"}, timeout=30).status_code == 401
    for path in ("/steer_presets", "/steer_keywords?steer=gamma"):
        assert httpx.get(keyed.url + path, timeout=30).status_code == 401
    for path, body in (("/load_preset", {"name": "p", "steers": {"gamma": 1}}), ("/unload_preset", {"name": "p"})):
        assert httpx.post(keyed.url + path, json=body, timeout=30).status_code == 401
    assert listed(keyed, AUTH).keys() == {"gamma"}  # nothing was loaded or unloaded
    assert upload(keyed, "k1", data).status_code == 200
    assert httpx.post(keyed.url + "/unload_steer", json={"name": "k1"}, headers=AUTH, timeout=300).status_code == 200


def raw_request(server, body_head: bytes, declared: int | None, chunked: bool = False) -> socket.socket:
    """A POST /v1/load_steer whose multipart body is only begun: the headers and `body_head` sent, the rest never."""
    host, port = "127.0.0.1", server.port
    boundary = "vllmsteerboundary"
    head = (f"POST /v1/load_steer HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n")
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {declared}\r\n"
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(head.encode() + b"\r\n")
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n--{boundary}\r\n"
                "Content-Disposition: form-data; name=\"file\"; filename=\"s.safetensors\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + body_head
    sock.sendall(f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n" if chunked else preamble)
    return sock


def response_of(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 50:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_an_upload_over_the_limit_is_refused_before_it_is_all_read(keyed):
    """Declared too big: refused on the headers alone. Not declared (chunked) and sent on past the bound:
    refused as soon as the bound is passed, while most of the body was never sent."""
    sock = raw_request(keyed, b"", declared=100 * LOAD_LIMIT)
    try:
        answer = response_of(sock)
        assert answer.startswith(b"HTTP/1.1 413") and b"larger than the 0.25 MiB" in answer, answer[:400]
    finally:
        sock.close()
    sock = raw_request(keyed, b"\0" * (2 * LOAD_LIMIT), declared=None, chunked=True)  # twice the bound, then stop
    try:
        answer = response_of(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:400]
    finally:
        sock.close()
    assert listed(keyed, AUTH).keys() == {"gamma"}


def test_a_stuck_upload_holds_up_nothing(keyed, tiny_model):
    """An upload that stops halfway (its client never sends the rest) is read outside the registry's lock:
    meanwhile another upload loads and unloads, and the listing answers."""
    stuck = raw_request(keyed, tiny_steer_bytes(tiny_model, 2)[:1000], declared=LOAD_LIMIT)
    try:
        time.sleep(1.0)
        started = time.monotonic()
        assert upload(keyed, "fresh", tiny_steer_bytes(tiny_model, 3)).status_code == 200
        assert "fresh" in listed(keyed, AUTH)
        assert httpx.post(keyed.url + "/unload_steer", json={"name": "fresh"}, headers=AUTH, timeout=60).status_code \
            == 200
        assert time.monotonic() - started < 60
    finally:
        stuck.close()


# ---------------------------------------------------------------------------- the parser, fuzzed


def mutations(base: bytes, count: int, seed: int):
    """`count` seeded mutations of a real steer file: truncations, flipped bytes, other header lengths, edited
    header entries (dtypes, shapes, offsets, metadata values), other JSON headers, random bytes."""
    rng = random.Random(seed)
    hlen = int.from_bytes(base[:8], "little")
    header = json.loads(base[8:8 + hlen])
    body = base[8 + hlen:]
    odd_values = ["", "null", "[]", "{}", "1e999", "-1", "nan", '"x"', '{"a": [1]}', "[1,2", "5", "[null]",
                  '{"vocab_size": "x"}',
                  '{"vocab_size": 5, "hidden_size": 576, "rows": [9], "norms": [1], "sums": [1]}']
    odd_fields = [["F32"], "F16", "I64", "BOOL", "X", [], [0], [2, 576, 4], [10**12], [-1, 5], [0, 10**15], [5, 3],
                  [0, 0], None, 7]
    for _ in range(count):
        kind = rng.randrange(7)
        b = bytearray(base)
        if kind == 0:
            yield bytes(b[:rng.randrange(len(b))])
        elif kind == 1:
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif kind == 2:
            b[:8] = struct.pack("<Q", rng.choice([0, 1, hlen - 1, hlen + 1, len(b), 2**63 - 1, rng.randrange(2**64)]))
            yield bytes(b)
        elif kind in (3, 4):
            h = json.loads(json.dumps(header))
            key = rng.choice(list(h))
            if key == "__metadata__":
                h[key][rng.choice(list(h[key]))] = rng.choice(odd_values)
            else:
                h[key][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(odd_fields)
            encoded = json.dumps(h).encode()
            yield struct.pack("<Q", len(encoded)) + encoded + body
        elif kind == 5:
            encoded = json.dumps(rng.choice([[], {}, 5, "x", {"a": 1}, {"__metadata__": 5},
                                             {"__metadata__": {"format": "vllm-steer/1"}}])).encode()
            yield struct.pack("<Q", len(encoded)) + encoded + bytes(rng.randrange(256) for _ in range(64))
        else:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(200)))


FUZZ_CASES = 20_000


def test_the_parser_only_accepts_valid_steers_or_refuses(output_embedding, tmp_path):
    """FUZZ_CASES mutations of a real steer file (fingerprinted, with a bias dim): each ends in a valid steer or
    a SteerFileError, never another exception, a hang or growing memory."""
    path = tmp_path / "base.safetensors"
    random_steer(["a", "bias"], 8, 5, embedding_fingerprint(output_embedding), bias_dims={"bias": 1.0},
                 max_abs_value=9.0).save(path)
    base = path.read_bytes()
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted = refused = 0
    slowest = 0.0
    for data in mutations(base, FUZZ_CASES, seed=0):
        started = time.monotonic()
        try:
            steer = SteerFile.from_bytes(data)
            assert steer.projector1.shape == steer.projector2.shape == (2, 576, 8)
            accepted += 1
        except SteerFileError as e:
            assert e.check and "\n" not in e.check
            refused += 1
        slowest = max(slowest, time.monotonic() - started)
    assert accepted + refused == FUZZ_CASES and refused > FUZZ_CASES // 2
    assert slowest < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024 < 100  # MiB


HTTP_FUZZ_CASES = 300


def test_mutated_uploads_get_a_200_or_a_clear_refusal(keyed, tiny_model):
    """HTTP_FUZZ_CASES mutated uploads of a real tiny-model steer: every answer is a 200 (then unloaded) or a 400
    or 413 with a message, never a 500; the server serves as before afterwards."""
    base = tiny_steer_bytes(tiny_model, 4)
    before = listed(keyed, AUTH)

    async def run() -> dict[int, int]:
        statuses: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=keyed.url, headers=AUTH, timeout=300) as client:
            for i, data in enumerate(mutations(base, HTTP_FUZZ_CASES, seed=1)):
                r = await client.post("/load_steer", data={"name": f"f{i}"}, files={"file": ("s.safetensors", data)})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code in (200, 400, 413), (i, r.status_code, r.text)
                if r.status_code == 200:
                    assert (await client.post("/unload_steer", json={"name": f"f{i}"})).status_code == 200
                else:
                    assert r.json()["error"]["message"]
        return statuses

    statuses = asyncio.run(run())
    assert sum(statuses.values()) == HTTP_FUZZ_CASES and statuses.get(400, 0) > HTTP_FUZZ_CASES // 2, statuses
    assert listed(keyed, AUTH).keys() == before.keys()


def test_the_playground_needs_the_key_in_its_address_and_sends_it_on(keyed, browser):
    page = keyed.url.removesuffix("/v1") + "/playground"
    for address in (page, page + "?key=wrong", page + "?key=" + API_KEY[:-1]):
        r = httpx.get(address, timeout=30)
        assert r.status_code == 401 and "?key=YOUR_API_KEY" in r.text
    assert httpx.get(page, params={"key": API_KEY}, timeout=30).status_code == 200
    open_playground(browser, keyed, key=API_KEY)  # the page's own API calls carry the key
    bound = listed(keyed, AUTH)["gamma"]["max_abs_value"]
    assert float(browser.find_element(By.ID, "slider-gamma").get_attribute("max")) == bound
    assert text_of(browser, "error") == ""
