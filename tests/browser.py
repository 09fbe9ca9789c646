"""A headless Chromium of a test's own, driven over the DevTools protocol (a websocket, aiohttp's
client): load a page, evaluate JavaScript in it, add request headers, take screenshots.

Debian's ``chromium`` (scripts/setup.sh --tests installs it).  The browser runs in a process
group of its own with a profile under the test's directory and a temporary folder; closing it
ends that group (and only that group) and removes the profile."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import aiohttp

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class PageError(AssertionError):
    pass


class Browser:
    def __init__(self, workdir: Path, width: int = 1200, height: int = 1000):
        self.workdir = workdir
        self.profile = workdir / "chromium-profile"
        self.tmp: Path | None = None  # its TMPDIR: short (a unix socket's path lives there)
        self.size = (width, height)
        self.proc: subprocess.Popen | None = None
        self.errors: list[str] = []  # uncaught exceptions and console errors seen in the page
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    # -- the process -----------------------------------------------------------------------
    async def start(self) -> "Browser":
        if not os.access(CHROMIUM, os.X_OK):
            raise AssertionError("chromium is not installed: run scripts/setup.sh --tests (Debian's chromium)")
        self.profile.mkdir(parents=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="chromium-"))
        argv = [CHROMIUM, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        env = {**os.environ, "TMPDIR": str(self.tmp), "HOME": str(self.workdir)}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        log = open(self.workdir / "chromium.log", "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        log.close()
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start: {self.log()[-2000:]}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Log.enable")
        await self.send("Network.enable")
        return self

    def log(self) -> str:
        path = self.workdir / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def close(self) -> None:
        """End the browser: ask it to close, then end whatever of its process group is left;
        remove its profile."""
        try:
            if self._ws is not None and not self._ws.closed:
                try:
                    await asyncio.wait_for(self.send("Browser.close"), 5)
                except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError, PageError):
                    pass
                await self._ws.close()
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
            if self._session is not None:
                await self._session.close()
        finally:
            self._end_group()
            shutil.rmtree(self.profile, ignore_errors=True)
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _end_group(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is the browser's own
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    # -- the protocol ----------------------------------------------------------------------
    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                entry = data["params"]["entry"]
                if not entry.get("url", "").endswith("/favicon.ico"):  # asked for by the browser itself
                    self.errors.append(f"console: {entry['text']} ({entry.get('url', '')})")
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append("console.error: " + json.dumps(data["params"]["args"])[:500])

    async def send(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise PageError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise PageError(f"{expression!r}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60, what: str | None = None):
        """Evaluate ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except PageError:
                value = None  # the page is loading
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out after {timeout} s waiting for {what or expression}; the page "
                                     f"says:\n{body}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> Path:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


# -- PNG -------------------------------------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """``(width, height, rows)`` of an 8-bit RGB or RGBA, non-interlaced PNG, every chunk's CRC
    checked and every row unfiltered (rows of raw pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert ihdr is not None, "no IHDR chunk"
    width, height, depth, color, _, _, interlace = ihdr
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG format {ihdr}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (stride + 1), "pixel data of the wrong size"
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            else:
                assert f == 0, f"bad filter type {f}"
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def png_colors(data: bytes, step: int = 4) -> int:
    """How many distinct colours a PNG shows (sampling every ``step``-th pixel of every
    ``step``-th row)."""
    width, height, rows = png_pixels(data)
    bpp = len(rows[0]) // width
    seen = set()
    for row in rows[::step]:
        for x in range(0, width, step):
            seen.add(row[x * bpp:(x + 1) * bpp])
    return len(seen)
