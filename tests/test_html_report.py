"""The HTML page of syscall paths: its structure from a synthetic trace, and a real run's page
(one traced test failing) rendered by headless Chromium, checked in its DOM and its screenshot."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_syscall_irl.report.html import TracedTest, compared_values, render
from pytest_syscall_irl.kernel.build import reference_kernel

STAGES = [
    {"name": "user", "taken": True, "note": "", "registers": {"rip": 0x401000, "rcx": 0x5}, "pt_regs": {}},
    {"name": "entry", "taken": True, "note": "", "registers": {"rip": 0xFFFFFFFF81A00000, "rcx": 0x401002},
     "pt_regs": {}},
    {"name": "iret_exit", "taken": False, "note": "left by SYSRET", "registers": {}, "pt_regs": {}},
]


class _Cells(HTMLParser):
    """Stage boxes in order, with their classes, and register cells with theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[tuple[str, str]] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-stage" in found:
            self.stages.append((str(found["data-stage"]), str(found.get("class"))))
        if tag == "td":
            self.cells.append(str(found.get("class") or ""))


def _parse(page: str) -> _Cells:
    parser = _Cells()
    parser.feed(page)
    return parser


def test_the_path_changes_and_compared_values_are_drawn() -> None:
    record = TracedTest("t.py::test_entry", "failed", "AssertionError: rip 0xffffffff81a00000 != 0xffffffff81a00001",
                        [{"title": "syscall_irl", "handler": "__x64_sys_write", "stages": STAGES}])
    parsed = _parse(render([record]))
    assert parsed.stages == [("user", "stage"), ("entry", "stage"), ("iret_exit", "stage skipped")]
    # rows: rip (user, entry), rcx (user, entry); entry's rip changed and is the compared value.
    assert parsed.cells == ["", "changed compared", "", "changed"]
    assert "left by SYSRET" in render([record])


def test_compared_values_are_the_hex_numbers_of_the_message() -> None:
    assert compared_values("RFLAGS 0x246 & FMASK 0x257fd5 at line 12") == {0x246, 0x257FD5}


def test_a_test_without_traces_is_left_out() -> None:
    assert "No test took a syscall trace" in render([TracedTest("t.py::test_plain", "passed")])


def test_the_runs_header_heads_the_page() -> None:
    page = render([], header=["syscall-irl: kernel bzImage sha256 ab12; git <none>"])
    assert '<ul class="run"><li>kernel bzImage sha256 ab12; git &lt;none&gt;</li></ul>' in page
    assert page.index('class="run"') < page.index("No test took a syscall trace")


# --- a real run, in a real browser ----------------------------------------------------------

FAILING_TRACED = '''
def test_entry_is_one_byte_later(kernel, syscall_trace):
    trace = syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    wanted = kernel.vmlinux.symbol("entry_SYSCALL_64") + 1
    assert trace["entry"]["rip"] == wanted, f"RIP {trace['entry']['rip']:#x}, expected {wanted:#x}"
'''


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGBA or RGB bytes) of an 8-bit PNG, unfiltered (RFC 2083)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    offset = 8
    idat = b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        idat += body if kind == b"IDAT" else b""
        chunks.setdefault(kind, body)
        offset += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color in (2, 6)
    size = 3 if color == 2 else 4
    raw, rows, previous = zlib.decompress(idat), [], bytearray(width * size)
    stride = width * size + 1
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1:(y + 1) * stride])
        for x in range(len(line)):
            left = line[x - size] if x >= size else 0
            up, corner = previous[x], previous[x - size] if x >= size else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                near = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))[2]
                line[x] = (line[x] + near) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def _count_color(rows: list[bytes], rgb: tuple[int, int, int], size: int) -> int:
    target = bytes(rgb)
    return sum(1 for row in rows for i in range(0, len(row), size) if row[i:i + 3] == target)


@pytest.mark.integration
def test_a_traced_failure_is_drawn_and_renders_in_headless_chromium(pytester: pytest.Pytester,
                                                                     tmp_path: Path) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/setup does)")
    pytester.makepyfile(test_traced=FAILING_TRACED)
    page = pytester.path / "paths.html"
    result = pytester.runpytest_subprocess(f"--syscall-irl-html={page}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"syscall-irl: syscall paths drawn in {page}"])
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    parsed = _parse(dom.stdout)
    names = [name for name, _ in parsed.stages]
    assert names[:3] == ["user", "entry", "after_swapgs"] and "sysretq" in names, names
    assert "changed compared" in parsed.cells  # entry's RIP: the value the assertion named
    # The page says which kernel it drew: the header's identity of the bzImage.
    reference = reference_kernel()
    assert reference is not None
    assert f"kernel bzImage sha256 {hashlib.sha256(reference.read_bytes()).hexdigest()};" in dom.stdout
    shot = tmp_path / "paths.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1400, 1000)
    size = len(rows[0]) // width
    # The stage boxes' tint and the red outline of the compared value are on screen.
    assert _count_color(rows, (0xEE, 0xF4, 0xFB), size) > 1000
    assert _count_color(rows, (0xDD, 0x22, 0x22), size) > 50
    shutil.copy(shot, pytester.path / "paths.png")
