"""Ray: a suite's plug-in reaches the Ray workers, and the local Ray instance leakbench starts listens on
127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from leakbench.running.progress import SilentProgress  # noqa: E402
from leakbench.running.runner import run_suite  # noqa: E402
from leakbench.suite import load_suite  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_plugins import PLUGIN, SUITE  # noqa: E402

HAS_PROC = Path("/proc/net/tcp").exists()


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in found} - found
        found |= new
        grew = bool(new)
    return found


def _listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state held by ``pids`` (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:
                continue
            raw = fields[1].split(":")[0]
            if width == 8:
                address = str(ipaddress.IPv4Address(bytes.fromhex(raw)[::-1]))
            else:
                words = b"".join(bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, 32, 8))
                ip6 = ipaddress.IPv6Address(words)
                address = str(ip6.ipv4_mapped or ip6)
            found.add(address)
    return found


class Sockets(SilentProgress):
    """Records the listening addresses of this process and its descendants (the Ray instance) while it runs."""

    def __init__(self):
        self.addresses: set[str] = set()

    def advance(self, status: str) -> None:
        self.addresses |= _listening_addresses(_descendants(os.getpid()))


@pytest.mark.skipif(not HAS_PROC, reason="reads the listening sockets from /proc")
def test_plugin_reaches_ray_workers_and_ray_listens_on_loopback_only(tmp_path, monkeypatch):
    module = "leakbench_test_ray_demo"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(PLUGIN.replace("plugin_", "rayplug_"))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the workers find the module through the executor alone
    suite_file = tmp_path / "plugged.toml"
    suite_file.write_text(SUITE.format(module=module).replace("plugin_", "rayplug_"))
    suite = load_suite(suite_file)
    sockets = Sockets()
    summary = run_suite(suite, out_dir=tmp_path / "out", device="cpu", executor="ray", workers=1, max_pack=1,
                        progress=sockets)
    assert not ray.is_initialized()
    assert summary.statuses == {"ok": 4}  # workers that lacked the plug-in would write error rows
    assert sockets.addresses, "no listening socket of the Ray instance was seen"
    assert all(ipaddress.ip_address(a).is_loopback for a in sockets.addresses), sockets.addresses
