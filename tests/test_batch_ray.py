"""`sdcore batch --engine ray` on a real local Ray (one session for the module, 2 CPUs): Ray Data actors make
the same files as the local engine for any worker count, a CLI driver joins the running cluster with
--address, and a worker process killed mid-run has its prompts made exactly once. The session is shut down
at the end and no process of it is left behind."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdcore import cli
from sdcore.batch.worker import Worker

ray = pytest.importorskip("ray", reason="ray[data] is a test dependency: `make test` installs it")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--size", "64x64", "--no-progress", "--batch-size", "2"]
PROMPTS = [{"prompt": "a red car", "seed": 7, "n": 2}, {"prompt": "a cat", "negative_prompt": "blurry", "n": 3},
           {"prompt": "a dog", "scheduler": "euler-a", "n": 2}, {"prompt": "a bird"}]


def _descendants(pid: int) -> set:
    """Every live process below ``pid`` (from /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module. Its workers import this checkout's sdcore (PYTHONPATH), and this module
    travels to them by value (the test's Worker subclass)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = _descendants(os.getpid())
    assert started, "ray.init started no processes"
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
        deadline = time.monotonic() + 30
        while started & _descendants(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not started & _descendants(os.getpid()), "Ray left processes behind"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def local(prompts, tmp_path_factory):
    """The local engine's folder (1 thread, as each CPU Ray worker runs): the reference."""
    out = tmp_path_factory.mktemp("local")
    assert cli.main(["batch", str(prompts), "--out", str(out), *FAST, "--threads", "1"]) == 0
    return out


def files(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


def test_two_ray_workers_make_the_local_engines_files(local_ray, prompts, local, tmp_path, capsys):
    out = tmp_path / "ray"
    assert cli.main(["batch", str(prompts), "--out", str(out), *FAST, "--engine", "ray", "--workers", "2"]) == 0
    assert "8 made, 0 skipped (already present), 0 failed" in capsys.readouterr().out
    assert len(files(local)) == 8 and files(out) == files(local)
    assert (out / "manifest.jsonl").read_bytes() == (local / "manifest.jsonl").read_bytes()
    assert json.loads((out / "batch.json").read_text()) == json.loads((local / "batch.json").read_text())


def test_a_cli_driver_joins_the_cluster_with_address_and_one_worker(local_ray, prompts, local, tmp_path):
    out = tmp_path / "joined"
    run = subprocess.run([sys.executable, "-m", "sdcore", "batch", str(prompts), "--out", str(out), *FAST,
                          "--engine", "ray", "--address", local_ray, "--workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 made" in run.stdout and files(out) == files(local)
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # the cluster outlived its driver


class DiesOnce(Worker):
    """A worker whose process exits (os._exit: no cleanup, no exception for Ray to catch) on the first call
    that comes after two images are done, in whichever worker that is; a marker file makes it once per run.
    Every image it generates is logged."""

    marker = log = None  # set by the test; the class travels to the workers by value

    def __call__(self, batch):
        done = Path(self.log).read_text().count("\n") if os.path.exists(self.log) else 0
        if done >= 2:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        out = super().__call__(batch)
        with open(self.log, "a") as f:
            f.write("".join(f"{name}\n" for name in out["name"]))
        return out


def test_a_worker_killed_mid_run_has_its_prompts_made_exactly_once(local_ray, prompts, local, tmp_path, capsys):
    from sdcore import batch

    DiesOnce.marker, DiesOnce.log = str(tmp_path / "died"), str(tmp_path / "generated.log")
    out = tmp_path / "ray"
    args = cli.build_parser().parse_args(["batch", str(prompts), "--out", str(out), *FAST, "--engine", "ray",
                                          "--workers", "2"])
    args.arch = "tiny"
    assert batch.run(args, worker_cls=DiesOnce) == 0
    assert Path(DiesOnce.marker).exists()  # a worker did die
    generated = Path(DiesOnce.log).read_text().split()
    assert sorted(generated) == sorted(files(local))  # every image generated once, none twice
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == sorted(files(local))
    assert files(out) == files(local)
    assert "8 made" in capsys.readouterr().out
