"""A console live view watching a gateway, for the benchmark's ``watched`` column.

``python -m bench.live_watch --port P --username U --password-file F --count-file C`` signs in
through the console's login form (a real session, CSRF and all), opens the live view's
WebSocket (``/console/live/ws/``) as a browser would (session cookie, same-site ``Origin``) and
reads every message until SIGTERM, writing the number of request lines received so far to
``C`` once a second and at the end. It prints ``watching`` once the socket is open. Run as its
own process, so that reading the lines costs the gateway's processes nothing but the sending.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import httpx


def session_cookie(base: str, username: str, password: str) -> str:
    """Sign in through ``/console/login/``; the ``Cookie`` header of the signed-in session."""
    with httpx.Client(base_url=base, timeout=10) as client:
        form = client.get("/console/login/")
        form.raise_for_status()
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        if match is None:
            raise SystemExit("live_watch: no CSRF token on the login page")
        signed_in = client.post(
            "/console/login/",
            data={"csrfmiddlewaretoken": match.group(1), "username": username, "password": password},
            headers={"referer": f"{base}/console/login/"},
        )
        if signed_in.status_code != 302 or "sessionid" not in client.cookies:
            raise SystemExit(f"live_watch: sign-in failed ({signed_in.status_code})")
        return "; ".join(f"{name}={value}" for name, value in client.cookies.items())


async def watch(port: int, cookie: str, count_file: Path) -> None:
    from websockets.asyncio.client import connect

    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    received = 0

    def save() -> None:
        count_file.write_text(str(received), encoding="ascii")

    async with connect(
        f"ws://127.0.0.1:{port}/console/live/ws/",
        additional_headers={"cookie": cookie, "origin": base},
        max_size=None,
        compression=None,
    ) as socket:
        print("watching", flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        last_save = loop.time()
        while not stop.is_set():
            reading = asyncio.ensure_future(socket.recv())
            done, _ = await asyncio.wait({reading, stopping}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                received += len(json.loads(reading.result())["lines"])
            else:
                reading.cancel()
            if loop.time() - last_save >= 1.0:
                save()
                last_save = loop.time()
    save()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live_watch", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args()
    password = args.password_file.read_text(encoding="utf-8").strip()
    cookie = session_cookie(f"http://127.0.0.1:{args.port}", args.username, password)
    asyncio.run(watch(args.port, cookie, args.count_file))
    sys.exit(0)


if __name__ == "__main__":
    main()
