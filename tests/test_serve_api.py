"""sdcore serve's API through FastAPI's test client: every endpoint, A1111's fields and defaults, every
refusal (422 naming the field), the queue (progress, interrupt, skip, 503), auth and the body cap, and that
the images are `sdcore generate`'s, pixel for pixel and parameters for parameters."""
import threading
import time

import numpy as np
import pytest
from safetensors.torch import save_file

pytest.importorskip("fastapi", reason="sdcore serve needs the serve extra: `make test` installs fastapi")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx: `make test` installs it")
from fastapi.testclient import TestClient  # noqa: E402

from sdcore import cli, embedded, outputs  # noqa: E402
from sdcore.serve.app import create_app  # noqa: E402
from sdcore.serve.requests import Limits  # noqa: E402
from sdcore.serve.runner import Engine  # noqa: E402
from serve_helpers import FAST, WEBUIAPI_IMG2IMG, WEBUIAPI_TXT2IMG, image, info, pixels, png_b64  # noqa: E402

LIMITS = Limits(max_steps=200, max_side=512, max_batch_pixels=4 * 128 * 128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from test_lora import _kohya

    root = tmp_path_factory.mktemp("serve")
    (root / "loras").mkdir()
    save_file(_kohya(embedded.build("tiny"), 16, conv=True), root / "loras" / "style.safetensors")
    (root / "outside.safetensors").write_bytes((root / "loras" / "style.safetensors").read_bytes())
    (root / "loras" / "escape.safetensors").symlink_to(root / "outside.safetensors")
    return root


@pytest.fixture(scope="module")
def client(folders):
    engine = Engine(arch="tiny", lora_dir=folders / "loras", outdir=folders / "saved")
    app = create_app(engine, queue_size=1, limits=LIMITS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.queue.close()


def post(client, path, **body):
    return client.post(f"/sdapi/v1/{path}", json=body)


def fields(response) -> dict:
    """{field: message} of a 422 in FastAPI's shape."""
    assert response.status_code == 422, response.text
    return {".".join(map(str, e["loc"][1:])): e["msg"] for e in response.json()["detail"]}


def test_txt2img_batch_and_iterations_answer_as_a1111(client):
    r = post(client, "txt2img", prompt="a cat", negative_prompt="dog", seed=11, batch_size=2, n_iter=2,
             cfg_scale=6, sampler_name="Euler", **FAST)
    assert r.status_code == 200, r.text
    body = r.json()
    meta = info(body)
    assert len(body["images"]) == 4 and body["parameters"]["prompt"] == "a cat"
    assert meta["seed"] == 11 and meta["all_seeds"] == [11, 12, 13, 14]
    assert meta["all_prompts"] == ["a cat"] * 4 and meta["all_negative_prompts"] == ["dog"] * 4
    assert (meta["sampler_name"], meta["steps"], meta["cfg_scale"], meta["width"], meta["height"]) == \
        ("Euler", 2, 6.0, 64, 64)
    for i, b64 in enumerate(body["images"]):
        assert image(b64).info["parameters"] == meta["infotexts"][i]
        assert f"Seed: {11 + i}," in meta["infotexts"][i] and "Sampler: euler," in meta["infotexts"][i]
    assert len({pixels(b).tobytes() for b in body["images"]}) == 4
    random_seed = info(post(client, "txt2img", prompt="a cat", seed=-1, batch_size=2, **FAST).json())
    assert random_seed["seed"] >= 0 and random_seed["all_seeds"] == [random_seed["seed"], random_seed["seed"] + 1]


def test_same_settings_and_seed_give_sdcore_generates_pixels_and_parameters(client, tmp_path):
    body = post(client, "txt2img", prompt="a red fox", negative_prompt="blur", seed=5, steps=3, width=64,
                height=64, cfg_scale=6.5, sampler_name="DPM++ 2M", scheduler="Karras").json()
    out = tmp_path / "generate.png"
    assert cli.main(["generate", "a red fox", "--negative-prompt", "blur", "--seed", "5", "--steps", "3",
                     "--size", "64x64", "--guidance", "6.5", "--scheduler", "dpm++2m-karras", "--no-progress",
                     "--out", str(out)]) == 0
    assert np.array_equal(pixels(body["images"][0]), np.asarray(image_file(out)))
    assert image(body["images"][0]).info["parameters"] == outputs.read_parameters(out)

    init = png_b64(seed=3)
    (tmp_path / "init.png").write_bytes(__import__("base64").b64decode(init))
    body = post(client, "img2img", prompt="a fox", init_images=["data:image/png;base64," + init], seed=7,
                denoising_strength=0.5, sampler_name="DDIM", steps=4, width=64, height=64).json()
    out = tmp_path / "img2img.png"
    assert cli.main(["generate", "a fox", "--init-image", str(tmp_path / "init.png"), "--strength", "0.5",
                     "--seed", "7", "--steps", "4", "--size", "64x64", "--guidance", "7", "--scheduler", "ddim",
                     "--no-progress", "--out", str(out)]) == 0
    assert np.array_equal(pixels(body["images"][0]), np.asarray(image_file(out)))
    assert image(body["images"][0]).info["parameters"] == outputs.read_parameters(out)


def image_file(path):
    from PIL import Image

    with Image.open(path) as picture:
        return picture.convert("RGB")


@pytest.mark.parametrize("sampler, scheduler, expected", [
    ("Euler a", None, "euler-a"), ("Euler", "automatic", "euler"), ("LMS", None, "lms"), ("DDIM", None, "ddim"),
    ("PLMS", None, "pndm"), ("DPM++ 2M", None, "dpm++2m-karras"), ("DPM++ 2M", "Karras", "dpm++2m-karras"),
    ("DPM++ 2M Karras", None, "dpm++2m-karras"), ("k_euler_a", None, "euler-a")])
def test_a1111_samplers_run_on_sdcores_schedulers(client, sampler, scheduler, expected):
    r = post(client, "txt2img", prompt="a cat", seed=1, sampler_name=sampler, scheduler=scheduler, **FAST)
    assert r.status_code == 200, r.text
    assert f"Sampler: {expected}," in info(r.json())["infotexts"][0]


def test_sampler_index_is_used_without_sampler_name_and_euler_is_the_default(client):
    assert "Sampler: lms," in info(post(client, "txt2img", sampler_index="LMS", **FAST).json())["infotexts"][0]
    assert info(post(client, "txt2img", **FAST).json())["sampler_name"] == "Euler"


def test_the_payloads_a1111_clients_send_by_default_work(client):
    body = dict(WEBUIAPI_TXT2IMG, **FAST)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Sampler: euler-a," in info(r.json())["infotexts"][0]
    body = dict(WEBUIAPI_IMG2IMG, init_images=[png_b64()], steps=4, width=64, height=64)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["init_images"] is None  # include_init_images is false
    assert "Denoising strength: 0.75" in info(r.json())["infotexts"][0]


def test_eta_is_ddims_and_is_recorded(client):
    def run(eta):
        return post(client, "txt2img", prompt="a cat", seed=2, sampler_name="DDIM", eta=eta, **FAST).json()

    zero, half = run(0.0), run(0.5)
    assert not np.array_equal(pixels(zero["images"][0]), pixels(half["images"][0]))
    assert "Eta DDIM: 0.5" in info(half)["infotexts"][0] and "Eta" not in info(zero)["infotexts"][0]
    assert "Euler a" in fields(post(client, "txt2img", sampler_name="Euler a", eta=0.5, **FAST))["eta"]


REFUSED = [
    ("txt2img", {"enable_hr": True}, "enable_hr", "hires fix"),
    ("txt2img", {"restore_faces": True}, "restore_faces", "face restoration"),
    ("txt2img", {"tiling": True}, "tiling", "tiling"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", "scripts"),
    ("txt2img", {"script_name": "x/y/z plot"}, "script_name", "scripts"),
    ("txt2img", {"styles": ["cinematic"]}, "styles", "styles"),
    ("txt2img", {"subseed_strength": 0.3}, "subseed_strength", "variation"),
    ("txt2img", {"seed_resize_from_h": 64, "seed_resize_from_w": 64}, "seed_resize_from_h", "resizing"),
    ("txt2img", {"s_churn": 0.5}, "s_churn", "churn"),
    ("txt2img", {"refiner_checkpoint": "sdxl_refiner"}, "refiner_checkpoint", "refiner"),
    ("txt2img", {"sampler_name": "Heun"}, "sampler_name", "not one sdcore has"),
    ("txt2img", {"sampler_index": "Heun", "sampler_name": None}, "sampler_index", "not one sdcore has"),
    ("txt2img", {"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler", "not one sdcore runs"),
    ("txt2img", {"scheduler": "Exotic"}, "scheduler", "not an A1111 scheduler"),
    ("txt2img", {"width": 60}, "width", "multiple of 8"),
    ("txt2img", {"height": 1024}, "height", "8..512"),
    ("txt2img", {"steps": 201}, "steps", "1..200"),
    ("txt2img", {"steps": 0}, "steps", "1..200"),
    ("txt2img", {"batch_size": 5, "width": 128, "height": 128}, "batch_size", "limit of 65536 pixels"),
    ("txt2img", {"n_iter": 101}, "n_iter", "1..100"),
    ("txt2img", {"cfg_scale": 101}, "cfg_scale", "[0, 100]"),
    ("txt2img", {"seed": -2}, "seed", "integer in"),
    ("txt2img", {"override_settings": {"sd_vae": "my.vae.pt"}}, "override_settings.sd_vae", "own VAE"),
    ("txt2img", {"override_settings": {"outdir_samples": "/tmp"}}, "override_settings.outdir_samples", "not one"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../model"}}, "override_settings.sd_model_checkpoint",
     "path separator"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": ".."}}, "override_settings.sd_model_checkpoint",
     "'..'"),
    ("txt2img", {"prompt": "a <lora:nope:1>"}, "prompt", "not one of the available"),
    ("txt2img", {"prompt": "a <lora:../loras/style:1>"}, "prompt", "path separator"),
    ("txt2img", {"prompt": "a <lora:escape:1>"}, "prompt", "not one of the available"),
    ("txt2img", {"prompt": "a <lora:style:99>"}, "prompt", "[-10, 10]"),
    ("txt2img", {"prompt": "a <hypernet:x:1>"}, "prompt", "only <lora"),
    ("img2img", {"init_images": [png_b64()], "mask": png_b64()}, "mask", "inpainting"),
    ("img2img", {"init_images": [png_b64()], "resize_mode": 2}, "resize_mode", "just resize"),
    ("img2img", {}, "init_images", "one init image"),
    ("img2img", {"init_images": [png_b64(), png_b64()]}, "init_images", "one init image"),
    ("img2img", {"init_images": ["data:image/png;base64,@@@"]}, "init_images.0", "not valid base64"),
    ("img2img", {"init_images": ["aGVsbG8gd29ybGQ="]}, "init_images.0", "not an image"),
    ("img2img", {"init_images": [png_b64(size=(600, 600))]}, "init_images.0", "over the 262144 pixels"),
    ("img2img", {"init_images": [png_b64()], "denoising_strength": 0.1}, "denoising_strength", "no step"),
    ("img2img", {"init_images": [png_b64()], "denoising_strength": 1.5}, "denoising_strength", "[0, 1]"),
]


@pytest.mark.parametrize("path, change, field, words", REFUSED, ids=[f"{r[0]}-{r[2]}" for r in REFUSED])
def test_what_sdcore_does_not_do_is_refused_naming_the_field(client, path, change, field, words):
    got = fields(post(client, path, **{**FAST, **change}))
    assert field in got and words in got[field], got


@pytest.mark.parametrize("body, field", [({"steps": "many"}, "steps"), ({"width": 64.5}, "width"),
                                         ({"prompt": ["a", "b"]}, "prompt"), ({"seed": None}, "seed"),
                                         ({"override_settings": []}, "override_settings")])
def test_wrong_types_are_422_in_fastapis_shape(client, body, field):
    r = post(client, "txt2img", **body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text


def test_no_input_gives_a_500_and_the_server_keeps_serving(client):
    bodies = [b"", b"{", b"[]", b"null", b'"x"', b"{\"steps\": 1e999}", b'{"seed": 99999999999999999999999}',
              b'{"width": -8}', b'{"n_iter": 0}', b'{"override_settings": {"CLIP_stop_at_last_layers": 99}}',
              b'{"prompt": "\\u0000<lora:\\u0000:1>"}', b'{"override_settings": {"eta_ddim": "x"}}',
              b'{"init_images": [null]}', b'{"steps": 1000, "width": 64, "height": 64}']
    for path in ("txt2img", "img2img"):
        for body in bodies:
            r = client.post(f"/sdapi/v1/{path}", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code in (200, 422), (path, body, r.status_code, r.text)
            assert "Traceback" not in r.text
    assert post(client, "txt2img", **FAST).status_code == 200


def test_options_clip_skip_and_override_settings(client):
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == "embedded tiny" and opts["CLIP_stop_at_last_layers"] == 1
    body = post(client, "txt2img", seed=4, override_settings={"CLIP_stop_at_last_layers": 2}, **FAST).json()
    assert "Clip skip: 2" in info(body)["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # restored afterwards
    plain = post(client, "txt2img", seed=4, **FAST).json()
    assert not np.array_equal(pixels(body["images"][0]), pixels(plain["images"][0]))
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    got = fields(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd", "nope": 1}))
    assert "path separator" in got["sd_model_checkpoint"] and "not one sdcore serve has" in got["nope"]


def test_lists_loras_samplers_schedulers_scripts_and_models(client):
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["style"]  # not the symlink out
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "Euler", "LMS", "DDIM", "PLMS", "DPM++ 2M"} <= set(names)
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/sd-models").json()[0]["title"] == "embedded tiny"
    page = client.get("/")
    assert page.status_code == 200 and "Generate" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    r = client.get("/sdapi/v1/nothing")
    assert r.status_code == 404 and set(r.json()) == {"error", "detail", "body", "errors"}


def test_a_lora_in_the_prompt_changes_the_image_and_is_recorded(client, folders):
    import hashlib

    sha = hashlib.sha256((folders / "loras" / "style.safetensors").read_bytes()).hexdigest()[:12]
    plain = post(client, "txt2img", prompt="a cat", seed=3, **FAST).json()
    styled = post(client, "txt2img", prompt="a cat <lora:style:0.8>", seed=3, **FAST).json()
    text = info(styled)["infotexts"][0]
    assert text.startswith("a cat <lora:style:0.8>\n")
    assert f'Lora hashes: "style: {sha}"' in text and 'Lora weights: "style: 0.8"' in text
    assert not np.array_equal(pixels(plain["images"][0]), pixels(styled["images"][0]))
    again = post(client, "txt2img", prompt="a cat", seed=3, **FAST).json()  # unloaded: the original weights
    assert np.array_equal(pixels(plain["images"][0]), pixels(again["images"][0]))


def test_send_images_and_save_images(client, folders):
    body = post(client, "txt2img", seed=9, send_images=False, save_images=True, **FAST).json()
    assert body["images"] == [] and len(info(body)["infotexts"]) == 1
    saved = sorted((folders / "saved").glob("*-9.png"))
    assert saved and outputs.read_parameters(saved[-1]) == info(body)["infotexts"][0]


def _start(client, path="txt2img", **body):
    """A request running in a thread; returns (thread, box with its response)."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", post(client, path, **body)))
    thread.start()
    return thread, box


def _wait_for_step(client, job_no=0, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["job_no"] == job_no and p["state"]["sampling_step"] >= 1:
            return p
        time.sleep(0.05)
    raise AssertionError("the job never reached its first step")


def test_progress_interrupt_and_the_images_so_far(client):
    thread, box = _start(client, prompt="a cat", seed=1, steps=150, width=64, height=64, batch_size=2, n_iter=3)
    p = _wait_for_step(client)
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] == 3 and p["state"]["sampling_steps"] == 150
    assert image(p["current_image"]).size == (8, 8)  # the latent preview
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    body = box["r"].json()
    assert box["r"].status_code == 200 and len(body["images"]) == 2 and info(body)["interrupted"]
    assert pixels(body["images"][0]).std() > 0
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_ends_only_the_current_batch(client):
    thread, box = _start(client, prompt="a cat", seed=1, steps=150, width=64, height=64, n_iter=2)
    _wait_for_step(client)
    client.post("/sdapi/v1/skip")
    _wait_for_step(client, job_no=1)  # the second batch starts
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    assert len(box["r"].json()["images"]) == 2 and info(box["r"].json())["all_seeds"] == [1, 2]


def test_a_full_queue_answers_503_with_retry_after(client):
    running, first = _start(client, prompt="a cat", steps=150, width=64, height=64)
    _wait_for_step(client)
    waiting, second = _start(client, prompt="a dog", seed=3, **FAST)
    for _ in range(100):
        if client.get("/sdapi/v1/progress").json()["state"]["queued"] == 1:
            break
        time.sleep(0.05)
    r = post(client, "txt2img", **FAST)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "full" in r.json()["detail"]
    client.post("/sdapi/v1/interrupt")
    running.join(60)
    waiting.join(60)
    assert first["r"].status_code == 200 and second["r"].status_code == 200
    assert info(second["r"].json())["all_seeds"] == [3] and not info(second["r"].json())["interrupted"]


def test_basic_auth_and_the_body_cap():
    app = create_app(Engine(arch="tiny"), credentials=[("ann", "s3cret")], max_body=4096)
    with TestClient(app, raise_server_exceptions=False) as c:
        for auth in (None, ("ann", "wrong"), ("bob", "s3cret")):
            r = c.get("/sdapi/v1/options", auth=auth)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), auth
        assert c.get("/", auth=("ann", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/options", auth=("ann", "s3cret")).status_code == 200
        big = {"prompt": "x" * 5000}
        r = c.post("/sdapi/v1/txt2img", json=big, auth=("ann", "s3cret"))
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b" " * 1000
        r = c.post("/sdapi/v1/txt2img", content=chunks(), auth=("ann", "s3cret"))
        assert r.status_code == 413
    app.state.queue.close()


def test_a_closed_queue_refuses_new_jobs(folders):
    app = create_app(Engine(arch="tiny"))
    app.state.queue.close()
    with TestClient(app) as c:
        r = post(c, "txt2img", **FAST)
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]


def test_models_dir_switches_by_name_and_nothing_leads_outside_it(tmp_path):
    import torch
    from test_pipeline import _diffusers_pipeline

    models = tmp_path / "models"
    first = _diffusers_pipeline()
    first.save_pretrained(models / "alpha", safe_serialization=True)
    with torch.no_grad():
        for p in first.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    first.save_pretrained(tmp_path / "outside", safe_serialization=True)
    first.save_pretrained(models / "beta", safe_serialization=True)
    (models / "gamma").symlink_to(tmp_path / "outside")  # a symlink out of the folder: never listed
    (models / "notes.txt").write_text("not a model")
    app = create_app(Engine(models_dir=models), limits=LIMITS)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert [m["title"] for m in c.get("/sdapi/v1/sd-models").json()] == ["alpha", "beta"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha"  # the first, at start
        alpha = post(c, "txt2img", seed=1, **FAST).json()
        assert f"Model: {models / 'alpha'}" in info(alpha)["infotexts"][0]
        beta = post(c, "txt2img", seed=1, override_settings={"sd_model_checkpoint": "beta"}, **FAST).json()
        assert f"Model: {models / 'beta'}" in info(beta)["infotexts"][0]
        assert not np.array_equal(pixels(alpha["images"][0]), pixels(beta["images"][0]))
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "alpha"  # restored afterwards
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta [0123456789]"}).status_code == 200
        again = post(c, "txt2img", seed=1, **FAST).json()
        assert np.array_equal(pixels(again["images"][0]), pixels(beta["images"][0]))
        for name, words in (("gamma", "not one of the available"), ("../outside", "path separator"),
                            (str(tmp_path / "outside"), "path separator"), ("notes", "not one of the available")):
            got = fields(c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}))
            assert words in got["sd_model_checkpoint"], (name, got)
    app.state.queue.close()


def test_serve_command_line_errors_are_one_line_exit_2(tmp_path, capsys):
    from sdcore.serve import server

    assert cli.main(["serve", "--models-dir", str(tmp_path / "none")]) == 2
    assert cli.main(["serve", "--lora-dir", str(tmp_path / "none")]) == 2
    assert cli.main(["serve", "--api-auth", "nopassword"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"sdcore serve: --models-dir {tmp_path / 'none'}: no such folder",
                   f"sdcore serve: --lora-dir {tmp_path / 'none'}: no such folder",
                   "sdcore serve: --api-auth takes USER:PASSWORD (comma-separated for several), got 'nopassword'"]
    with pytest.raises(SystemExit):
        cli.main(["serve", "--queue", "0"])
    assert server.parse_credentials("a:b, c:d:e") == [("a", "b"), ("c", "d:e")]
    assert [server.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "192.168.1.2")] == \
        [True, True, True, False, False]
