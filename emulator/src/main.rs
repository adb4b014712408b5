//! `webpubsub-emulator`: runs the local Web PubSub server until Ctrl-C or SIGTERM.
//! The first stdout line is the connection string; logs go to stderr.
//! `webpubsub-emulator client-url` prints a client access URL instead, and exits.

use std::io::IsTerminal;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::Parser;
use webpubsub_emulator::connection_string::ConnectionString;
use webpubsub_emulator::names::{validate_group, validate_hub};
use webpubsub_emulator::{Config, Emulator, SystemEvents, TlsFiles, TokenOptions};

/// A local Azure Web PubSub-compatible server for development and tests.
#[derive(Parser, Debug)]
#[command(
    name = "webpubsub-emulator",
    version,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: the OS picks one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Access key signing tokens (default: random): non-empty, without ';' or control
    /// characters, as it goes into the connection string.
    #[arg(long)]
    access_key: Option<String>,
    /// http:// URL receiving user events and invocations as CloudEvents (checked at
    /// start; it need not be reachable yet).
    #[arg(long)]
    upstream: Option<String>,
    /// System events posted to the upstream: a comma-separated list of connect,
    /// connected and disconnected (empty: none).
    #[arg(long, value_name = "EVENTS", default_value = "connected,disconnected")]
    upstream_system_events: SystemEvents,
    /// Fault injection: abruptly drop every client socket every N ms (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    fault_drop_every_ms: Option<u64>,
    /// Largest WebSocket message accepted from a client, and largest upstream reply body read, in bytes.
    #[arg(long, value_name = "N", default_value_t = 1024 * 1024)]
    max_frame_bytes: usize,
    /// How long a dropped reliable connection stays recoverable, in ms.
    #[arg(long, value_name = "N", default_value_t = 30_000)]
    recovery_window_ms: u64,
    /// Reliable protocol: unacknowledged messages kept per connection.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_unacked_frames: usize,
    /// Reliable protocol: unacknowledged bytes kept per connection.
    #[arg(long, value_name = "N", default_value_t = 16 * 1024 * 1024)]
    max_unacked_bytes: usize,
    /// Bytes queued to one socket before a client that does not read is closed.
    #[arg(long, value_name = "N", default_value_t = 64 * 1024 * 1024)]
    max_outbound_bytes: usize,
    /// Each client socket's read buffer, in bytes, 1024 to 16 MiB (what an idle client costs; larger reads a fast publisher's bursts in fewer calls).
    #[arg(long, value_name = "N", default_value_t = 8 * 1024, value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    read_buffer_bytes: u32,
    /// Longest wait for a TLS handshake, an HTTP request head or REST body, and longest idle keep-alive, in ms (at least 1).
    #[arg(long, value_name = "N", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    http_timeout_ms: u64,
    /// Client connections at once, over all hubs; more get HTTP 429.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    max_connections: usize,
    /// Groups one connection may be in at once.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_groups_per_connection: usize,
    /// Keep-alive: ping a client socket that has sent nothing for N ms (0: never).
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    keep_alive_interval_ms: u64,
    /// Keep-alive: drop a client socket that has sent nothing for N ms, as if its TCP
    /// connection had died (0: never).
    #[arg(long, value_name = "N", default_value_t = 60_000)]
    keep_alive_timeout_ms: u64,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Prints a client access URL for a hub, signed offline with the emulator's access
    /// key as the server SDKs sign it, and exits.
    ClientUrl(ClientUrl),
}

/// What the token of `client-url` grants, and the emulator it is for.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("emulator").required(true).args(["connection_string", "access_key"])))]
struct ClientUrl {
    /// The connection string the emulator prints first.
    #[arg(long, value_name = "CS", conflicts_with_all = ["access_key", "port"])]
    connection_string: Option<ConnectionString>,
    /// Instead of --connection-string: the emulator's access key (the URL is
    /// ws://127.0.0.1:PORT/...; for an emulator on another --host or with TLS, give its
    /// connection string).
    #[arg(long, value_name = "KEY", requires = "port", value_parser = NonEmptyStringValueParser::new())]
    access_key: Option<String>,
    /// With --access-key: the emulator's port.
    #[arg(long, value_name = "N", requires = "access_key", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// The hub.
    #[arg(long, value_parser = name(validate_hub))]
    hub: String,
    /// User id (the token's `sub`).
    #[arg(long, value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
    user: Option<String>,
    /// A role, e.g. webpubsub.joinLeaveGroup or webpubsub.sendToGroup.GROUP (repeat for more).
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// A group joined at connect (repeat for more).
    #[arg(long = "group", value_name = "GROUP", value_parser = name(validate_group))]
    groups: Vec<String>,
    /// Lifetime of the token, in minutes (at least 1).
    #[arg(long, value_name = "N", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    minutes: u32,
}

/// A value parser for the names `validate` accepts.
fn name(
    validate: fn(&str) -> Result<(), String>,
) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |s| validate(s).map(|()| s.to_owned())
}

/// The URL `client-url` prints.
fn client_url(request: ClientUrl) -> String {
    let emulator = match (request.connection_string, request.access_key, request.port) {
        (Some(cs), _, _) => cs,
        (None, Some(access_key), Some(port)) => ConnectionString {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
        },
        _ => unreachable!("clap requires --connection-string, or --access-key and --port"),
    };
    emulator.client_url(
        &request.hub,
        &TokenOptions {
            user_id: request.user,
            roles: request.roles,
            groups: request.groups,
            ttl: Some(Duration::from_secs(u64::from(request.minutes) * 60)),
        },
    )
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, so
/// call it before announcing readiness.
#[cfg(unix)]
fn terminated() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn terminated() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// The library configuration the flags ask for.
fn config(args: Args) -> Config {
    Config {
        host: args.host,
        port: args.port,
        access_key: args.access_key,
        upstream: args.upstream,
        upstream_system_events: args.upstream_system_events,
        fault_drop_every_ms: args.fault_drop_every_ms,
        max_frame_bytes: args.max_frame_bytes,
        recovery_window: Duration::from_millis(args.recovery_window_ms),
        max_unacked_frames: args.max_unacked_frames,
        max_unacked_bytes: args.max_unacked_bytes,
        max_outbound_bytes: args.max_outbound_bytes,
        read_buffer_bytes: args.read_buffer_bytes as usize,
        http_timeout: Duration::from_millis(args.http_timeout_ms),
        max_connections: args.max_connections,
        max_groups_per_connection: args.max_groups_per_connection,
        keep_alive_interval: Duration::from_millis(args.keep_alive_interval_ms),
        keep_alive_timeout: Duration::from_millis(args.keep_alive_timeout_ms),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        ..Config::default()
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::ClientUrl(request)) = args.command.take() {
        let url = client_url(request);
        return match writeln!(std::io::stdout(), "{url}") {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("webpubsub-emulator: cannot print the URL: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        // A log nobody reads (a closed pipe) is lost, instead of a panic on reporting it.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = config(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("webpubsub-emulator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let emulator = match Emulator::start(config).await {
            Ok(e) => e,
            Err(e) => {
                eprintln!("webpubsub-emulator: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = match terminated() {
            Ok(stop) => stop,
            Err(e) => {
                eprintln!("webpubsub-emulator: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", emulator.connection_string());
        let _ = out.flush();
        drop(out);
        tracing::info!("listening on {}", emulator.endpoint());
        stop.await;
        tracing::info!("shutting down");
        emulator.shutdown().await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_default_to_the_library_defaults() {
        let flags = config(Args::parse_from(["webpubsub-emulator"]));
        assert_eq!(format!("{flags:?}"), format!("{:?}", Config::default()));
    }
}
