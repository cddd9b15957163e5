"""Unit tests of gateway/dataplane/disconnect.py: a client leaving cancels the work it waits for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.dataplane.app import GatewayApp
from gateway.dataplane.asgi_io import ClientGone
from gateway.dataplane.disconnect import WATCH_AFTER, ClientWatch, WatchStarter
from gateway.dataplane.exchange import Exchange


class Client:
    """The client's side of an ASGI exchange: ``leave()`` makes ``receive()`` answer a disconnect."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.reads = 0

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()


def test_a_client_leaving_cancels_the_work_and_raises_client_gone() -> None:
    ex = Exchange("req_1", 0.0)
    upstream_closed = asyncio.Event()

    async def main() -> None:
        client = Client()

        async def slow_upstream() -> None:
            try:
                await asyncio.Event().wait()  # an answer that never comes
            finally:
                upstream_closed.set()

        async with ClientWatch(client.receive, client.send, ex, WatchStarter()):
            asyncio.get_running_loop().call_soon(client.leave)
            await slow_upstream()

    with pytest.raises(ClientGone):
        asyncio.run(main())
    assert ex.client_gone
    assert upstream_closed.is_set()


def test_the_task_is_not_left_cancelling() -> None:
    """After the block, the serving task goes on (records the usage, settles) undisturbed."""

    async def main() -> int:
        client = Client()
        ex = Exchange("req_1", 0.0)

        async def served() -> None:
            async with ClientWatch(client.receive, client.send, ex, WatchStarter()):
                client.leave()
                await asyncio.sleep(10)

        with pytest.raises(ClientGone):
            await served()
        await asyncio.sleep(0)  # would raise CancelledError if a cancel were still pending
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert asyncio.run(main()) == 0


def test_the_disconnect_after_a_complete_answer_is_not_a_client_leaving() -> None:
    """uvicorn answers receive() with http.disconnect once the response is complete."""
    ex = Exchange("req_1", 0.0)

    async def main() -> None:
        client = Client()
        async with ClientWatch(client.receive, client.send, ex, WatchStarter()) as watch:
            await asyncio.sleep(WATCH_AFTER * 2)  # the watcher is reading by now
            await watch.send({"type": "http.response.start", "status": 200, "headers": []})
            await watch.send({"type": "http.response.body", "body": b"{}", "more_body": False})
            client.leave()
            for _ in range(3):  # the watcher reads the disconnect meanwhile
                await asyncio.sleep(0)
        assert len(client.sent) == 2

    asyncio.run(main())
    assert not ex.client_gone


def test_work_that_ends_first_is_untouched() -> None:
    ex = Exchange("req_1", 0.0)

    async def main() -> str:
        client = Client()
        async with ClientWatch(client.receive, client.send, ex, WatchStarter()):
            await asyncio.sleep(0)
            return "done"

    assert asyncio.run(main()) == "done"
    assert not ex.client_gone


def test_quick_answers_start_no_watcher() -> None:
    """Answers complete within WATCH_AFTER never read the client: no task per request, only
    the starter's one ticker, which ends once no block is open."""
    starter = WatchStarter()
    exchanges = [Exchange(f"req_{n}", 0.0) for n in range(50)]
    client = Client()

    async def quick(ex: Exchange) -> None:
        async with ClientWatch(client.receive, client.send, ex, starter):
            await asyncio.sleep(0)

    async def main() -> tuple[int, int, int]:
        before = len(asyncio.all_tasks())
        serving = [asyncio.create_task(quick(ex)) for ex in exchanges]
        await asyncio.sleep(0)
        during = len(asyncio.all_tasks()) - len(serving)
        await asyncio.gather(*serving)
        await asyncio.sleep(WATCH_AFTER)  # the ticker's next round finds nothing open
        return before, during, len(asyncio.all_tasks())

    before, during, after = asyncio.run(main())
    assert during == before + 1  # the ticker
    assert after == before
    assert client.reads == 0
    assert not any(ex.client_gone for ex in exchanges)


def test_only_blocks_open_long_enough_are_watched() -> None:
    """Of blocks opened at different times, the ticker starts the watchers of those open for
    WATCH_AFTER, and a client that leaves one of them cancels that one alone."""
    starter = WatchStarter()
    old_ex, young_ex = Exchange("req_old", 0.0), Exchange("req_young", 0.0)
    old_client, young_client = Client(), Client()

    async def serve(client: Client, ex: Exchange, seconds: float) -> str:
        try:
            async with ClientWatch(client.receive, client.send, ex, starter):
                await asyncio.sleep(seconds)
        except ClientGone:
            return "gone"
        return "done"

    async def main() -> list[str]:
        old = asyncio.create_task(serve(old_client, old_ex, 30))
        await asyncio.sleep(WATCH_AFTER * 2)
        young = asyncio.create_task(serve(young_client, young_ex, WATCH_AFTER / 4))
        await asyncio.sleep(0)
        assert old_client.reads == 1  # watched
        old_client.leave()
        results = await asyncio.gather(old, young)
        assert young_client.reads == 0  # ended before its watcher was due
        await starter.aclose()
        return list(results)

    assert asyncio.run(main()) == ["gone", "done"]
    assert old_ex.client_gone
    assert not young_ex.client_gone


def test_a_client_leaving_later_is_still_noticed() -> None:
    """After WATCH_AFTER the watcher reads: a client leaving then cancels the work at once."""
    ex = Exchange("req_1", 0.0)

    async def main() -> None:
        client = Client()
        async with ClientWatch(client.receive, client.send, ex, WatchStarter()):
            asyncio.get_running_loop().call_later(WATCH_AFTER * 3, client.leave)
            await asyncio.sleep(30)

    with pytest.raises(ClientGone):
        asyncio.run(main())
    assert ex.client_gone


def test_client_left_keeps_the_usage_of_the_answer_it_was_sent() -> None:
    ex = Exchange("req_1", 0.0)
    usage: dict[str, int | None] = {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}
    ex.finish(200, "completed", usage, response_id="resp_1")
    ex.client_left()
    assert ex.final is not None
    assert ex.final[:4] == (200, "client_disconnected", usage, "resp_1")

    nothing = Exchange("req_2", 0.0)
    nothing.client_left()
    assert nothing.final is not None
    assert nothing.final[:2] == (499, "client_disconnected")


@pytest.mark.parametrize("path", ["/readyz", "/v1/nothing-here"])
def test_a_closed_transport_is_a_client_gone_not_an_error(
    settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """uvicorn's transport refuses writes once the connection closed (uvloop raises a
    RuntimeError): the app takes it as the client gone, with no traceback and no 500."""
    settings.REDIS_URL = ""
    settings.GATEWAY_USAGE_DRAINER = False
    monkeypatch.setenv("REDIS_URL", "")
    attempts: list[dict[str, Any]] = []

    async def closed_transport(message: dict[str, Any]) -> None:
        attempts.append(message)
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario() -> None:
        app = GatewayApp()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started = asyncio.Event()

        async def lifespan_send(message: dict[str, Any]) -> None:
            started.set()

        lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, lifespan_send))
        await inbox.put({"type": "lifespan.startup"})
        await started.wait()
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "client": ("127.0.0.1", 1)}
        await app(scope, receive, closed_transport)
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan

    asyncio.run(scenario())
    assert [message["type"] for message in attempts] == ["http.response.start"]  # tried once, no 500 after
    assert "Traceback" not in caplog.text
    assert "unhandled error" not in caplog.text
