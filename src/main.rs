//! `blockrep`: continuous block-level disk replication over mutual TLS.
//!
//! The binary only parses arguments, calls into the library crates and decides
//! the exit code: 0 on success, 1 on failure, 2 on a usage error.
#![forbid(unsafe_code)]

mod bench;
mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blockrep_agent::{AgentConfig, Compression, EpochReport};
use blockrep_core::SourceId;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Continuous block-level replication of whole disks over mutual TLS.
///
/// An agent beside a source disk finds changed chunks by blake3 hashing and
/// streams them to a replication server, which keeps a verified, durable replica
/// of every source.
#[derive(Debug, Parser)]
#[command(name = "blockrep", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make the private CA and certificates for servers, sources and the admin.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Run the replication server.
    Server(ServerArgs),
    /// Replicate a disk to a server.
    Agent(AgentArgs),
    /// Write a source's committed replica to a sparse raw image.
    Export(ExportArgs),
    /// Measure replication end to end on a synthetic disk (real TLS on loopback).
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create a private CA (ca.crt, ca.key) and a server certificate (server.crt, server.key).
    Init {
        /// Directory for the files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address the server is reached at (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        server_names: Vec<String>,
        /// Replace an existing CA (certificates it issued stop working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for a source (ID.crt, ID.key) or the admin.
    Issue {
        /// Directory holding ca.crt and ca.key; the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// Source id to bind into the certificate: [a-z0-9][a-z0-9._-]{0,63}.
        #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
        source: Option<String>,
        /// Issue the admin certificate (admin.crt, admin.key) instead.
        #[arg(long)]
        admin: bool,
    },
}

/// TLS files of a client: `--tls-dir` with per-file overrides.
#[derive(Debug, Args)]
struct ClientTls {
    /// Directory with ca.crt, ID.crt and ID.key.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// CA certificate (default: TLS_DIR/ca.crt).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (default: TLS_DIR/ID.crt).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (default: TLS_DIR/ID.key).
    #[arg(long)]
    key: Option<PathBuf>,
}

impl ClientTls {
    fn resolve(&self, source: &SourceId) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let pick = |explicit: &Option<PathBuf>, name: String| -> Result<PathBuf> {
            match (explicit, &self.tls_dir) {
                (Some(path), _) => Ok(path.clone()),
                (None, Some(dir)) => Ok(dir.join(name)),
                (None, None) => bail!("give --tls-dir, or --ca, --cert and --key"),
            }
        };
        Ok((
            pick(&self.ca, "ca.crt".into())?,
            pick(&self.cert, format!("{source}.crt"))?,
            pick(&self.key, format!("{source}.key"))?,
        ))
    }
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// Address of the replication listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Data directory of the replica store (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Directory with ca.crt, server.crt and server.key.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Most connections open at once.
    #[arg(long, default_value_t = 1024)]
    connections_max: usize,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Source disk: a raw image file or a block device.
    #[arg(long)]
    disk: PathBuf,
    /// Replication server, host:port.
    #[arg(long)]
    to: String,
    /// This source's id (must match its certificate).
    #[arg(long)]
    source: String,
    #[command(flatten)]
    tls: ClientTls,
    /// Sync until the replica equals the disk, then exit.
    #[arg(long)]
    once: bool,
    /// Chunk size of a new replica: a power of two from 4KiB to 4MiB.
    #[arg(long, default_value = "64KiB", value_parser = units::parse_size)]
    chunk_size: u64,
    /// Time from the start of one scan to the next, in continuous mode.
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    interval: Duration,
    /// Compression of changed chunks.
    #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
    compress: CompressArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressArg {
    /// zstd where it pays.
    Auto,
    /// Never compress.
    None,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Data directory of the server's store.
    #[arg(long)]
    data: PathBuf,
    /// Source to export.
    #[arg(long)]
    source: String,
    /// Output image (replaced if it exists).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Cert(command) => cert(command),
        Command::Server(args) => runtime().and_then(|rt| rt.block_on(server(args))),
        Command::Agent(args) => runtime().and_then(|rt| rt.block_on(agent(args))),
        Command::Export(args) => export(args),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blockrep: error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message
/// before it already carries (library errors name their cause in their message).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn source_id(text: &str) -> Result<SourceId> {
    SourceId::new(text).map_err(Into::into)
}

fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Init {
            dir,
            server_names,
            force,
        } => {
            blockrep_pki::init_ca(&dir, &server_names, force)?;
            println!(
                "wrote {0}/ca.crt, {0}/ca.key, {0}/server.crt, {0}/server.key (server names: {1})",
                dir.display(),
                server_names.join(", ")
            );
        }
        CertCommand::Issue { dir, source, admin } => {
            let (cert, key) = if admin {
                blockrep_pki::issue_admin(&dir)?
            } else {
                let source = source_id(source.as_deref().unwrap_or_default())?;
                blockrep_pki::issue_source(&dir, &source)?
            };
            println!("wrote {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

async fn server(args: ServerArgs) -> Result<()> {
    let mut config = blockrep_server::ServerConfig::new(args.listen, args.data, args.tls_dir);
    config.connections_max = args.connections_max;
    let server = blockrep_server::Server::bind(config).await?;
    // Tests and scripts read this line to find an ephemeral port.
    println!("listening on {}", server.local_addr()?);
    server.run(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub(crate) fn print_epoch(report: &EpochReport) {
    println!(
        "epoch {} committed root={} chunks_sent={} zero_chunks_sent={} bytes_sent={} raw_bytes_sent={} \
         server_chunks_received={} server_chunks_stored={} scan_ms={} transfer_ms={}",
        report.epoch,
        report.root,
        report.chunks_sent,
        report.zero_chunks_sent,
        report.bytes_sent,
        report.raw_bytes_sent,
        report.server_chunks_received,
        report.server_chunks_stored,
        report.scan_duration.as_millis(),
        report.transfer_duration.as_millis(),
    );
}

fn agent_config(args: &AgentArgs) -> Result<AgentConfig> {
    let source = source_id(&args.source)?;
    let (ca_path, cert_path, key_path) = args.tls.resolve(&source)?;
    let chunk_size_bytes = u32::try_from(args.chunk_size).context("chunk size too large")?;
    blockrep_core::Geometry::new(0, chunk_size_bytes)?;
    Ok(AgentConfig {
        disk: args.disk.clone(),
        server: args.to.clone(),
        source,
        ca_path,
        cert_path,
        key_path,
        chunk_size_bytes,
        compression: match args.compress {
            CompressArg::Auto => Compression::Auto,
            CompressArg::None => Compression::None,
        },
        interval: args.interval,
        backoff_max: Duration::from_secs(30),
    })
}

async fn agent(args: AgentArgs) -> Result<()> {
    let config = agent_config(&args)?;
    if args.once {
        let reports = blockrep_agent::run_once(&config, print_epoch).await?;
        match reports.last() {
            Some(last) => println!(
                "replica equals disk: epoch {} root={}",
                last.epoch, last.root
            ),
            None => println!("replica already equals disk"),
        }
        return Ok(());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    blockrep_agent::run(&config, stop_rx, print_epoch).await?;
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let source = source_id(&args.source)?;
    let store = blockrep_store::Store::open_read_only(&args.data)?;
    let stats = store.export(&source, &args.out)?;
    println!(
        "exported source {source} epoch {} ({} bytes, {} non-zero chunks) to {}",
        stats.head.epoch,
        stats.disk_size_bytes,
        stats.chunks_written,
        display(&args.out)
    );
    Ok(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
