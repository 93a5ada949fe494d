//! `blockrep cutover`: ask a source's agent to cut over and wait for it, or
//! reset a cut-over source.

use std::time::Duration;

use anyhow::{Result, bail};

use super::admin_call;
use crate::cli::CutoverArgs;

/// Requests the cutover (and waits for it unless `--no-wait`), or resets the source.
pub(crate) async fn cutover(args: CutoverArgs) -> Result<()> {
    let admin = &args.admin.admin;
    if args.reset {
        let path = format!("/v1/sources/{}/reset", args.source);
        return args
            .admin
            .show("POST", &path, None, |_: serde_json::Value| {
                println!("source {} reset: replication allowed again", args.source);
            })
            .await;
    }
    admin_call(
        admin,
        "POST",
        &format!("/v1/sources/{}/cutover", args.source),
        Some(serde_json::json!({ "force": args.force })),
    )
    .await?;
    if args.no_wait {
        println!(
            "cutover of {} requested; the agent runs it at its next commit",
            args.source
        );
        return Ok(());
    }
    let deadline = std::time::Instant::now() + args.timeout;
    loop {
        let text = admin_call(admin, "GET", &format!("/v1/sources/{}", args.source), None).await?;
        let view: blockrep_server::SourceView = serde_json::from_str(&text)?;
        if let Some(cutover) = &view.cutover
            && !view.cutover_requested
            && view.state != blockrep_server::SourceState::CuttingOver
        {
            if args.admin.json {
                println!("{text}");
            } else {
                println!(
                    "cutover complete: epoch {} root={} launch={} snapshot={}",
                    cutover.epoch, cutover.root, cutover.launch, cutover.snapshot
                );
                println!(
                    "downtime_ms={} final_scan_ms={} transfer_ms={} commit_ms={} launch_ready_ms={}",
                    cutover.downtime_ms,
                    cutover.scan_ms,
                    cutover.transfer_ms,
                    cutover.commit_ms,
                    cutover.launch_ms
                );
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the agent of {} has not cut over within {:?} (is it connected?)",
                args.source,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
