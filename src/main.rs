//! `blockrep`: continuous block-level disk replication over mutual TLS.
//!
//! The binary only parses arguments, calls into the library crates and decides
//! the exit code: 0 on success, 1 on failure, 2 on a usage error.
#![forbid(unsafe_code)]

mod admin_client;
mod cli;
mod cmd;
mod print;
mod settings;
mod units;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    admin_client::set_tls_dir(cli.admin_tls_dir.clone());
    admin_client::set_token_file(cli.admin_token.clone());
    let result = match cli.command {
        Command::Cert(command) => cmd::cert(command),
        Command::Key(command) => cmd::key(command),
        Command::Source(command) => cmd::source(command),
        Command::Server(args) => {
            runtime().and_then(|rt| rt.block_on(cmd::server(args, cli.admin_token)))
        }
        Command::Agent(args) => runtime().and_then(|rt| rt.block_on(cmd::agent(args))),
        Command::Export(args) => cmd::export(args),
        Command::Gc(args) => runtime().and_then(|rt| rt.block_on(cmd::gc(args))),
        Command::Verify(args) => cmd::verify(args),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(cmd::status(args))),
        Command::Snapshot(command) => runtime().and_then(|rt| rt.block_on(cmd::snapshot(command))),
        Command::Launch(command) => runtime().and_then(|rt| rt.block_on(cmd::launch(command))),
        Command::Cutover(args) => runtime().and_then(|rt| rt.block_on(cmd::cutover(args))),
        Command::Failback(args) => runtime().and_then(|rt| rt.block_on(cmd::failback(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(cmd::bench(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blockrep: error: {}", print::describe(&error));
            ExitCode::FAILURE
        }
    }
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
