//! The binary: connection string first on stdout, clean exit on SIGTERM, a plain log
//! on a pipe, bad flags.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::spawn_binary;

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
    assert!(port.parse::<u16>().unwrap() > 0);
    assert_eq!(tail, "AccessKey=k3y;Version=1.0;");
    // It serves: the stats route answers.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()))
        .expect("listening");
    std::io::Write::write_all(
        &mut stream,
        b"GET /_emulator/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its log, to a pipe: plain text, without a terminal's colour codes.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("listening on"), "{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = Command::new(BIN)
        .args(["--port", "notaport"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port"));
    let out = Command::new(BIN)
        .args(["--tls-cert", "/nonexistent.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "--tls-cert needs --tls-key");
    let out = Command::new(BIN)
        .args([
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"));
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
