//! `blockrep launch create|list|delete` through the admin API.

use anyhow::Result;
use blockrep_server::LaunchView;

use super::{admin_call, list_path, parse_answer};
use crate::cli::{LaunchCommand, LaunchKindArg};
use crate::print;

/// Creates, lists or deletes launch volumes.
pub(crate) async fn launch(command: LaunchCommand) -> Result<()> {
    match command {
        LaunchCommand::Create {
            source,
            snapshot,
            name,
            kind,
            allow_live,
            admin,
        } => {
            let kind = match kind {
                LaunchKindArg::Test => "test",
                LaunchKindArg::Cutover => "cutover",
            };
            let body = serde_json::json!({ "source": source, "snapshot": snapshot, "name": name, "kind": kind, "allow_live": allow_live });
            let text = admin_call(&admin.admin, "POST", "/v1/launches", Some(body)).await?;
            let v: LaunchView = parse_answer(&text)?;
            if admin.json {
                println!("{text}");
            } else {
                let served = v
                    .nbd_uri
                    .as_deref()
                    .unwrap_or("(the server has no NBD listener)");
                println!(
                    "launch {} of {} from snapshot {} ({}): {served}",
                    v.name, v.source, v.snapshot, v.consistency
                );
            }
            if v.consistency == "live" {
                // On stderr, so that --json output stays one JSON document.
                eprintln!(
                    "warning: launch {} is from the live snapshot {}: it holds a disk read \
                     while it changed, and its file system may be torn",
                    v.name, v.snapshot
                );
            }
            Ok(())
        }
        LaunchCommand::List { source, admin } => {
            let path = list_path("/v1/launches", source);
            admin
                .show("GET", &path, None, |list: Vec<LaunchView>| {
                    print::launches(&list)
                })
                .await
        }
        LaunchCommand::Delete { name, admin } => {
            let path = format!("/v1/launches/{name}");
            admin
                .show("DELETE", &path, None, |_: serde_json::Value| {
                    println!("deleted launch {name}")
                })
                .await
        }
    }
}
