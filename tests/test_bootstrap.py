"""scripts/_bootstrap.py: when the venv is (re)installed, and what the Debian step says before it
installs anything. Unit-level: a temporary directory stands for the checkout and nothing is installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bootstrap_under_test", ROOT / "scripts" / "_bootstrap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()


class Checkout:
    """A pyproject.toml and a venv directory whose installs are only recorded."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.venv = tmp_path / ".venv"
        (tmp_path / "pyproject.toml").write_text('[project]\nname = "aiservice"\n')
        self.installs: list[list[str]] = []

    def install(self, venv_dir: Path, extras: frozenset[str]) -> None:
        self.installs.append(sorted(extras))
        (venv_dir / "bin").mkdir(parents=True, exist_ok=True)
        (venv_dir / "bin" / "python").write_text("")

    def ensure(self, extras: str) -> None:
        bootstrap.ensure_venv(extras, root=self.root, venv_dir=self.venv, install=self.install)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path)


def test_test_then_dev_installs_once(checkout: Checkout) -> None:
    checkout.ensure("test")  # scripts/test.py
    checkout.ensure("")  # scripts/dev.py: the test extras include everything dev needs
    checkout.ensure("test")
    assert checkout.installs == [["test"]]


def test_dev_then_test_installs_the_missing_extra_once(checkout: Checkout) -> None:
    checkout.ensure("")
    checkout.ensure("test")
    checkout.ensure("")
    checkout.ensure("test")
    assert checkout.installs == [[], ["test"]]


def test_another_extra_keeps_those_installed_before(checkout: Checkout) -> None:
    checkout.ensure("test")
    checkout.ensure("bench")  # scripts/bench.py
    checkout.ensure("test")
    checkout.ensure("")
    assert checkout.installs == [["test"], ["bench", "test"]]


def test_a_changed_pyproject_reinstalls_with_the_extras_installed_before(checkout: Checkout) -> None:
    checkout.ensure("test")
    (checkout.root / "pyproject.toml").write_text('[project]\nname = "aiservice"\nversion = "2"\n')
    checkout.ensure("")
    checkout.ensure("test")
    assert checkout.installs == [["test"], ["test"]]


def test_a_missing_interpreter_or_an_unreadable_stamp_reinstalls(checkout: Checkout) -> None:
    checkout.ensure("")
    (checkout.venv / "bin" / "python").unlink()
    checkout.ensure("")
    (checkout.venv / bootstrap.STAMP).write_text("3f2a9c")  # the stamp of an older bootstrap
    checkout.ensure("")
    assert checkout.installs == [[], [], []]
    assert json.loads((checkout.venv / bootstrap.STAMP).read_text())["extras"] == []


class Apt:
    """subprocess.run as seen by ensure_debian_packages: commands are recorded, not run."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        # What had been printed when this command ran.
        self.calls.append((command, self.capsys.readouterr().out))
        return subprocess.CompletedProcess(command, 0)


def test_root_is_told_what_is_installed_and_why_before_apt_get_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bootstrap, "missing_debian_packages", lambda: ["pgbouncer", "jq"])
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    apt = Apt(capsys)
    monkeypatch.setattr(bootstrap.subprocess, "run", apt)

    bootstrap.ensure_debian_packages()

    assert [command for command, _ in apt.calls] == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "pgbouncer", "jq"],
    ]
    said = apt.calls[0][1]
    assert "as root" in said and "apt-get install -y pgbouncer jq" in said
    assert "pgbouncer: tests/test_pgbouncer.py" in said
    assert "jq: tests/test_readme.py" in said
    assert "chromium" not in said  # only what is missing


def test_without_root_or_sudo_it_only_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bootstrap, "missing_debian_packages", lambda: ["chromium"])
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda cmd: None)
    apt = Apt(capsys)
    monkeypatch.setattr(bootstrap.subprocess, "run", apt)

    bootstrap.ensure_debian_packages()

    assert apt.calls == []
    said = capsys.readouterr().out
    assert "apt-get install chromium" in said and "tests/test_console.py" in said


def test_every_debian_package_names_the_tests_that_need_it() -> None:
    for package, (_, _, needed_by) in bootstrap.DEBIAN_PACKAGES.items():
        assert "tests/test_" in needed_by, package
        assert (ROOT / needed_by.split()[0]).exists(), needed_by
