"""Kernelspecs: the kernel.json contract, honest display names, install and replace, and
``mig-kernel install-kernelspec`` against a real broker."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager

import mig_kernel.jupyter.kernelspec
from mig_kernel.jupyter.kernelspec import (
    install_kernelspecs,
    kernel_name,
    kernelspec_plan,
    node_profiles,
)
from mig_kernel.slices import make_inventory
from mig_kernel.testing import run_cli

MIXED = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"
SIM = [("1g.10gb", "sim"), ("3g.40gb", "sim")]


def kernels_dir(prefix: Path) -> Path:
    return prefix / "share" / "jupyter" / "kernels"


def read_spec(prefix: Path, name: str) -> dict[str, Any]:
    return json.loads((kernels_dir(prefix) / name / "kernel.json").read_text())


def provisioner_config(prefix: Path, name: str) -> dict[str, Any]:
    return read_spec(prefix, name)["metadata"]["kernel_provisioner"]["config"]


def test_kernel_json_is_the_contract(tmp_path: Path) -> None:
    installed = install_kernelspecs(SIM, prefix=tmp_path, idle_timeout=600)
    assert installed == [
        (name, str(kernels_dir(tmp_path) / name))
        for name in ("mig-python3", "mig-python3-1g.10gb", "mig-python3-3g.40gb")
    ]
    assert read_spec(tmp_path, "mig-python3-1g.10gb") == {
        "argv": [sys.executable, "-m", "mig_kernel.jupyter.kernel", "-f", "{connection_file}"],
        "display_name": "GPU slice 1g.10gb (simulated)",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {
                "provisioner_name": "mig-provisioner",
                "config": {"profile": "1g.10gb", "acquire": "eager", "idle_timeout": 600},
            },
        },
    }
    any_slice = read_spec(tmp_path, "mig-python3")
    assert any_slice["display_name"] == "GPU slice (any, simulated)"
    assert any_slice["metadata"]["kernel_provisioner"]["config"] == {
        "acquire": "eager",
        "idle_timeout": 600,
    }


def test_config_holds_only_keys_with_values(tmp_path: Path) -> None:
    install_kernelspecs(SIM[:1], prefix=tmp_path, acquire="lazy")
    config = read_spec(tmp_path, "mig-python3-1g.10gb")["metadata"]["kernel_provisioner"]["config"]
    assert config == {"profile": "1g.10gb", "acquire": "lazy"}
    any_config = read_spec(tmp_path, "mig-python3")["metadata"]["kernel_provisioner"]["config"]
    assert any_config == {"acquire": "lazy"}


def test_bad_acquire_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="acquire must be one of"):
        install_kernelspecs(SIM, prefix=tmp_path, acquire="sometimes")
    assert not kernels_dir(tmp_path).exists()


def test_logos_are_mig_kernels_own(tmp_path: Path) -> None:
    """A logo of its own, so the launcher tells a GPU-slice kernel from plain Python 3."""
    import ipykernel.kernelspec

    install_kernelspecs(SIM, prefix=tmp_path)
    ours = Path(mig_kernel.jupyter.kernelspec.__file__).with_name("resources")
    ipykernels = Path(ipykernel.kernelspec.RESOURCES)
    for name in ("mig-python3", "mig-python3-3g.40gb"):
        for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
            copied = (kernels_dir(tmp_path) / name / logo).read_bytes()
            assert copied == (ours / logo).read_bytes()
            assert copied != (ipykernels / logo).read_bytes()


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        (
            [("1g.10gb", "mig"), ("3g.40gb", "mig")],
            {
                "mig-python3": "GPU slice (any)",
                "mig-python3-1g.10gb": "GPU slice 1g.10gb",
                "mig-python3-3g.40gb": "GPU slice 3g.40gb",
            },
        ),
        (
            [("gpu-1of2.40gb", "process")],
            {
                "mig-python3": "GPU slice (any)",
                "mig-python3-gpu-1of2.40gb": "GPU slice gpu-1of2.40gb (GPU share)",
            },
        ),
        (
            [("gpu.80gb", "process")],
            {
                "mig-python3": "GPU slice (any)",
                "mig-python3-gpu.80gb": "GPU slice gpu.80gb (whole GPU)",
            },
        ),
        (
            [("1g.10gb", "sim")],
            {
                "mig-python3": "GPU slice (any, simulated)",
                "mig-python3-1g.10gb": "GPU slice 1g.10gb (simulated)",
            },
        ),
        (
            [("1g.10gb", "mig"), ("gpu.80gb", "process")],
            {
                "mig-python3": "GPU slice (any)",
                "mig-python3-1g.10gb": "GPU slice 1g.10gb",
                "mig-python3-gpu.80gb": "GPU slice gpu.80gb (whole GPU)",
            },
        ),
    ],
)
def test_display_names_say_the_isolation(
    tmp_path: Path, profiles: list[tuple[str, str]], expected: dict[str, str]
) -> None:
    install_kernelspecs(profiles, prefix=tmp_path)
    manager = KernelSpecManager(kernel_dirs=[str(kernels_dir(tmp_path))])
    specs = {
        name: entry["spec"]
        for name, entry in manager.get_all_specs().items()
        if name.startswith("mig-python3")
    }
    assert {name: spec["display_name"] for name, spec in specs.items()} == expected
    for spec in specs.values():
        assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "mig-provisioner"
        assert spec["interrupt_mode"] == "signal"


def test_kernel_names_are_valid_jupyter_names() -> None:
    assert kernel_name(None) == "mig-python3"
    assert kernel_name("3G.40GB") == "mig-python3-3g.40gb"
    assert kernel_name("1g.10gb+me") == "mig-python3-1g.10gb-me"
    plan = kernelspec_plan([("1g.10gb+me", "mig"), ("gpu-1of2.40gb", "process")])
    assert [name for name, _ in plan] == [
        "mig-python3",
        "mig-python3-1g.10gb-me",
        "mig-python3-gpu-1of2.40gb",
    ]
    assert all(re.fullmatch(r"[a-z0-9._-]+", name) for name, _ in plan)
    assert plan[1][1]["metadata"]["kernel_provisioner"]["config"]["profile"] == "1g.10gb+me"


def test_reinstall_replaces_and_prune_removes_stale_profiles(tmp_path: Path) -> None:
    install_kernelspecs(SIM, prefix=tmp_path)
    stray = kernels_dir(tmp_path) / "mig-python3-1g.10gb" / "stray.txt"
    stray.write_text("left from an older install")
    foreign = kernels_dir(tmp_path) / "mig-python3-someone-elses"
    foreign.mkdir()
    (foreign / "kernel.json").write_text(json.dumps({"argv": ["x"], "display_name": "x"}))

    install_kernelspecs(SIM[:1], prefix=tmp_path, acquire="lazy", prune=True)

    assert not stray.exists()
    config = read_spec(tmp_path, "mig-python3-1g.10gb")["metadata"]["kernel_provisioner"]["config"]
    assert config["acquire"] == "lazy"
    assert not (kernels_dir(tmp_path) / "mig-python3-3g.40gb").exists()  # ours, stale: pruned
    assert foreign.is_dir()  # not launched by mig-provisioner: not ours to remove


def test_node_profiles_come_from_the_broker(make_broker) -> None:
    broker = make_broker(layout=MIXED)
    assert node_profiles(broker.connection_file) == [
        ("1g.10gb", "sim"),
        ("2g.20gb", "sim"),
        ("3g.40gb", "sim"),
    ]


def test_node_profiles_without_a_broker_discover_the_node(tmp_path: Path) -> None:
    inventory = make_inventory("auto")
    try:
        slices = sorted(inventory.slices(), key=lambda s: (s.memory_total, s.profile))
        expected = list(dict.fromkeys((s.profile, s.isolation.value) for s in slices))
    finally:
        inventory.close()
    assert node_profiles(tmp_path / "no-broker.json") == expected
    assert expected  # auto always offers something: NVML's slices or the simulated node


def cli(broker_file: Path, *args: str, **env: str) -> Any:
    return run_cli("install-kernelspec", *args, env={"MIG_KERNEL_BROKER": str(broker_file), **env})


def test_cli_installs_one_spec_per_broker_profile(make_broker, tmp_path: Path) -> None:
    broker = make_broker(layout=MIXED)
    prefix = tmp_path / "env"
    result = cli(broker.connection_file, "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines == [
        ["mig-python3", "GPU slice (any, simulated)", str(kernels_dir(prefix) / "mig-python3")],
        *(
            [
                f"mig-python3-{p}",
                f"GPU slice {p} (simulated)",
                str(kernels_dir(prefix) / f"mig-python3-{p}"),
            ]
            for p in ("1g.10gb", "2g.20gb", "3g.40gb")
        ),
    ]
    assert "is not on Jupyter's kernel path" in result.stderr


def test_cli_profile_subset_and_options(make_broker, tmp_path: Path) -> None:
    broker = make_broker(layout=MIXED)
    data_dir = tmp_path / "jupyter-data"
    result = cli(
        broker.connection_file,
        "--user",
        "--profile",
        "3g.40gb,1G.10GB",
        "--acquire",
        "lazy",
        "--idle-timeout",
        "300",
        JUPYTER_DATA_DIR=str(data_dir),
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (data_dir / "kernels").iterdir())
    assert names == ["mig-python3", "mig-python3-1g.10gb", "mig-python3-3g.40gb"]
    spec = json.loads((data_dir / "kernels" / "mig-python3-3g.40gb" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "profile": "3g.40gb",
        "acquire": "lazy",
        "idle_timeout": 300,
    }


def test_cli_unknown_profile_names_the_offered_ones(make_broker, tmp_path: Path) -> None:
    broker = make_broker(layout=MIXED)
    prefix = tmp_path / "env"
    result = cli(broker.connection_file, "--prefix", str(prefix), "--profile", "7g.80gb")
    assert result.returncode == 1
    assert "does not offer 7g.80gb; it offers 1g.10gb, 2g.20gb, 3g.40gb" in result.stderr
    assert not prefix.exists()


def test_cli_refuses_two_targets(tmp_path: Path) -> None:
    result = cli(tmp_path / "none.json", "--user", "--prefix", str(tmp_path / "env"))
    assert result.returncode == 2
    assert "give one of --user, --sys-prefix, --prefix" in result.stderr


def test_cli_multi_user_specs_name_the_nodes_broker(make_broker, tmp_path: Path) -> None:
    broker = make_broker(layout=MIXED)
    prefix = tmp_path / "env"
    given = cli(
        broker.connection_file,
        "--multi-user",
        "--broker",
        str(broker.connection_file),
        "--prefix",
        str(prefix),
    )
    assert given.returncode == 0, given.stderr
    for name in ("mig-python3", "mig-python3-2g.20gb"):
        assert provisioner_config(prefix, name)["broker"] == str(broker.connection_file)
    default = run_cli("install-kernelspec", "--multi-user", "--prefix", str(tmp_path / "sys"))
    assert default.returncode == 0, default.stderr
    assert provisioner_config(tmp_path / "sys", "mig-python3")["broker"] == (
        "/run/mig-kernel/broker.json"
    )
    single = cli(broker.connection_file, "--prefix", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    single_config = provisioner_config(tmp_path / "single", "mig-python3")
    assert "broker" not in single_config  # a user's own broker is found without one
