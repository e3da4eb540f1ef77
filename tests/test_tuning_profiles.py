"""Profiles: loading, layering, variables, and file:line:key errors; value comparison helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.errors import BadInput
from core.host import Host
from probes.kernel_tuning import sysctld
from probes.kernel_tuning.plan import compare_key, format_mask, parse_cmdline, parse_mask, selected_word
from probes.kernel_tuning.profiles import available_profiles, load_profile

FAKE = Path(__file__).resolve().parent / "fixtures" / "proc_fake"


@pytest.fixture
def fake_host(tmp_path) -> Host:
    root = tmp_path / "root"
    shutil.copytree(FAKE, root, symlinks=True)
    return Host(root)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_builtin_profiles_load(fake_host):
    assert {"trading-latency", "cpu-isolation", "postgres-oltp"} <= set(available_profiles(host=fake_host))
    trading = load_profile("trading-latency", host=fake_host)
    keys = {item.key for item in trading.items}
    assert {"net.core.busy_poll", "kernel.numa_balancing", "vm.stat_interval", "thp_enabled",
            "cpu_governor", "cpu_dma_latency"} <= keys
    isolation = load_profile("cpu-isolation", variables={"isolated_cores": "2-3"}, host=fake_host)
    assert isolation.variables == {"isolated_cores": "2-3", "housekeeping_cores": "0-1"}
    load_profile("postgres-oltp", host=fake_host)


@pytest.mark.parametrize("body, expected", [
    ('[sysctl."vm.swappiness"]\nvalue = 10\nvlaue = 3\n', ':3: sysctl."vm.swappiness".vlaue: unknown key'),
    ('[sysctl."vm.swappiness"]\nvalue = 10\nrisk = "extreme"\n', ':3: sysctl."vm.swappiness".risk: expected one of'),
    ('[sysctl."vm.swappiness"]\nvalue = [1, 2]\n', ':2: sysctl."vm.swappiness".value: expected a string or an integer'),
    ('# comment\n\n[sysfs.thp]\npath = "/etc/passwd"\nvalue = "never"\n', ':4: sysfs.thp.path: must be an absolute path'),
    ('[bogus]\nx = 1\n', ':1: bogus: unknown key'),
    ('[sysctl."vm.swappiness"]\nwhy = "no value"\n', ':1: sysctl."vm.swappiness".value: missing required key'),
    ('[cmdline.nohz_full]\nvalue = "${nope}"\n', ':2: cmdline.nohz_full.value: unknown variable ${nope}'),
    ('[profile]\ninclude = ["does-not-exist"]\n', ':2: profile.include: included profile'),
    ('[profile]\ndescrption = "x"\n', ':2: profile.descrption: unknown key (known: description, include)'),
    ('[variables.cores]\ntype = "float"\n', ":2: variables.cores.type: expected one of cpulist, int, text, got 'float'"),
    ('[topology]\nmin_housekeeping_cores = -1\n', ':2: topology.min_housekeeping_cores: expected an integer in 0.., got -1'),
    ('[sysctl."vm.swappiness"]\nvalue = 10\noptional = "yes"\n', ":3: sysctl.\"vm.swappiness\".optional: expected true or false"),
])
def test_bad_profiles_name_file_line_and_key(tmp_path, fake_host, body, expected):
    path = write(tmp_path, "bad.toml", body)
    with pytest.raises(BadInput) as error:
        load_profile(str(path), host=fake_host)
    assert str(error.value).startswith(str(path))
    assert expected in str(error.value)


def test_toml_syntax_error_and_missing_file(tmp_path, fake_host):
    path = write(tmp_path, "broken.toml", '[sysctl."vm.swappiness"\nvalue = 1\n')
    with pytest.raises(BadInput, match=r"broken.toml: not valid TOML.*line 1"):
        load_profile(str(path), host=fake_host)
    with pytest.raises(BadInput, match="profile 'nope' not found.*known: .*trading-latency"):
        load_profile("nope", host=fake_host)


def test_variables_required_typed_and_unknown(fake_host):
    with pytest.raises(BadInput, match="needs --var isolated_cores=VALUE"):
        load_profile("cpu-isolation", host=fake_host)
    with pytest.raises(BadInput, match="--var isolated_cores: 'x-y' is not a CPU list"):
        load_profile("cpu-isolation", variables={"isolated_cores": "x-y"}, host=fake_host)
    with pytest.raises(BadInput, match=r"--var isolated_cores=9: CPU 9 is not online \(online: 0-3\)"):
        load_profile("cpu-isolation", variables={"isolated_cores": "9"}, host=fake_host)
    with pytest.raises(BadInput, match="--var bogus: profile cpu-isolation has no such variable"):
        load_profile("cpu-isolation", variables={"isolated_cores": "2", "bogus": "1"}, host=fake_host)


def test_include_layers_child_over_parent(tmp_path, fake_host):
    write(tmp_path, "base.toml", '[sysctl."vm.swappiness"]\nvalue = 10\n[sysctl."vm.stat_interval"]\nvalue = 5\n')
    write(tmp_path, "child.toml", '[profile]\ninclude = ["base"]\n[sysctl."vm.swappiness"]\nvalue = 1\n')
    profile = load_profile("child", profile_dir=tmp_path, host=fake_host)
    values = {item.key: item.fields["value"] for item in profile.items}
    assert values == {"vm.swappiness": 1, "vm.stat_interval": 5}
    assert [p.name for p in profile.files] == ["base.toml", "child.toml"]
    write(tmp_path, "loop.toml", '[profile]\ninclude = ["loop"]\n')
    with pytest.raises(BadInput, match="include cycle"):
        load_profile("loop", profile_dir=tmp_path, host=fake_host)


def test_value_comparison_helpers():
    assert compare_key(b"32768\t60999\n", "text") == compare_key(b"32768 60999", "text") == "32768 60999"
    assert compare_key(b"always [madvise] never\n", "selection") == "madvise"
    assert selected_word("never") == "never"
    assert parse_mask("ff,00000001") == [0] + list(range(32, 40))
    assert format_mask([0, 1, 2, 3]) == "f"
    assert format_mask([0, 33]) == "2,00000001"
    assert compare_key(b"f\n", "cpumask") == "0-3"
    assert compare_key(b"0,1,2\n", "cpulist") == "0-2"
    params = parse_cmdline("ro quiet isolcpus=2-3 nohz_full=3 -- init=1 quiet2")
    assert params == {"ro": None, "quiet": None, "isolcpus": "2-3", "nohz_full": "3"}


def test_sysctl_d_order_source_and_overrides(fake_host):
    assignments = sysctld.boot_assignments(fake_host)
    last = sysctld.last_assignment(assignments, "vm.swappiness")
    assert last.where == "/etc/sysctl.d/99-late.conf:1" and last.value == "60"
    assert sysctld.last_assignment(assignments, "net.core.busy_poll").where == "/etc/sysctl.d/10-base.conf:3"
    later = sysctld.overriding(assignments, "vm.swappiness")
    assert [row.file for row in later] == ["/etc/sysctl.d/99-late.conf"]
    # A same-named file in /etc masks the one in /usr/lib (sysctl.d(5)).
    usr = fake_host.path("/usr/lib/sysctl.d")
    usr.mkdir(parents=True)
    (usr / "99-late.conf").write_text("vm.swappiness = 1\n")
    (usr / "50-vendor.conf").write_text("vm.swappiness = 2\n")
    files = sysctld.boot_files(fake_host)
    assert files == ["/etc/sysctl.d/10-base.conf", "/usr/lib/sysctl.d/50-vendor.conf", "/etc/sysctl.d/99-late.conf"]


@pytest.mark.parametrize("payload, message", [(b"\x7fELF\x00\x01binary", "a binary file"),
                                              (b"[sysctl.\"vm.swappiness\"]\nwhy = '\xff'\n", "not UTF-8 text")])
def test_binary_or_non_utf8_profile_is_bad_input(tmp_path, fake_host, payload, message):
    path = tmp_path / "bin.toml"
    path.write_bytes(payload)
    with pytest.raises(BadInput, match=message):
        load_profile(str(path), host=fake_host)
