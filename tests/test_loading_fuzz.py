"""Fuzzing the loaders with damaged files: truncated at every kind of offset, bytes flipped in the headers, absurd
header sizes, tensor offsets that overlap or point outside the file, wrong dtypes and random bytes, as
.safetensors and as torch.save checkpoints (zip and legacy), through read_state_dict, a model folder
(from_pretrained) and from_single_file. Each must load or fail with a ValueError / FileNotFoundError that names
the file: never a crash, another exception, or an allocation of the size a corrupt header claims."""
import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from sdcore import loading

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency: `make test` installs it")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ = dict(derandomize=True, database=None, deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STATE = {"conv.weight": torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)),
         "conv.bias": torch.linspace(-1, 1, 8), "table": torch.arange(70000, dtype=torch.int64).reshape(700, 100),
         "half": torch.ones(5, 3, dtype=torch.float16)}
FORMATS = ("safetensors", "zip", "legacy")
BIT = st.integers(0, 7).map(lambda b: 1 << b)  # one flipped bit
SUFFIX = {"safetensors": ".safetensors", "zip": ".bin", "legacy": ".ckpt"}


def _save(fmt, state, path):
    if fmt == "safetensors":
        safetensors_torch.save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    for fmt in FORMATS:
        _save(fmt, STATE, root / fmt)
    return {fmt: (root / fmt).read_bytes() for fmt in FORMATS}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def regions(fmt, data):
    """(start, end) byte ranges of a file's parts, so truncations and flips reach each of them."""
    if fmt == "safetensors":
        n = 8 + int.from_bytes(data[:8], "little")
        return [(0, 8), (8, n), (n, len(data))]  # header length, JSON header, tensor data
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            directory = archive.start_dir
            pickle_end = next(m.header_offset for m in archive.infolist() if m.header_offset > 0)
        return [(0, pickle_end), (pickle_end, directory), (directory, len(data))]  # data.pkl, records, directory
    pickles = len(data) - sum(t.numel() * t.element_size() + 8 for t in STATE.values())
    return [(0, 32), (32, pickles), (pickles, len(data))]  # magic + protocol, the pickles, the storages


def offset_in(fmt, data):
    return st.sampled_from(regions(fmt, data)).flatmap(lambda r: st.integers(r[0], r[1] - 1))


def check_outcome(path, load):
    """``load()`` returns, or raises ValueError / FileNotFoundError naming ``path``; returns what it loaded."""
    try:
        return load()
    except (ValueError, FileNotFoundError) as exc:
        assert str(path) in str(exc), f"error does not name the file: {exc}"
        return None


def _assert_sane(state, path):
    """What loaded is tensors within the file's size (no view blown up past its storage)."""
    tensors = list(loading.files._stored_tensors(state))
    assert all(t.numel() * t.element_size() <= path.stat().st_size for t in tensors)


# ------------------------------------------------------------------------ read_state_dict
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_are_named(blobs, scratch, fmt):
    data = blobs[fmt]

    @settings(max_examples=40, **FUZZ)
    @given(cut=offset_in(fmt, data))
    def run(cut):
        path = scratch / f"cut{SUFFIX[fmt]}"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError) as info:
            loading.read_state_dict(path)
        assert str(info.value).startswith(f"{path}: ")

    run()


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_bytes_load_or_are_named(blobs, scratch, fmt):
    data = blobs[fmt]
    parts = regions(fmt, data)
    header = [parts[0], parts[2] if fmt == "zip" else parts[1]]  # not the tensor data

    @settings(max_examples=60, **FUZZ)
    @given(at=st.sampled_from(header).flatmap(lambda r: st.integers(r[0], r[1] - 1)), mask=BIT)
    def run(at, mask):
        damaged = bytearray(data)
        damaged[at] ^= mask
        path = scratch / f"flip{SUFFIX[fmt]}"
        path.write_bytes(bytes(damaged))
        state = check_outcome(path, lambda: loading.read_state_dict(path))
        if state is not None:
            _assert_sane(state, path)

    run()


def test_absurd_safetensors_header_lengths(blobs, scratch):
    data = blobs["safetensors"]

    @settings(max_examples=40, **FUZZ)
    @given(n=st.one_of(st.just(2**60), st.just(2**64 - 1), st.integers(len(data) - 7, 2**64 - 1)))
    def run(n):
        path = scratch / "absurd.safetensors"
        path.write_bytes(struct.pack("<Q", n) + data[8:])
        with pytest.raises(ValueError, match=rf"^{path}: corrupt or truncated safetensors file: the header claims "
                                             rf"{n} bytes but only {len(data) - 8} follow"):
            loading.read_state_dict(path)

    run()


DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F64", "F4", "X9"]


@st.composite
def safetensors_files(draw):
    """A header of 1-3 tensors over a data blob: consistent (offsets laid end to end, the blob just long enough)
    or with offsets, sizes and blob length drawn freely: overlapping, with gaps, past the end."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = (torch.Size(shape).numel() * 4) if dtype == "F32" else draw(st.integers(0, 24))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        for info in header.values():
            info["data_offsets"] = sorted(draw(st.lists(st.integers(0, offset + 8), min_size=2, max_size=2)))
        offset = draw(st.integers(0, offset + 8))
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    return struct.pack("<Q", len(text)) + text + bytes(i % 251 for i in range(offset))


def test_headers_agree_with_the_safetensors_library(scratch):
    """sdcore's pre-checks refuse exactly the headers the library refuses (and the file loads as it would)."""
    @settings(max_examples=150, **FUZZ)
    @given(blob=safetensors_files())
    def run(blob):
        try:
            want = safetensors_torch.load(blob)
        except Exception:  # noqa: BLE001 — whatever the library refuses
            want = None
        path = scratch / "made.safetensors"
        path.write_bytes(blob)
        got = check_outcome(path, lambda: loading.read_state_dict(path))
        assert (got is None) == (want is None), f"library {'refused' if want is None else 'loaded'} it, sdcore not"
        if got is not None:
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    run()


PREFIXES = [b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04", b"\x40\0\0\0\0\0\0\0{", b"\x1f\x8b",
            b"version https://git-lfs.github.com/spec/v1\n", b"<html>"]


def test_random_bytes_are_named(scratch):
    @settings(max_examples=150, **FUZZ)
    @given(prefix=st.sampled_from(PREFIXES), rest=st.binary(max_size=300),
           suffix=st.sampled_from([".safetensors", ".bin", ".ckpt", ".pt"]))
    def run(prefix, rest, suffix):
        path = scratch / f"random{suffix}"
        path.write_bytes(prefix + rest)
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            loading.read_state_dict(path)
        assert str(info.value).startswith(f"{path}: ")
        assert "Python objects" not in str(info.value)  # said only of a real pickle with non-tensor globals

    run()


# ------------------------------------------------------------------------ claimed sizes are never allocated
def _patched_zip(src, dst, old, new):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, data.replace(old, new, 1) if info.filename.endswith("data.pkl") else data)


def test_claimed_sizes_are_checked_before_allocating(blobs, tmp_path):
    """Files whose headers claim gigabytes to terabytes, loaded in a child process whose address space is capped
    at 1 GiB above what it uses after importing: allocating any claimed size would fail there with an
    allocation error instead of sdcore's message."""
    st_data, claim = blobs["safetensors"], struct.pack("<i", 2**31 - 1)
    numel = b"J" + struct.pack("<i", 70000)  # the int64 table's storage size in the pickles (BININT)
    files = {"header-2**60.safetensors": struct.pack("<Q", 2**60) + st_data[8:],
             "legacy-16GB.ckpt": blobs["legacy"].replace(numel, b"J" + claim, 1)}
    n = int.from_bytes(st_data[:8], "little")
    header = json.loads(st_data[8:8 + n])
    header["table"]["shape"], header["table"]["data_offsets"][1] = [2**40], header["table"]["data_offsets"][0] + 2**43
    text = json.dumps(header).encode()
    files["offsets-8TB.safetensors"] = struct.pack("<Q", len(text)) + text + st_data[8 + n:]
    (tmp_path / "zip.bin").write_bytes(blobs["zip"])
    _patched_zip(tmp_path / "zip.bin", tmp_path / "zip-16GB.bin", numel, b"J" + claim)
    for name, data in {**files, "warm-up.ckpt": blobs["legacy"]}.items():
        (tmp_path / name).write_bytes(data)
    names = sorted(files) + ["zip-16GB.bin"]
    child = textwrap.dedent(f"""
        import resource, sys
        import torch
        from sdcore import loading
        loading.read_state_dict({str(tmp_path / "warm-up.ckpt")!r})  # a legacy file's first load imports a lot
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        for name in {names!r}:
            try:
                loading.read_state_dict({str(tmp_path)!r} + "/" + name)
                print(name, "LOADED")
            except ValueError as exc:
                print(name, "ValueError", exc)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(loading.__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == len(names), out.stdout + out.stderr[-2000:]
    says = {"header-2**60.safetensors": f"the header claims {2**60} bytes", "legacy-16GB.ckpt": "its tensors claim",
            "offsets-8TB.safetensors": "tensor 'table': data_offsets [0, 8796093022208] point past the end",
            "zip-16GB.bin": "its tensors claim"}
    for name, line in zip(names, lines):
        assert line.startswith(f"{name} ValueError {tmp_path / name}: corrupt or truncated "), line
        assert says[name] in line.split(f"{tmp_path / name}: ", 1)[1], line


# ------------------------------------------------------------------------ wrong dtypes, through model folders
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from test_loading import write_pipeline_folder

    return write_pipeline_folder(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture(scope="module")
def originals(sd_folder):
    names = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors", "unet/config.json", "text_encoder/config.json",
             "scheduler/scheduler_config.json", "model_index.json", "tokenizer/tokenizer_config.json"]
    return {name: (sd_folder / name).read_bytes() for name in names}


def test_wrong_dtypes_in_component_files(sd_folder, originals):
    from sdcore.models import AutoencoderKL
    from sdcore.models.text_encoder import load_text_encoder

    loaders = {"vae/diffusion_pytorch_model.safetensors": lambda: AutoencoderKL.from_pretrained(sd_folder / "vae"),
               "text_encoder/model.safetensors": lambda: load_text_encoder(sd_folder)}
    keys = {name: sorted(safetensors_torch.load(originals[name])) for name in loaders}

    @settings(max_examples=12, **FUZZ)
    @given(name=st.sampled_from(sorted(loaders)), pick=st.integers(0, 10**6),
           dtype=st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e5m2]))
    def run(name, pick, dtype):
        state = safetensors_torch.load(originals[name])
        key = keys[name][pick % len(keys[name])]
        state[key] = state[key].to(dtype)
        path = sd_folder / name
        try:
            safetensors_torch.save_file(state, str(path))
            with pytest.raises(ValueError, match=rf"^{path}: wrong dtypes: {key}: file {str(dtype)[6:]} vs model "
                                                 "float32"):
                loaders[name]()
        finally:
            path.write_bytes(originals[name])

    run()


def _damage(data, how, at, mask):
    if how == "truncate":
        return data[:at % len(data)]
    if how == "flip":
        damaged = bytearray(data)
        damaged[at % min(len(data), 4096)] ^= mask  # the first 4 KiB: headers, JSON
        return bytes(damaged)
    return {"random": random.Random(at).randbytes(200), "empty": b"",
            "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1234\n",
            "html": b"<!doctype html><title>404</title>"}[how]


HOW = st.sampled_from(["truncate", "flip", "random", "empty", "lfs", "html"])


def test_damaged_pipeline_folders_name_the_file(sd_folder, originals):
    from sdcore.pipelines import StableDiffusionPipeline

    @settings(max_examples=20, **FUZZ)
    @given(name=st.sampled_from(sorted(originals)), how=HOW, at=st.integers(0, 10**6), mask=BIT)
    def run(name, how, at, mask):
        path = sd_folder / name
        damaged = _damage(originals[name], how, at, mask)
        try:
            path.write_bytes(damaged)
            if how == "flip" and name.endswith(".json"):
                # a flipped byte in JSON can make another valid config, whose problems then show up in the
                # weights: any file of the folder may be named
                try:
                    StableDiffusionPipeline.from_pretrained(sd_folder)
                except (ValueError, FileNotFoundError) as exc:
                    assert str(sd_folder) in str(exc)
                return
            outcome = check_outcome(path, lambda: StableDiffusionPipeline.from_pretrained(sd_folder))
            harmless = how == "flip" or (how == "truncate" and damaged.strip() == originals[name].strip())
            assert outcome is None or harmless, f"{how} {name} loaded"
        finally:
            path.write_bytes(originals[name])

    run()


# ------------------------------------------------------------------------ from_single_file
@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """A tiny SD 1.x checkpoint in the original LDM layout, as .safetensors and as a torch.save .ckpt."""
    from test_single_file import clip_to_ldm, unet_to_ldm, vae_to_ldm

    from sdcore import embedded
    from sdcore.models import AutoencoderKL, UNet2DConditionModel

    cfg = embedded.CONFIGS["tiny"]
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"]))
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
             **clip_to_ldm(text.state_dict(), cfg["text"]["max_position_embeddings"])}
    root = tmp_path_factory.mktemp("single")
    safetensors_torch.save_file(state, str(root / "sd.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, root / "sd.ckpt")
    return {name: (root / name).read_bytes() for name in ("sd.safetensors", "sd.ckpt")}


def test_damaged_single_files_name_the_file(single_files, scratch):
    from sdcore.pipelines import StableDiffusionPipeline

    kwargs = dict(num_heads=2, head_channels=16, vae_overrides=dict(norm_num_groups=8),
                  unet_overrides=dict(norm_num_groups=8))
    path = scratch / "sd.safetensors"
    path.write_bytes(single_files["sd.safetensors"])
    StableDiffusionPipeline.from_single_file(path, **kwargs)  # the undamaged file loads

    @settings(max_examples=20, **FUZZ)
    @given(name=st.sampled_from(sorted(single_files)), how=HOW, at=st.integers(0, 10**7), mask=BIT)
    def run(name, how, at, mask):
        path = scratch / name
        path.write_bytes(_damage(single_files[name], how, at, mask))
        pipe = check_outcome(path, lambda: StableDiffusionPipeline.from_single_file(path, **kwargs))
        assert pipe is None or how == "flip", f"{how} {name} loaded"

    run()
