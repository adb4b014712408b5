"""Loader, logging and interpreter-exit behaviour (some in a child interpreter)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import FAST, Hub, wait_until

import webpubsub_client
from webpubsub_client import WebPubSubClient, _native

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: Dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def exits_at_once_with_3(code: str) -> None:
    """Runs ``code``, which prints ``True`` once its scenario is set up and then calls
    ``sys.exit(3)``: the process ends within 10 s with that code, and the exit hook
    found no callback of the library still running (no application code inside it)."""
    started = time.monotonic()
    result = run_python(code, {}, timeout=20)
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["True"], result.stderr[-2000:]
    assert "still ran" not in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 10


def test_missing_library_error_lists_every_path_tried(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "libwebpubsub_client.so"
    result = run_python("import webpubsub_client", {_native.ENV_VAR: str(missing)})
    assert result.returncode != 0
    assert "LibraryNotFoundError" in result.stderr
    assert str(missing) in result.stderr
    assert _native.ENV_VAR in result.stderr


def test_loader_candidates_cover_env_package_and_target(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv(_native.ENV_VAR, str(tmp_path / "lib.so"))
    candidates = [str(p) for p in _native._candidates()]
    assert candidates[0] == str(tmp_path / "lib.so")
    package_dir = Path(_native.__file__).resolve().parent
    assert any(c.startswith(str(package_dir)) for c in candidates)
    assert any(os.sep + "release" + os.sep in c for c in candidates)
    assert any(os.sep + "debug" + os.sep in c for c in candidates)


def test_native_version_is_exposed() -> None:
    assert webpubsub_client.native_version()


def test_library_logs_reach_python_logging(hub: Hub, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="webpubsub_client.native")
    with WebPubSubClient(hub.url(), **FAST) as client:
        client.join_group("g")
    wait_until(
        lambda: any(r.name == "webpubsub_client.native" for r in caplog.records),
        what="a log record from the native library",
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_library_logs_follow_a_level_set_between_creation_and_open(hub: Hub) -> None:
    """A program that creates its client before it configures logging (at import, say)
    still gets the library's debug logs once it opens the client. In a child process: the
    library's log filter is process-wide and only widens."""
    result = run_python(
        f"""
        import logging, sys
        from webpubsub_client import WebPubSubClient
        client = WebPubSubClient({hub.url()!r})  # the logger is at WARNING here
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
        with client:
            client.join_group("g")
        """,
        {},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "webpubsub_client.native DEBUG [client::connection] connecting to" in result.stdout, result.stdout[-2000:]


def test_refused_threads_fail_clearly_and_are_tried_again(hub: Hub) -> None:
    """With an address-space limit just above what the child maps (no new thread stack
    fits), a client cannot be made and logging cannot start, each with the reason; once
    the limit is lifted, both work in the same process."""
    code = f"""
        import logging, re, resource
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.models import WebPubSubClientError
        def limit(on):
            status = open("/proc/self/status").read()
            mapped = int(re.search(r"VmSize:\\s+(\\d+)", status).group(1)) * 1024
            soft = mapped + (1 << 20) if on else resource.RLIM_INFINITY
            resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
        limit(True)
        try:
            WebPubSubClient({hub.url("limited")!r})
        except WebPubSubClientError as e:
            print("refused:", e, flush=True)
        limit(False)
        with WebPubSubClient({hub.url("limited")!r}, start_timeout=5.0) as client:
            print("connected:", bool(client.connection_id), flush=True)
    """
    # tokio panics on a refused thread: no backtrace to allocate for under the limit
    result = run_python(code, {"RUST_BACKTRACE": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    refused = "refused: cannot create the client: internal error: cannot start the webpubsub runtime"
    assert lines[0].startswith(refused), result.stdout
    assert lines[1:] == ["connected: True"], result.stdout
    assert "cannot install the log callback: internal error: cannot start the logging thread" in result.stderr, (
        result.stderr[-2000:]
    )


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE")
def test_running_out_of_descriptors_fails_clearly_and_is_tried_again(hub: Hub) -> None:
    """With every descriptor the process may open taken, then one more left free at each
    try: making the first sync client fails with WebPubSubClientError (the library's
    descriptors, then maybe those of the dispatch threads' selectors, which
    test_a_dispatch_pool_refused_a_descriptor_is_made_whole_by_the_next_client refuses
    for certain) until it is made; its open() with none free fails with
    OpenClientError; once descriptors are free it opens. (A refused selector raised a
    bare OSError.)"""
    code = f"""
        import os, resource
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.models import OpenClientError, WebPubSubClientError
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        def exhaust(free):
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            for _ in range(free):
                os.close(held.pop())
        def release():
            while held:
                os.close(held.pop())
        client = None
        for free in range(64):
            exhaust(free)
            try:
                client = WebPubSubClient({hub.url()!r}, start_timeout=5.0, reconnect_retry_total=0)
            except WebPubSubClientError as error:
                print("refused:", error, flush=True)
            finally:
                release()
            if client is not None:
                break
        for _ in range(20):  # the library's threads may close a descriptor meanwhile: the open may succeed
            exhaust(0)
            try:
                client.open()
            except OpenClientError as error:
                print("open refused:", error, flush=True)
                break
            finally:
                release()
            client.close()
        with client:
            print("connected:", client.is_connected(), flush=True)
    """
    result = run_python(code, {"RUST_BACKTRACE": "0"})  # the library's runtime panics on a refused descriptor
    assert result.returncode == 0, (result.stdout, result.stderr[-2000:])
    lines = result.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused: ")]
    assert refused and all(line.startswith("refused: cannot create the client: ") for line in refused), lines
    assert lines[len(refused)].startswith("open refused: Failed to open client. "), lines
    assert "Too many open files" in lines[len(refused)], lines
    assert lines[len(refused) + 1 :] == ["connected: True"], lines


def sigterm_ends_a_join(hub: Hub, before: str = "", after: str = "") -> None:
    """In a child interpreter, after ``before`` (which imports the package its own way):
    a SIGTERM handler's SystemExit ends, at once, a join of the main thread whose ack
    never comes, not after its 8 s ack timeout; then ``after`` runs."""
    scenario = f"""
        from webpubsub_client import WebPubSubClient

        def shut_down(signum, frame):
            raise SystemExit("terminated")

        signal.signal(signal.SIGTERM, shut_down)
        client = WebPubSubClient({hub.url()!r}, ack_timeout=8.0, message_retry_total=0)
        client.open()
        drop = {hub.emulator.base!r} + "/_emulator/hubs/{hub.name}/connections/" + client.connection_id
        urllib.request.urlopen(urllib.request.Request(drop + "/:dropAcks?count=1", method="POST")).close()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        try:
            client.join_group("g")
        except SystemExit:
            print(round(time.monotonic() - started, 2), flush=True)
        client.close()
    """
    imports = "import os, signal, sys, threading, time, urllib.request\n"
    code = imports + textwrap.dedent(before) + textwrap.dedent(scenario) + textwrap.dedent(after)
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 3, f"SystemExit came {result.stdout.strip()} s into the join"


def test_signal_handlers_run_in_blocking_calls_when_imported_on_another_thread(hub: Hub) -> None:
    """Imported on a thread other than the main one, the package still lets signal
    handlers run while a blocking call of the main thread waits (its check is installed
    by the main thread's first blocking call)."""
    sigterm_ends_a_join(
        hub,
        before="""
            imported = threading.Thread(target=__import__, args=("webpubsub_client",))
            imported.start()
            imported.join()
        """,
    )


def test_a_sub_interpreter_importing_the_package_leaves_the_main_threads_check(hub: Hub) -> None:
    """A sub-interpreter that imports the package on the main thread (signal handlers run
    in the main interpreter only) installs no check of its own in place of the main
    interpreter's. Before, the sub-interpreter's check ran the handler and kept its
    exception, and the join raised SendMessageError 'Interrupted'."""
    sigterm_ends_a_join(
        hub,
        before="""
            import webpubsub_client
            try:
                import _interpreters as interpreters  # 3.13
                sub = interpreters.create("legacy")
            except ImportError:
                import _xxsubinterpreters as interpreters
                sub = interpreters.create(**({"isolated": False} if sys.version_info >= (3, 12) else {}))
            interpreters.run_string(sub, "import webpubsub_client")  # alive until destroyed
        """,
        after="""
            interpreters.destroy(sub)
        """,
    )


def test_open_client_is_closed_at_interpreter_exit(hub: Hub) -> None:
    """A client left open is stopped by the exit hook: the process exits promptly and cleanly."""
    code = f"""
        from webpubsub_client import WebPubSubClient
        client = WebPubSubClient({hub.url("leaver")!r}, start_timeout=5.0)
        client.subscribe("group-message", lambda m: print("message", m.data, flush=True))
        client.open()
        client.join_group("exit-group")
        print(client.connection_id, flush=True)
        # no close(): the exit hook must stop it
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr
    connection_id = result.stdout.strip().splitlines()[-1]
    assert connection_id
    wait_until(
        lambda: not hub.service.connection_exists(connection_id),
        what="the child's connection closed",
    )


def test_a_program_that_exits_once_its_client_stopped_on_its_own_runs_the_stops_listeners(hub: Hub) -> None:
    """The service ends the session (close code 1008, no reconnect) inside ``with
    client:``; the program exits once it sees the client stopped. Leaving the block waits
    for the listeners of the stop's events (before, close() of a stopped client returned
    at once, and the exit ended the slow disconnected listener)."""
    code = f"""
        import time, urllib.request
        from webpubsub_client import WebPubSubClient, _client
        from webpubsub_client.models import WebPubSubClientState

        _client.CLOSE_WAIT = 10.0  # not 1 s: the 0.3 s listener races no scheduling delay

        def on_disconnected(_args):
            time.sleep(0.3)
            print("disconnected", flush=True)

        client = WebPubSubClient({hub.url("ended")!r}, auto_reconnect=False)
        client.subscribe("disconnected", on_disconnected)
        client.subscribe("stopped", lambda: print("stopped", flush=True))
        with client:
            route = f"/_emulator/hubs/{hub.name}/connections/{{client.connection_id}}/:close?code=1008"
            urllib.request.urlopen(urllib.request.Request({hub.emulator.base!r} + route, data=b""), timeout=10).close()
            while client.state is not WebPubSubClientState.STOPPED:
                time.sleep(0.01)
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["disconnected", "stopped"], result.stdout


def test_an_asyncio_program_that_ends_once_its_client_stopped_on_its_own_runs_the_stops_listeners(
    hub: Hub,
) -> None:
    """As above with the asyncio client, whose loop is held inside ``async with client:``
    until the client is stopped, and ``asyncio.run`` ending right after: leaving the block
    waits for the stop's events to reach the loop and for their listeners, a slow plain
    one and a slow coroutine one (before, close() of a stopped client returned at once,
    and the end of ``asyncio.run`` lost the stopped listener)."""
    code = f"""
        import asyncio, time, urllib.request
        from webpubsub_client.aio import WebPubSubClient, _client
        from webpubsub_client.models import WebPubSubClientState

        _client._AsyncSink.LISTENER_GRACE = 10.0  # not 1 s: the 0.3 s listeners race no scheduling delay

        def on_disconnected(_args):
            time.sleep(0.3)
            print("disconnected", flush=True)

        async def on_stopped():
            await asyncio.sleep(0.3)
            print("stopped", flush=True)

        async def main():
            client = WebPubSubClient({hub.url("ended-aio")!r}, auto_reconnect=False)
            await client.subscribe("disconnected", on_disconnected)
            await client.subscribe("stopped", on_stopped)
            async with client:
                route = f"/_emulator/hubs/{hub.name}/connections/{{client.connection_id}}/:close?code=1008"
                request = urllib.request.Request({hub.emulator.base!r} + route, data=b"")
                urllib.request.urlopen(request, timeout=10).close()
                while client.state is not WebPubSubClientState.STOPPED:
                    time.sleep(0.01)

        asyncio.run(main())
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["disconnected", "stopped"], (result.stdout, result.stderr[-2000:])


def test_exit_with_daemon_threads_inside_calls_does_not_crash(hub: Hub) -> None:
    """The interpreter exits while daemon threads keep calling a sync and an asyncio client
    (a publisher thread left running): the exit hook stops the clients instead of freeing
    them under those threads, so the process exits cleanly, and what the threads sent
    before the exit arrived."""
    url = hub.url("daemon")
    code = f"""
        import asyncio, threading
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.aio import WebPubSubClient as AsyncClient
        client = WebPubSubClient({url!r}, start_timeout=5.0)
        client.open()
        sent = threading.Event()

        def publish():
            i = 0
            while True:
                try:
                    client.send_to_group("daemon-group", str(i), "text", ack=i % 2 == 0)
                except Exception:
                    pass
                i += 1
                if i == 200:
                    sent.set()

        async def publish_async():
            async with AsyncClient({url!r}) as aclient:
                while True:
                    try:
                        await aclient.send_to_group("daemon-group", "a", "text", ack=False)
                    except Exception:
                        pass
                    await asyncio.sleep(0)

        for _ in range(3):
            threading.Thread(target=publish, daemon=True).start()
        threading.Thread(target=lambda: asyncio.run(publish_async()), daemon=True).start()
        sent.wait(10)
        print("exiting", flush=True)
    """
    for _ in range(5):  # the race with the exit hook: several exits
        result = run_python(code, {})
        assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
        assert result.stdout.strip().endswith("exiting")


def test_a_fork_child_exits_promptly_with_clients_of_its_parent(hub: Hub) -> None:
    """A fork() child of a process with open sync and asyncio clients (a prefork server's
    worker) exits normally without waiting for library threads it does not have; the
    parent's clients keep working. In the child, an operation of the asyncio client on a
    loop of its own fails with FORKED and ``close()`` of either client does nothing:
    neither takes the client's descriptor from the parent's loop (whose epoll instance
    the child shares), which left the parent's asyncio client deaf."""
    url = hub.url("forker")
    code = f"""
        import asyncio, os, sys
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.aio import WebPubSubClient as AsyncClient
        from webpubsub_client.models import WebPubSubClientError
        client = WebPubSubClient({url!r}, start_timeout=5.0)
        client.subscribe("group-message", lambda m: None)
        client.open()
        aclient = AsyncClient({url!r})
        loop = asyncio.new_event_loop()
        loop.run_until_complete(aclient.open())
        for exit_by in ("sys.exit", "return", "close"):
            pid = os.fork()
            if pid == 0:
                if exit_by == "sys.exit":
                    sys.exit(0)
                if exit_by == "close":
                    try:
                        asyncio.run(aclient.join_group("g"))
                    except WebPubSubClientError as e:
                        print("join", e.status, flush=True)
                    asyncio.run(aclient.close())
                    client.close()
                break  # the child leaves the loop and ends the script
            _, status = os.waitpid(pid, 0)
            print(exit_by, os.waitstatus_to_exitcode(status), flush=True)
        else:
            print(client.send_to_group("fork-group", "after", "text").ack_id is not None, flush=True)
            sent = loop.run_until_complete(asyncio.wait_for(aclient.send_to_group("fork-group", "after", "text"), 10))
            print(sent.ack_id is not None, flush=True)
            loop.run_until_complete(aclient.close())
            client.close()
    """
    result = run_python(code, {}, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["sys.exit", "0", "return", "0", "join", "15", "close", "0", "True", "True"], (
        result.stdout
    )


def test_exit_while_a_listener_blocks_for_good_does_not_hang(hub: Hub) -> None:
    """The interpreter exits while a listener waits for something that never comes: the
    exit hook does not wait for it without end (before, freeing the client at exit waited
    for the running callback, so the process never exited); the official client's
    listener threads are daemon threads."""
    code = f"""
        import threading
        from webpubsub_client import WebPubSubClient
        client = WebPubSubClient({hub.url("stuck")!r}, start_timeout=5.0)
        entered = threading.Event()

        def on_message(_):
            entered.set()
            threading.Event().wait()

        client.subscribe("group-message", on_message)
        client.open()
        client.join_group("g")
        client.send_to_group("g", "block", "text")
        print(entered.wait(10), flush=True)
    """
    result = run_python(code, {}, timeout=20)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["True"]


@pytest.mark.parametrize(
    "keep_busy",
    [
        "time.sleep(0.001)",
        "threading.Event().wait(0.01)",
        "client.send_to_group('elsewhere', 'busy', 'text')",  # a library call, in and out
    ],
    ids=["sleeps", "waits", "calls-the-library"],
)
def test_exit_while_a_listener_keeps_running_exits_cleanly(hub: Hub, keep_busy: str) -> None:
    """The interpreter exits while a listener of a sync client keeps running, taking the
    interpreter lock again and again: the process exits at once with the script's own
    code, as with the official client (whose listeners run on daemon threads). Before,
    listeners ran inside the library's dispatcher threads: the exit hook waited 2 s for
    them, and once Python finalized, the listener's next take of the lock ended its
    thread with ``pthread_exit`` inside the library, which aborted the process (SIGABRT)."""
    code = f"""
        import sys, threading, time
        from webpubsub_client import WebPubSubClient
        client = WebPubSubClient({hub.url("busy")!r}, start_timeout=5.0)
        entered = threading.Event()

        def on_message(_):
            entered.set()
            while True:
                try:
                    {keep_busy}
                except Exception:
                    pass

        client.subscribe("group-message", on_message)
        client.open()
        client.join_group("g")
        client.send_to_group("g", "block", "text")
        print(entered.wait(10), flush=True)
        sys.exit(3)
    """
    exits_at_once_with_3(code)


class FreezingRelay:
    """A TCP relay to ``port`` that, once ``frozen`` is set, swallows what either side
    sends: a peer that no longer answers (a dead network path)."""

    def __init__(self, port: int) -> None:
        self.frozen = threading.Event()
        self._port = port
        self._sockets: List[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    return
                if not self.frozen.is_set():
                    target.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for sock in [self._listener, *self._sockets]:
            sock.close()


def test_clients_whose_peer_no_longer_answers_are_stopped_together_at_exit(hub: Hub) -> None:
    """Eight sync clients left open whose peer went silent: the exit hook's stop of each
    waits for its close handshake up to the close timeout (1 s). They are stopped
    together, so the exit takes about that once; before, one after the other, eight
    times (8 s; 100 such clients held the exit for 100 s)."""
    relay = FreezingRelay(hub.emulator.port)
    url = hub.url("silent").replace(f":{hub.emulator.port}/", f":{relay.port}/")
    code = f"""
        import sys
        from webpubsub_client import WebPubSubClient
        clients = [WebPubSubClient({url!r}, start_timeout=5.0) for _ in range(8)]
        for client in clients:
            client.open()
        print(all(client.is_connected() for client in clients), flush=True)
        sys.stdin.readline()
        sys.exit(3)
    """
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "True"
            relay.frozen.set()
            started = time.monotonic()
            child.stdin.write("exit\n")
            child.stdin.flush()
            assert child.wait(timeout=30) == 3
            elapsed = time.monotonic() - started
        finally:
            child.kill()
            relay.close()
    assert elapsed < 5, f"the exit took {elapsed:.1f} s"


def test_exit_while_a_credential_provider_keeps_running_exits_cleanly() -> None:
    """The interpreter exits while the URL provider of a sync client, opening on a daemon
    thread, keeps running, taking the interpreter lock again and again: the process exits
    at once with the script's own code. Before, the provider ran inside the library's
    credential callback, on a library thread: the exit hook waited 2 s for it, and once
    Python finalized, the provider's next take of the lock ended its thread with
    ``pthread_exit`` inside the library, which aborted the process (SIGABRT)."""
    code = """
        import sys, threading, time
        from webpubsub_client import WebPubSubClient, WebPubSubClientCredential
        entered = threading.Event()

        def provide():
            entered.set()
            while True:
                time.sleep(0.001)

        client = WebPubSubClient(WebPubSubClientCredential(provide), start_timeout=60.0)
        threading.Thread(target=client.open, daemon=True).start()
        print(entered.wait(10), flush=True)
        sys.exit(3)
    """
    exits_at_once_with_3(code)


@pytest.mark.parametrize(
    "event",
    ["connected", "big-message"],
)
def test_exit_while_an_asyncio_listener_keeps_running_exits_cleanly(hub: Hub, event: str) -> None:
    """The interpreter exits while a listener of an asyncio client, whose loop runs on a
    daemon thread, keeps running, taking the interpreter lock again and again: the process
    exits at once with the script's own code. The event is one the event callback brings
    (connected) or a message too big for the dispatch buffer (over 32 KiB). Before, its
    listeners ran inside the event callback, in the library's dispatch on the loop's
    thread: the exit hook waited 2 s for them, and once Python finalized, the listener's
    next take of the lock ended its thread with ``pthread_exit`` inside the library, which
    aborted the process (SIGABRT)."""
    code = f"""
        import asyncio, sys, threading, time
        from webpubsub_client.aio import WebPubSubClient
        entered = threading.Event()

        def keep_running(*_):
            entered.set()
            while True:
                time.sleep(0.001)

        async def main():
            client = WebPubSubClient({hub.url("busy-aio")!r}, start_timeout=5.0)
            if {event!r} == "connected":
                await client.subscribe("connected", keep_running)
                await client.open()
            else:
                await client.subscribe("group-message", keep_running)
                await client.open()
                await client.join_group("g")
                await client.send_to_group("g", "x" * 40000, "text")
            await asyncio.sleep(3600)

        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        print(entered.wait(10), flush=True)
        sys.exit(3)
    """
    exits_at_once_with_3(code)


@pytest.mark.parametrize("provider", ["coroutine", "function"])
def test_exit_while_an_asyncio_credential_provider_keeps_running_exits_cleanly(provider: str) -> None:
    """The interpreter exits while the URL provider of an asyncio client, whose loop runs
    on a daemon thread, keeps running, taking the interpreter lock again and again: the
    process exits at once with the script's own code. The provider runs in a task on the
    client's loop, never on a library thread, where Python's finalization would end it
    with ``pthread_exit`` inside the library (the SIGABRT the sync provider had)."""
    code = f"""
        import asyncio, sys, threading, time
        from webpubsub_client.aio import WebPubSubClient, WebPubSubClientCredential
        entered = threading.Event()

        def keep_running():
            entered.set()
            while True:
                time.sleep(0.001)

        async def provide_async():
            keep_running()

        provide = provide_async if {provider!r} == "coroutine" else keep_running

        async def main():
            client = WebPubSubClient(WebPubSubClientCredential(provide), start_timeout=60.0)
            await client.open()

        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        print(entered.wait(10), flush=True)
        sys.exit(3)
    """
    exits_at_once_with_3(code)


FORGOTTEN_CLIENTS = """
    import asyncio, gc, sys, weakref
    from webpubsub_client import WebPubSubClient as SyncClient
    from webpubsub_client.aio import WebPubSubClient
    {loop_setup}
    refs = []

    async def forget():
        client = WebPubSubClient({async_url!r}, start_timeout=5.0)
        got = asyncio.Event()

        async def on_message(message):
            await asyncio.sleep(0)
            got.set()

        await client.subscribe("group-message", on_message)
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "hi", "text")
        await asyncio.wait_for(got.wait(), 10)
        # Pending when the run ends, and cancelled then. To a group the client is not in: an
        # echo could come while asyncio.run shuts down, and start a listener task that the
        # loop's close then destroys pending.
        asyncio.ensure_future(client.send_to_group("elsewhere", "pending", "text"))
        refs.append(weakref.ref(client))
        print(client.connection_id, flush=True)
        # no close(): asyncio.run ends with the client open

    asyncio.run(forget())
    gc.collect()
    print(refs[0]() is None, flush=True)  # freed with its loop, before the exit
    client = SyncClient({sync_url!r}, start_timeout=5.0)
    client.subscribe("group-message", lambda message: None)
    client.open()
    client.join_group("g")
    print(client.connection_id, flush=True)
    del client  # never closed: it runs until the exit hook stops it
    sys.exit(3)
"""


def forgotten_clients_exit_cleanly(hub: Hub, loop_setup: str = "") -> None:
    """Runs :data:`FORGOTTEN_CLIENTS` in a child with warnings as errors, Python's
    development mode and asyncio's debug mode (``loop_setup``: code that picks the
    loop): an asyncio client left open when its ``asyncio.run`` ended is collected and
    freed once that loop is closed, and a sync client left open and dropped runs until
    the exit, which is prompt, with the script's own code and nothing on stderr; the
    service then has neither connection."""
    code = FORGOTTEN_CLIENTS.format(
        loop_setup=loop_setup, async_url=hub.url("forgot-aio"), sync_url=hub.url("forgot-sync")
    )
    started = time.monotonic()
    result = run_python(code, {"PYTHONDEVMODE": "1", "PYTHONWARNINGS": "error", "PYTHONASYNCIODEBUG": "1"})
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    assert result.stderr == ""
    async_id, freed, sync_id = result.stdout.split()
    assert freed == "True", "the asyncio client outlived its loop"
    assert time.monotonic() - started < 10
    wait_until(
        lambda: not hub.service.connection_exists(async_id) and not hub.service.connection_exists(sync_id),
        what="the forgotten clients' connections closed",
    )


def test_clients_left_open_are_freed_and_the_exit_is_clean(hub: Hub) -> None:
    """A user forgets ``close()``, on an asyncio client whose ``asyncio.run`` ends and on
    a sync client dropped: no crash, hang or output at exit. Before, the asyncio client
    stayed connected (its socket, descriptor and registry entry kept) until the exit."""
    forgotten_clients_exit_cleanly(hub)


def test_a_dispatch_pool_refused_a_descriptor_is_made_whole_by_the_next_client(hub: Hub) -> None:
    """The sync clients' dispatch pool is made with the first client: when the system
    refuses one of its selectors (out of file descriptors), that client fails with the
    error and the next one makes the whole pool and its watchdog. Before, the pool kept
    the threads made before the refusal, and no watchdog, for the life of the process."""
    code = f"""
        import errno, os, selectors, threading
        from webpubsub_client import WebPubSubClient, _dispatcher
        from webpubsub_client.models import WebPubSubClientError
        os.cpu_count = lambda: 2  # a pool of two, whatever the machine
        made, real = [], selectors.DefaultSelector

        def second_refused():
            made.append(1)
            if len(made) == 2:
                raise OSError(errno.EMFILE, "Too many open files")
            return real()

        selectors.DefaultSelector = second_refused
        try:
            WebPubSubClient({hub.url("first")!r})
        except WebPubSubClientError as e:
            print("refused", e.__cause__.errno == errno.EMFILE)
        client = WebPubSubClient({hub.url("second")!r})
        watchdogs = [t for t in threading.enumerate() if t.name == "webpubsub-dispatch-watchdog"]
        print(len(_dispatcher._WORKERS), len(watchdogs))
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["refused", "True", "2", "1"], result.stdout


def test_a_dispatch_thread_refused_at_creation_is_a_client_error_and_tried_again(hub: Hub) -> None:
    """The system refuses a thread to the sync clients' dispatch pool (at its thread
    limit): first the watchdog's, made with the pool, then the thread of the worker a
    client is pinned to. Each time the client's constructor raises a
    WebPubSubClientError chained from the RuntimeError, as for a refused selector, and
    the next client pinned there starts the thread and gets its events. Before, the bare
    RuntimeError escaped the constructor."""
    code = f"""
        import os, threading
        os.cpu_count = lambda: 2  # a pool of two, whatever the machine
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.models import CallbackType, WebPubSubClientError, WebPubSubDataType
        refused, real_start = ["webpubsub-dispatch-"], threading.Thread.start

        def start(thread):
            if any(thread.name.startswith(name) for name in refused):
                raise RuntimeError("can't start new thread")
            real_start(thread)

        def made(url):
            try:
                return WebPubSubClient(url)
            except WebPubSubClientError as e:
                print("refused", type(e.__cause__).__name__, "start a dispatch thread" in str(e))

        threading.Thread.start = start
        made({hub.url("pool")!r})
        refused[:] = ["webpubsub-dispatch-1"]
        first = made({hub.url("first")!r})  # worker 0
        made({hub.url("second")!r})  # worker 1
        refused.clear()
        third = made({hub.url("third")!r})  # worker 0
        fourth = made({hub.url("fourth")!r})  # worker 1
        got = threading.Event()
        fourth.subscribe(CallbackType.GROUP_MESSAGE, lambda _m: got.set())
        with first, fourth:
            fourth.join_group("g")
            first.send_to_group("g", "hi", WebPubSubDataType.TEXT)
            print("got", got.wait(10))
        print(sorted(t.name for t in threading.enumerate() if t.name.startswith("webpubsub-dispatch")))
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == ["refused RuntimeError True"] * 2 + ["got True"], result.stdout
    assert "'webpubsub-dispatch-0', 'webpubsub-dispatch-1', 'webpubsub-dispatch-watchdog'" in result.stdout


def test_a_client_made_while_every_dispatch_thread_is_held_gets_its_events(hub: Hub) -> None:
    """A listener holds the pool's only dispatch thread past the watchdog's quiet second
    (the watchdog asleep), then a client is made: its events come while the hold lasts.
    Before, it was pinned to the held thread, and nothing woke the watchdog to move it."""
    code = f"""
        import os, threading, time
        os.cpu_count = lambda: 1  # a pool of one, whatever the machine
        from webpubsub_client import WebPubSubClient, _dispatcher
        from webpubsub_client.models import CallbackType
        gate, held, connected = threading.Event(), threading.Event(), threading.Event()
        holder = WebPubSubClient({hub.url("holder")!r})
        holder.subscribe(CallbackType.CONNECTED, lambda _args: (held.set(), gate.wait(30)))
        holder.open()
        assert held.wait(10)
        deadline = time.monotonic() + 10
        while not _dispatcher._WATCHDOG.asleep and time.monotonic() < deadline:
            time.sleep(0.05)
        print("asleep", _dispatcher._WATCHDOG.asleep, flush=True)
        late = WebPubSubClient({hub.url("late")!r})
        late.subscribe(CallbackType.CONNECTED, lambda _args: connected.set())
        late.open()
        print("connected", connected.wait(5), flush=True)
        gate.set()
        late.close()
        holder.close()
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["asleep", "True", "connected", "True"], result.stdout


def test_a_dispatch_thread_refused_to_the_watchdog_is_tried_again(hub: Hub) -> None:
    """A listener holds the pool's only dispatch thread while the system refuses new
    threads: the client beside it stays where it is, and moves once a thread is granted,
    during the hold. Before, the refusal ended the watchdog, and the client, already out
    of its thread's watch, got no event again."""
    code = f"""
        import os, threading
        os.cpu_count = lambda: 1  # a pool of one, whatever the machine
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.models import CallbackType, WebPubSubDataType
        refuse, refused, real_start = threading.Event(), threading.Semaphore(0), threading.Thread.start

        def start(thread):
            if refuse.is_set() and thread.name.startswith("webpubsub-dispatch-"):
                refused.release()
                raise RuntimeError("can't start new thread")
            real_start(thread)

        threading.Thread.start = start
        gate, held, got = threading.Event(), threading.Event(), threading.Event()
        holder = WebPubSubClient({hub.url("holder")!r})
        beside = WebPubSubClient({hub.url("beside")!r})
        holder.subscribe(CallbackType.GROUP_MESSAGE, lambda _m: (held.set(), gate.wait(30)))
        beside.subscribe(CallbackType.GROUP_MESSAGE, lambda _m: got.set())
        with holder, beside:
            holder.join_group("h")
            beside.join_group("g")
            refuse.set()
            holder.send_to_group("h", "hold", WebPubSubDataType.TEXT)
            assert held.wait(10)
            print("refused", refused.acquire(timeout=10), flush=True)
            refuse.clear()
            holder.send_to_group("g", "during", WebPubSubDataType.TEXT)
            print("during", got.wait(5), flush=True)
            gate.set()
            print("after", got.wait(5), flush=True)
    """
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["refused", "True", "during", "True", "after", "True"], result.stdout
