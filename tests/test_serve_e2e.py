"""A real `sdcore serve --arch tiny` process on a free loopback port, driven over HTTP as an A1111 client
drives it: txt2img with a batch, img2img, the samplers, progress during a run, interrupt, a full queue, a
client that goes away, SIGTERM, and a load of 50 concurrent requests against a queue of 8."""
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="sdcore serve needs the serve extra: `make test` installs fastapi")
pytest.importorskip("uvicorn", reason="sdcore serve needs the serve extra: `make test` installs uvicorn")
from serve_helpers import FAST, WEBUIAPI_IMG2IMG, WEBUIAPI_TXT2IMG, image, info, png_b64  # noqa: E402

START_TIMEOUT = 120


def _lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


class Server:
    def __init__(self, *args):
        from serve_helpers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "sdcore", "serve", "--arch", "tiny", "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.output = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            assert self.proc.poll() is None, "".join(self.output)
            try:
                self.get("/sdapi/v1/options")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start:\n" + "".join(self.output))

    def request(self, method, path, body=None, timeout=120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null"), _lower(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null"), _lower(exc.headers)

    def get(self, path):
        return self.request("GET", path)[1]

    def post(self, path, **body):
        return self.request("POST", "/sdapi/v1/" + path, body)

    def start(self, path, **body):
        """A request in a thread; the future's result is (status, body, headers)."""
        return concurrent.futures.ThreadPoolExecutor(1).submit(self.post, path, **body)

    def progress(self):
        return self.get("/sdapi/v1/progress")

    def wait(self, check, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.progress()
            if check(p):
                return p
            time.sleep(0.05)
        raise AssertionError(f"progress never satisfied the check: {p}")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server():
    s = Server("--queue", "2")
    yield s
    s.stop()


def running(p):
    return p["state"]["job_count"] > 0 and p["state"]["sampling_step"] >= 1


def test_txt2img_batch_img2img_and_samplers_as_an_a1111_client(server):
    status, body, _ = server.post("txt2img", **dict(WEBUIAPI_TXT2IMG, batch_size=3, seed=40, **FAST))
    assert status == 200, body
    meta = info(body)
    assert len(body["images"]) == 3 and meta["all_seeds"] == [40, 41, 42]
    assert [image(b).info["parameters"] for b in body["images"]] == meta["infotexts"]
    status, body, _ = server.post("img2img", **dict(WEBUIAPI_IMG2IMG, init_images=[png_b64()], steps=4,
                                                    width=64, height=64, seed=3))
    assert status == 200 and image(body["images"][0]).size == (64, 64), body
    for sampler in server.get("/sdapi/v1/samplers"):
        status, body, _ = server.post("txt2img", sampler_name=sampler["name"], steps=1, width=64, height=64)
        assert status == 200 and info(body)["sampler_name"] in sampler["name"], (sampler, body)


def test_progress_during_a_run_then_interrupt(server):
    job = server.start("txt2img", prompt="a cat", steps=150, width=64, height=64, batch_size=2)
    p = server.wait(running)
    assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0 and image(p["current_image"]).size == (8, 8)
    later = server.wait(lambda q: q["state"]["sampling_step"] > p["state"]["sampling_step"])
    assert later["progress"] > p["progress"]
    assert server.post("interrupt")[0] == 200
    status, body, _ = job.result(60)
    assert status == 200 and len(body["images"]) == 2 and info(body)["interrupted"]
    assert server.progress()["state"]["job_count"] == 0


def test_a_full_queue_is_503_and_a_client_that_leaves_frees_its_place(server):
    job = server.start("txt2img", prompt="a cat", steps=150, width=64, height=64)
    server.wait(running)
    body = json.dumps(dict(prompt="gone", **FAST)).encode()
    leaving = socket.create_connection(("127.0.0.1", server.port))
    leaving.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    staying = server.start("txt2img", prompt="a dog", seed=8, **FAST)
    server.wait(lambda q: q["state"]["queued"] == 2)
    status, refused, headers = server.post("txt2img", **FAST)
    assert status == 503 and int(headers["retry-after"]) >= 1 and refused["error"] == "HTTPException"
    leaving.close()
    server.wait(lambda q: q["state"]["queued"] == 1, timeout=10)  # its place is free again
    server.post("interrupt")
    assert job.result(60)[0] == 200
    status, body, _ = staying.result(60)
    assert status == 200 and info(body)["all_seeds"] == [8]
    assert server.post("txt2img", **FAST)[0] == 200  # still answering


def test_load_50_concurrent_requests_against_a_queue_of_8():
    """Every request gets its own image (its seed, once) or a 503; none is lost or duplicated; the server's
    resident memory after a second round of 50 is within 32 MiB of the first's (no growth per request)."""
    s = Server("--queue", "8")
    try:
        def one(seed):
            return seed, s.post("txt2img", prompt="load", seed=seed, steps=1, width=64, height=64)

        def round_of_50(base):
            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                results = list(pool.map(one, range(base, base + 50)))
            served = []
            for seed, (status, body, headers) in results:
                assert status in (200, 503), (status, body)
                if status == 200:
                    assert info(body)["all_seeds"] == [seed] and len(body["images"]) == 1
                    assert f"Seed: {seed}," in image(body["images"][0]).info["parameters"]
                    served.append(seed)
                else:
                    assert int(headers["retry-after"]) >= 1
            assert len(served) >= 9, served  # the running job and a full queue at least
            return len(served), time.monotonic() - start

        first = round_of_50(1000)
        rss_first = s.rss_kib()
        second = round_of_50(2000)
        rss_second = s.rss_kib()
        print(f"served {first[0]}/50 in {first[1]:.1f} s, then {second[0]}/50 in {second[1]:.1f} s; "
              f"VmRSS {rss_first} KiB -> {rss_second} KiB")
        assert second[1] < 60
        assert rss_second - rss_first < 32 * 1024, (rss_first, rss_second)
        assert s.progress()["state"]["queued"] == 0
    finally:
        s.stop()


def test_sigterm_finishes_the_running_job_refuses_new_ones_and_exits(server):
    """Last: it ends the module's server."""
    job = server.start("txt2img", prompt="a cat", steps=150, width=64, height=64, seed=5)
    server.wait(running)
    queued = server.start("txt2img", prompt="a dog", **FAST)
    server.wait(lambda q: q["state"]["queued"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    status, body, _ = job.result(60)
    assert status == 200 and not info(body)["interrupted"] and info(body)["all_seeds"] == [5]
    assert queued.result(60)[0] == 503
    # uvicorn re-raises the signal once its shutdown is done, so the exit status says SIGTERM
    assert server.proc.wait(30) in (0, -signal.SIGTERM), "".join(server.output)
    assert "Finished server process" in "".join(server.output)
    with pytest.raises(OSError):
        server.get("/sdapi/v1/options")
