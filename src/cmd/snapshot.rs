//! `blockrep snapshot create|list|delete` through the admin API.

use anyhow::Result;
use blockrep_server::SnapshotView;

use super::list_path;
use crate::cli::SnapshotCommand;
use crate::print;

/// Creates, lists or deletes snapshots.
pub(crate) async fn snapshot(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create {
            source,
            launch,
            name,
            ttl,
            admin,
        } => {
            let body = serde_json::json!({
                "source": source.unwrap_or_default(), "launch": launch, "name": name,
                "ttl_seconds": ttl.map(|t| t.as_secs_f64()),
            });
            admin
                .show("POST", "/v1/snapshots", Some(body), |v: SnapshotView| {
                    println!(
                        "snapshot {} of {} at epoch {} (root {}, {})",
                        v.name, v.source, v.epoch, v.root, v.consistency
                    );
                })
                .await
        }
        SnapshotCommand::List { source, admin } => {
            let path = list_path("/v1/snapshots", source);
            admin
                .show("GET", &path, None, |list: Vec<SnapshotView>| {
                    print::snapshots(&list)
                })
                .await
        }
        SnapshotCommand::Delete {
            source,
            name,
            admin,
        } => {
            let path = format!("/v1/snapshots/{source}/{name}");
            admin
                .show("DELETE", &path, None, |_: serde_json::Value| {
                    println!("deleted snapshot {name} of {source}");
                })
                .await
        }
    }
}
