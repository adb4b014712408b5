//! The binary: connection string first on stdout, clean exit on SIGTERM and SIGINT (a
//! second signal during the shutdown changing nothing), an abrupt one on SIGHUP, a
//! plain log on a pipe (or none: a closed one), exit codes of bad flags and failed
//! starts, a busy port, a log that does not flood while out of file descriptors;
//! `client-url`'s URLs, as the emulator takes them, and its bad arguments.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{spawn_binary, Binary};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const BIN: &str = env!("CARGO_BIN_EXE_webpubsub-emulator");

#[test]
fn prints_the_connection_string_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["--port", "0", "--access-key", "k3y"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let rest = line
        .trim_end()
        .strip_prefix("Endpoint=http://127.0.0.1;Port=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let (port, tail) = rest.split_once(';').unwrap();
    assert_eq!(tail, "AccessKey=k3y;Version=1.0;");
    assert_serves(port.parse().unwrap());
    signal(&child, "-TERM");
    let status = exit_within(&mut child, "SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    // Its log, to a pipe: plain text, without a terminal's colour codes.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("listening on"), "{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
}

/// The binary (access key "k3y") with a reliable client connected to hub "h".
async fn binary_with_a_client() -> (Binary, common::Ws) {
    let (binary, port) = spawn_binary("k3y", &[]);
    let token = webpubsub_emulator::auth::sign_client_token(
        "k3y",
        &format!("http://127.0.0.1:{port}/client/hubs/h"),
        &webpubsub_emulator::TokenOptions::default(),
    );
    let url = format!("ws://127.0.0.1:{port}/client/hubs/h?access_token={token}");
    let (ws, _) = common::connect_json(&url, common::RELIABLE).await;
    (binary, ws)
}

#[tokio::test]
async fn sighup_ends_it_at_once_without_close_frames() {
    use std::os::unix::process::ExitStatusExt;
    let (mut binary, mut ws) = binary_with_a_client().await;
    signal(&binary.0, "-HUP");
    ws.expect_abrupt_end().await;
    let status = exit_within(&mut binary.0, "SIGHUP");
    assert_eq!(status.signal(), Some(1), "{status:?}");
}

#[test]
fn keep_alive_flags_drop_a_silent_client() {
    use std::io::{Read, Write};
    let (_binary, port) = spawn_binary(
        "k3y",
        &[
            "--keep-alive-interval-ms",
            "100",
            "--keep-alive-timeout-ms",
            "300",
        ],
    );
    let token = webpubsub_emulator::auth::sign_client_token(
        "k3y",
        &format!("http://127.0.0.1:{port}/client/hubs/h"),
        &webpubsub_emulator::TokenOptions::default(),
    );
    // A simple client that upgrades and then never reads, answers or closes.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        tcp,
        "GET /client/hubs/h?access_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut received = Vec::new();
    tcp.read_to_end(&mut received)
        .expect("the server ends the socket in time");
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an upgrade answer")
        + 4;
    assert!(received.starts_with(b"HTTP/1.1 101"));
    // An empty ping frame, and nothing else before the end.
    assert_eq!(&received[head_end..], &[0x89, 0x00]);
}

/// The first line `child` prints: its connection string.
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim_end().to_owned()
}

/// The port in the connection string `child` prints first.
fn port_of(child: &mut Child) -> u16 {
    let line = first_line(child);
    line.split("Port=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
}

/// The whole HTTP response of the emulator on `port` to `GET /_emulator/stats`.
fn stats_response(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening");
    std::io::Write::write_all(
        &mut stream,
        b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    response
}

/// Asserts that the emulator on `port` answers its stats route.
fn assert_serves(port: u16) {
    let response = stats_response(port);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// Waits at most 10 s for `child` to exit.
fn exit_within(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Runs the binary with `args` to its end (within 10 s): its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, &format!("{args:?}"));
    let mut out = String::new();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), out, err)
}

/// Runs the binary with `args`, which must make it fail at once with exit code `code`
/// (2: a bad flag, 1: a start that fails): returns its stderr.
fn fails_at_once(args: &[&str], code: i32) -> String {
    let (status, out, err) = run(args);
    assert_eq!(status, Some(code), "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?} printed {out:?}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// The URL `client-url` prints for `args`.
fn client_url(args: &[&str]) -> String {
    let args = [&["client-url"], args].concat();
    let (status, out, err) = run(&args);
    assert_eq!(status, Some(0), "{args:?}: {err}");
    assert!(err.is_empty(), "{args:?}: {err}");
    out.strip_suffix('\n')
        .filter(|url| !url.contains('\n'))
        .unwrap_or_else(|| panic!("{args:?}: not one line: {out:?}"))
        .to_owned()
}

#[test]
fn unusable_values_fail_at_once_naming_what_is_wrong() {
    for (args, expected, code) in [
        (&["--port", "notaport"][..], "--port", 2),
        (&["--port", "65536"], "--port", 2),
        (&["--http-timeout-ms", "0"], "--http-timeout-ms", 2),
        (&["--fault-drop-every-ms", "0"], "--fault-drop-every-ms", 2),
        (&["--read-buffer-bytes", "1023"], "--read-buffer-bytes", 2),
        (
            &["--read-buffer-bytes", "16777217"],
            "--read-buffer-bytes",
            2,
        ),
        (
            &["--upstream-system-events", "connects"],
            "--upstream-system-events",
            2,
        ),
        (&["--tls-cert", "/nonexistent.pem"], "--tls-key", 2),
        (&["--nope"], "--nope", 2),
        (&["--access-key", ""], "access key", 1),
        (&["--access-key", "a;b"], "access key", 1),
        (&["--access-key", "a\nb"], "access key", 1),
        (&["--upstream", "not a url"], "upstream URL", 1),
        (&["--upstream", "https://127.0.0.1/"], "upstream URL", 1),
        (&["--upstream", "ftp://127.0.0.1/"], "upstream URL", 1),
        (&["--host", "256.0.0.1"], "256.0.0.1", 1),
        (
            &[
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.pem",
            ],
            "certificate",
            1,
        ),
    ] {
        let err = fails_at_once(args, code);
        if code == 1 {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn a_busy_port_fails_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let err = fails_at_once(&["--port", &port], 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn a_closed_log_pipe_does_not_stop_it() {
    let mut child = Binary(
        Command::new(BIN)
            .args(["--port", "0"])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // A parent that never reads the log: every line it writes meets a broken pipe.
    drop(child.0.stderr.take());
    let port = port_of(&mut child.0);
    assert_serves(port);
    // Its shutdown logs too.
    signal(&child.0, "-TERM");
    let status = exit_within(&mut child.0, "SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigint_closes_clients_with_1001_and_exits_0() {
    let (mut binary, mut ws) = binary_with_a_client().await;
    signal(&binary.0, "-INT");
    assert_eq!(ws.expect_close().await.0, 1001);
    let status = exit_within(&mut binary.0, "SIGINT");
    assert!(status.success(), "{status:?}");
}

/// Starts the emulator with `command`; it, its port, and the lines of its log as they come.
fn with_log_lines(command: &mut Command) -> (Binary, u16, std::sync::mpsc::Receiver<String>) {
    let mut child = Binary(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let port = port_of(&mut child.0);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    (child, port, lines)
}

/// The REST requests the emulator on `port` has taken, from its stats.
fn rest_requests(port: u16) -> u64 {
    let response = stats_response(port);
    let body = response.split_once("\r\n\r\n").expect("a response").1;
    serde_json::from_str::<Value>(body).unwrap()["restRequests"]
        .as_u64()
        .unwrap()
}

/// Whether the process `pid` (a child not yet waited for) is still running: it has
/// not exited.
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat.rsplit_once(") ").expect("a stat line").1;
    !state.starts_with(['Z', 'X'])
}

#[test]
fn a_second_signal_during_the_shutdown_changes_nothing() {
    use std::io::{Read, Write};
    let (mut child, port, lines) =
        with_log_lines(Command::new(BIN).args(["--port", "0", "--access-key", "k3y"]));
    // A REST request whose body has not all come: the shutdown waits for its answer
    // (up to 2 s), so the process outlives the first signal.
    let path = "/api/hubs/h/:send?api-version=2024-01-01";
    let token = webpubsub_emulator::auth::sign(
        "k3y",
        &json!({"aud": format!("http://127.0.0.1:{port}{path}"), "exp": common::now() + 600}),
    );
    let mut rest = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        rest,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nhe"
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rest_requests(port) == 0 {
        assert!(Instant::now() < deadline, "the request never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child.0, "-TERM");
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("\"shutting down\" in the log");
        if line.contains("shutting down") {
            break;
        }
    }
    assert!(
        running(child.0.id()),
        "it ended before the second signal: the request did not hold it"
    );
    signal(&child.0, "-INT");
    // The shutdown goes on as before: the request is answered, and the exit is clean.
    let _ = rest.write_all(b"ll");
    rest.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut response = String::new();
    let read = rest.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 202"),
        "after the second signal: {read:?} {response:?}"
    );
    let status = exit_within(&mut child.0, "SIGTERM, then SIGINT");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn out_of_file_descriptors_it_logs_the_first_failure_and_the_recovery() {
    // Room for what the emulator opens at start and a few connections.
    let (mut child, port, lines) = with_log_lines(
        Command::new("sh").args(["-c", &format!("ulimit -n 24 && exec {BIN} --port 0")]),
    );
    let mut log = Vec::new();
    let until = |what: &str, log: &mut Vec<String>| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {what:?} in the log: {log:#?}"));
        let found = line.contains(what);
        log.push(line);
        if found {
            return;
        }
    };
    // Idle connections, each holding a descriptor until it goes.
    let peers: Vec<_> = (0..40)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    until("accept failed", &mut log);
    // Long enough for dozens of failed accepts.
    std::thread::sleep(Duration::from_millis(500));
    // Their descriptors come back, and the connections waiting are taken.
    drop(peers);
    until("accepting again", &mut log);
    assert_serves(port);
    signal(&child.0, "-TERM");
    assert!(exit_within(&mut child.0, "SIGTERM").success());
    log.extend(lines.try_iter());
    let failures = log.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 1, "{log:#?}");
}

#[tokio::test]
async fn client_url_makes_urls_with_the_users_roles_and_groups_it_is_given() {
    // No --access-key: the key is only in the connection string it prints.
    let mut binary = Binary(
        Command::new(BIN)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cs = first_line(&mut binary.0);
    let key = cs
        .split("AccessKey=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    let port = cs.split("Port=").nth(1).unwrap().split(';').next().unwrap();
    let alice = client_url(&[
        "--connection-string",
        &cs,
        "--hub",
        "chat",
        "--user",
        "alice",
        "--role",
        "webpubsub.joinLeaveGroup",
        "--role",
        "webpubsub.sendToGroup",
        "--minutes",
        "2",
    ]);
    let bob = client_url(&[
        "--connection-string",
        &cs,
        "--hub",
        "chat",
        "--user",
        "bob",
        "--group",
        "g0",
        "--group",
        "g1",
    ]);
    // The claims an official server SDK puts in a client token, and no others.
    let base = format!("ws://127.0.0.1:{port}/client/hubs/chat?access_token=");
    let token = alice
        .strip_prefix(&base)
        .unwrap_or_else(|| panic!("{alice}"));
    let claims = webpubsub_emulator::auth::verify(key, token, true).unwrap();
    let names: Vec<_> = claims.payload.keys().map(String::as_str).collect();
    assert_eq!(names, ["aud", "exp", "iat", "role", "sub"]);
    assert_eq!(
        claims.payload["aud"],
        format!("http://127.0.0.1:{port}/client/hubs/chat")
    );
    let lifetime =
        claims.payload["exp"].as_u64().unwrap() - claims.payload["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 120);

    let (mut alice, connected) = common::connect_json(&alice, common::JSON).await;
    assert_eq!(connected["userId"], "alice", "{connected}");
    let (mut bob, connected) = common::connect_json(&bob, common::JSON).await;
    assert_eq!(connected["userId"], "bob", "{connected}");
    common::assert_ack_ok(&alice.join("g2", 1).await);
    for (ack_id, group) in [(2, "g0"), (3, "g1")] {
        let send = json!({"type": "sendToGroup", "group": group, "ackId": ack_id, "dataType": "text", "data": group});
        common::assert_ack_ok(&alice.call(send).await);
        // Bob is in his token's groups.
        let message = bob.next_json().await;
        assert_eq!(message["group"], group, "{message}");
        assert_eq!(message["fromUserId"], "alice", "{message}");
    }
    // Bob has no roles.
    common::assert_ack_error(&bob.join("g2", 1).await, "Forbidden");
    let send =
        json!({"type": "sendToGroup", "group": "g0", "ackId": 2, "dataType": "text", "data": "x"});
    common::assert_ack_error(&bob.call(send).await, "Forbidden");
}

#[tokio::test]
async fn client_url_signs_with_the_access_key_it_is_given() {
    let (_binary, port) = spawn_binary("k3y", &[]);
    let port = port.to_string();
    let url = client_url(&["--access-key", "k3y", "--port", &port, "--hub", "chat"]);
    let (_ws, connected) = common::connect_json(&url, common::JSON).await;
    assert_eq!(connected["userId"], Value::Null, "{connected}");
    let url = client_url(&["--access-key", "other", "--port", &port, "--hub", "chat"]);
    match common::try_connect(&url, Some(common::JSON)).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|ws| ws.protocol)),
    }
}

/// A hub name may hold '`', '[' and ']', which a URL path may not: the URL has them
/// percent-encoded (a WebSocket client refused it), the token's audience as the SDKs
/// sign it.
#[tokio::test]
async fn client_url_encodes_what_a_hub_name_holds_that_a_url_may_not() {
    let (_binary, port) = spawn_binary("k3y", &[]);
    let port = port.to_string();
    let url = client_url(&["--access-key", "k3y", "--port", &port, "--hub", "a`b[c]"]);
    let base = format!("ws://127.0.0.1:{port}/client/hubs/a%60b%5Bc%5D?access_token=");
    let token = url.strip_prefix(&base).unwrap_or_else(|| panic!("{url}"));
    let claims = webpubsub_emulator::auth::verify("k3y", token, true).unwrap();
    assert_eq!(
        claims.payload["aud"],
        format!("http://127.0.0.1:{port}/client/hubs/a`b[c]")
    );
    let (_ws, connected) = common::connect_json(&url, common::JSON).await;
    assert_eq!(connected["type"], "system", "{connected}");
}

#[test]
fn client_url_refuses_bad_arguments_naming_them() {
    let cs = "Endpoint=http://127.0.0.1;Port=8080;AccessKey=k;Version=1.0;";
    let key = ["--access-key", "k", "--port", "8080"];
    let hub = ["--hub", "chat"];
    for (args, expected) in [
        (vec![], "--hub"),
        (hub.to_vec(), "--connection-string"),
        (
            [
                &hub[..],
                &["--connection-string", "Endpoint=http://127.0.0.1"],
            ]
            .concat(),
            "AccessKey",
        ),
        (
            [&hub[..], &["--connection-string", "AccessKey=k"]].concat(),
            "Endpoint",
        ),
        (
            [
                &hub[..],
                &["--connection-string", "Endpoint=ws://h;AccessKey=k"],
            ]
            .concat(),
            "http://",
        ),
        (
            [
                &hub[..],
                &[
                    "--connection-string",
                    "Endpoint=http://h;Port=0;AccessKey=k",
                ],
            ]
            .concat(),
            "Port",
        ),
        (
            [&hub[..], &["--connection-string", cs, "--access-key", "k"]].concat(),
            "--access-key",
        ),
        ([&hub[..], &["--access-key", "k"]].concat(), "--port"),
        ([&hub[..], &["--port", "8080"]].concat(), "--access-key"),
        (
            [&hub[..], &["--access-key", "k", "--port", "0"]].concat(),
            "--port",
        ),
        (
            [&hub[..], &["--access-key", "", "--port", "8080"]].concat(),
            "--access-key",
        ),
        ([&key[..], &["--hub", "1chat"]].concat(), "hub name"),
        ([&key[..], &hub, &["--group", " "]].concat(), "group name"),
        ([&key[..], &hub, &["--user", ""]].concat(), "--user"),
        ([&key[..], &hub, &["--minutes", "0"]].concat(), "--minutes"),
        ([&key[..], &hub, &["--nope"]].concat(), "--nope"),
    ] {
        let args = [&["client-url"], &args[..]].concat();
        let err = fails_at_once(&args, 2);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // The server's flags are not the subcommand's.
    let err = fails_at_once(
        &[&["--port", "0", "client-url"], &hub[..], &key].concat(),
        2,
    );
    assert!(err.contains("client-url"), "{err}");
}

#[test]
fn help_names_the_client_url_command() {
    let (status, out, _) = run(&["--help"]);
    assert_eq!(status, Some(0));
    assert!(out.contains("client-url"), "{out}");
    let (status, out, _) = run(&["client-url", "--help"]);
    assert_eq!(status, Some(0));
    assert!(out.contains("--connection-string"), "{out}");
}
