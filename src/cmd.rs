//! One handler per command: each turns its parsed flags into calls of the
//! library crates (or of the admin API) and prints the outcome through `print`.

mod agent;
mod bench;
mod cert;
mod checks;
mod cutover;
mod export;
mod failback;
mod gc;
mod key;
mod launch;
mod server;
mod snapshot;
mod source;
mod status;
mod verify;

pub(crate) use agent::agent;
pub(crate) use bench::bench;
pub(crate) use cert::cert;
pub(crate) use cutover::cutover;
pub(crate) use export::export;
pub(crate) use failback::failback;
pub(crate) use gc::gc;
pub(crate) use key::key;
pub(crate) use launch::launch;
pub(crate) use server::server;
pub(crate) use snapshot::snapshot;
pub(crate) use source::source;
pub(crate) use status::status;
pub(crate) use verify::verify;

use anyhow::{Context, Result, bail};
use blockrep_core::SourceId;

use crate::admin_client;
use crate::cli::AdminArgs;

/// Runs an admin request from a command that is otherwise synchronous.
fn runtime_block_on(work: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

fn source_id(text: &str) -> Result<SourceId> {
    SourceId::new(text).map_err(Into::into)
}

/// Resolves on SIGINT or SIGTERM: the end of a long-running command.
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

/// A watch channel that turns true on SIGINT or SIGTERM, for the agent's loops.
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    stop_rx
}

/// Calls the admin API; a non-2xx answer becomes an error carrying its message.
async fn admin_call(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<String> {
    let body = body.map(|b| b.to_string());
    let (code, text) = admin_client::request(admin, method, path, body.as_deref()).await?;
    if !(200..300).contains(&code) {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        bail!("{message} (HTTP {code})");
    }
    Ok(text)
}

impl AdminArgs {
    /// Calls the admin API and prints the answer: its JSON with `--json`,
    /// otherwise what `human` makes of it.
    async fn show<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        human: impl FnOnce(T),
    ) -> Result<()> {
        let text = admin_call(&self.admin, method, path, body).await?;
        if self.json {
            println!("{text}");
        } else {
            human(parse_answer(&text)?);
        }
        Ok(())
    }
}

/// The admin API's JSON answer as `T`.
fn parse_answer<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).context("unexpected JSON from the admin API")
}

/// The admin path of a list, filtered by source when one is given.
fn list_path(base: &str, source: Option<String>) -> String {
    source.map_or_else(|| base.to_owned(), |s| format!("{base}?source={s}"))
}
