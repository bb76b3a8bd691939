"""mmxattn.runtime.tune_cpu_allocator: freed large tensor buffers are reused instead of page-faulted afresh."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")

# What glibc reports (mallinfo2) about a fresh 30 MiB tensor and, after 96 MiB of 12 MiB activations were freed,
# about the free space kept at the top of the heap: "<tuned> <MiB in mmapped chunks> <MiB kept>".
_PROBE = textwrap.dedent(
    """
    import ctypes, sys, torch
    from mmxattn.runtime import tune_cpu_allocator
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    tuned = tune_cpu_allocator() if sys.argv[1] == "tune" else False
    before = libc.mallinfo2().hblkhd
    t = torch.empty(30 << 18)  # 30 MiB of fp32
    t.fill_(1.0)
    mapped = libc.mallinfo2().hblkhd - before
    del t
    ts = [torch.empty(3 << 20) for _ in range(8)]  # 12 MiB each
    for x in ts:
        x.fill_(1.0)
    del ts, x
    print(tuned, mapped >> 20, libc.mallinfo2().keepcost >> 20)
    """
)


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    return out[-3] == "True", int(out[-2]), int(out[-1])


def _glibc() -> bool:  # mallinfo2: glibc >= 2.33
    import platform

    lib, ver = platform.libc_ver()
    return lib == "glibc" and tuple(int(p) for p in ver.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_tuned_allocator_keeps_large_buffers_in_the_heap():
    tuned, mapped, kept = _probe("tune")
    assert tuned
    assert mapped == 0  # the 30 MiB tensor came from the heap (reusable), not from its own fresh mapping
    assert kept >= 60, kept  # freed activations stay at the top of the heap instead of going back to the kernel
    plain, mapped, _ = _probe("plain")
    assert not plain and mapped >= 30  # glibc's default: a fresh mapping, page-faulted on first write


@pytest.mark.skipif(not _glibc(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
def test_env_switch_turns_it_off():
    tuned, mapped, _ = _probe("tune", {"MMXATTN_TUNE_MALLOC": "0"})
    assert not tuned and mapped >= 30


def test_cli_and_evaluate_tune_before_they_start(monkeypatch):
    import mmxattn.evaluate as ev
    import mmxattn.lit.cli as cli

    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append("cli"))
    monkeypatch.setattr(ev, "tune_cpu_allocator", lambda: calls.append("evaluate"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert ev.main(["--ckpt", "/nonexistent/x.ckpt"]) == 2
    assert calls == ["cli", "evaluate"]
