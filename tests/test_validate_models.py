"""Component-level `sdcore validate --arch`: passes on the embedded model, fails by name on a wrong kernel."""
import pytest

from sdcore import cli, validate_models

ARGS = ["validate", "--arch", "tiny", "--size", "64x64", "--steps", "2"]


def _rows(text):
    return {line.split()[0]: line for line in text.splitlines() if line.endswith(("PASS", "FAIL"))}


def test_components_pass_on_the_embedded_model(capsys):
    assert cli.main(ARGS) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"text_encoder", "unet", "vae_decode", "image"}
    assert all(r.endswith("PASS") for r in rows.values())
    assert float(rows["image"].split()[4]) >= 60  # PSNR column


@pytest.mark.parametrize("component,perturb", [("unet", lambda t: t * 1.001), ("image", lambda t: (t + 0.01))])
def test_a_perturbed_kernel_result_fails_by_name(capsys, monkeypatch, component, perturb):
    monkeypatch.setattr(validate_models, "PERTURB", {component: perturb})
    assert cli.main(ARGS) == 1
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows[component].endswith("FAIL")
    assert all(r.endswith("PASS") for name, r in rows.items() if name != component)
    assert out.strip().splitlines()[-1] == f"3 passed, 1 failed: {component}"


def test_bad_size_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own error: the --size type checks it
        cli.main(["validate", "--arch", "tiny", "--size", "63x64"])
    assert exc.value.code == 2 and "multiples of 8" in capsys.readouterr().err
