"""`mixtune doctor`: names missing optional packages and the features they rule out, and exits non-zero when the
core install is broken. A missing or broken package is simulated through the doctor's importer."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import mixtune.doctor as doctor
from mixtune.cli import main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def without(monkeypatch, module: str, error: Exception | None = None):
    """The doctor's importer, with `module` missing (or raising `error`)."""
    real = doctor.import_module

    def fake(name):
        if name == module:
            raise error or ModuleNotFoundError(f"No module named '{module}'", name=module)
        return real(name)
    monkeypatch.setattr(doctor, "import_module", fake)


def test_doctor_runs_and_reports_this_install(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    from importlib.metadata import version

    assert f"torch {version('torch')}" in out and f"transformers {version('transformers')}" in out
    assert "core install: OK" in out
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for extra in set(extras) - {"dev"}:  # every extra is checked and its feature stated
        assert f"[{extra}]" in out


def test_missing_optional_package_is_named_with_its_feature_and_fix(monkeypatch, capsys):
    without(monkeypatch, "timm")
    assert main(["doctor"]) == 0  # an optional package: the core still works
    out = capsys.readouterr().out
    assert "missing  timm" in out
    assert "missing optional packages: timm" in out.replace("flash-attn, ", "").replace(", torch-npu", "")
    line = next(i for i, s in enumerate(out.splitlines()) if s.startswith("  no   [classification]"))
    assert "pip install 'mixtune[classification]'" in out.splitlines()[line + 1]
    report = doctor.diagnose()
    assert "timm" in report.missing and report.core_ok


def test_broken_core_package_exits_non_zero(monkeypatch, capsys):
    without(monkeypatch, "peft")
    assert main(["doctor"]) == 1
    assert "core install: BROKEN (peft: not installed)" in capsys.readouterr().out
    monkeypatch.undo()
    without(monkeypatch, "accelerate", OSError("libcudart.so.12: cannot open shared object file"))
    report = doctor.diagnose()
    assert not report.core_ok
    assert [p.problem for p in report.core if p.name == "accelerate"] == [
        "installed, but importing it fails: OSError: libcudart.so.12: cannot open shared object file"]


def test_unsupported_core_version_is_broken(monkeypatch):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda d: "4.57.0" if d == "transformers" else real(d))
    report = doctor.diagnose()
    (tf,) = [p for p in report.core if p.name == "transformers"]
    assert tf.problem == "version 4.57.0 does not satisfy <6,>=5.0" and not report.core_ok


def test_every_extra_states_what_it_enables():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} <= set(doctor.EXTRA_FEATURES)
    core, from_file = doctor.requirements()
    assert set(from_file) == set(extras) and {r.name for r in core} >= {"torch", "transformers", "peft"}


def test_features_follow_the_hardware():
    core, optional = doctor.check_packages()
    cpu = {f.name: f for f in doctor.features(core, optional, doctor.Hardware())}
    gpu = {f.name: f for f in doctor.features(core, optional, doctor.Hardware(
        gpus=["NVIDIA H200 (139 GiB, compute 9.0)"], capability=(9, 0), bf16=True, flash_attention_2=True))}
    assert not cpu["bf16: true"].usable and gpu["bf16: true"].usable
    fa = doctor.HARDWARE_PACKAGES["flash-attn"]
    assert not cpu[fa].usable and "compute capability 8.0" in cpu[fa].why and gpu[fa].usable
    qlora = next(k for k in cpu if k.startswith("[qlora]"))
    if next(p for p in optional if p.name == "bitsandbytes").ok:
        assert not cpu[qlora].usable and "needs a CUDA GPU" in cpu[qlora].why and gpu[qlora].usable
    with pytest.raises(StopIteration):
        next(k for k in cpu if k.startswith("[dev]"))  # dev is the test tools, not a feature


def test_installed_metadata_gives_the_same_core_requirements(monkeypatch):
    """Outside a checkout (a wheel install) the requirements come from the installed metadata."""
    from_checkout = {r.name: str(r.specifier) for r in doctor.requirements()[0]}
    real_exists = doctor.os.path.exists
    monkeypatch.setattr(doctor.os.path, "exists", lambda p: not p.endswith("pyproject.toml") and real_exists(p))
    core, extras = doctor.requirements()
    assert {r.name: str(r.specifier) for r in core} == from_checkout
    assert "deepspeed" in {r.name for r in extras["deepspeed"]} and "mixtune" in {r.name for r in extras["dev"]}


def test_json_output_is_one_document(capsys):
    import json

    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)  # nothing an import printed is mixed in
    assert found["core_ok"] and {"gpus", "bf16", "flash_attention_2", "npu"} <= set(found["hardware"])


def test_checking_a_package_leaves_pil_open_as_it_was(tmp_path, monkeypatch):
    # ultralytics replaces PIL.Image.open when imported; a package imported only to check it must not do that
    from PIL import Image

    (tmp_path / "replaces_pil_open.py").write_text("from PIL import Image\nImage.open = lambda *a, **k: None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = Image.open
    doctor.import_module("replaces_pil_open")
    assert Image.open is before
