//! `blockrep launch create|list|delete` through the admin API.

use anyhow::Result;
use blockrep_server::LaunchView;

use super::{admin_call, list_path, parse_answer};
use crate::cli::{LaunchCheckArgs, LaunchCommand, LaunchKindArg};
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
            ttl,
            follow,
            checks,
            admin,
        } => {
            let kind = match kind {
                LaunchKindArg::Test => "test",
                LaunchKindArg::Cutover => "cutover",
                LaunchKindArg::Standby => "standby",
            };
            let body = serde_json::json!({
                "source": source, "snapshot": snapshot, "name": name, "kind": kind,
                "allow_live": allow_live,
                "ttl_seconds": ttl.map(|t| t.as_secs_f64()),
                "checks": checks.names(),
                "must_succeed": checks.must_succeed,
                "follow": follow,
            });
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
                if let Some(expires) = v.expires_unix_ms {
                    println!("expires {}", print::unix_ms_text(expires));
                }
            }
            if v.consistency == "live" {
                // On stderr, so that --json output stays one JSON document.
                eprintln!(
                    "warning: launch {} is from the live snapshot {}: it holds a disk read \
                     while it changed, and its file system may be torn",
                    v.name, v.snapshot
                );
            }
            run_checks(&admin.admin, &v, &checks, admin.json).await
        }
        LaunchCommand::List { source, admin } => {
            let path = list_path("/v1/launches", source);
            admin
                .show("GET", &path, None, |list: Vec<LaunchView>| {
                    print::launches(&list)
                })
                .await
        }
        LaunchCommand::Fold { name, admin } => {
            let path = format!("/v1/launches/{name}/fold");
            admin
                .show("POST", &path, None, |v: serde_json::Value| {
                    println!(
                        "folded launch {name}: generation {} root {}",
                        v["generation"],
                        v["root"].as_str().unwrap_or("?")
                    )
                })
                .await
        }
        LaunchCommand::Materialize {
            name,
            to,
            volume,
            no_wait,
            admin,
        } => materialize(&name, &to, volume, no_wait, &admin).await,
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

/// Starts a materialization and, unless `no_wait`, follows it to the end.
async fn materialize(
    name: &str,
    to: &str,
    volume: Option<String>,
    no_wait: bool,
    admin: &crate::cli::AdminArgs,
) -> Result<()> {
    let path = format!("/v1/launches/{name}/materialize");
    let body = serde_json::json!({ "to": to, "volume": volume });
    let text = admin_call(&admin.admin, "POST", &path, Some(body)).await?;
    let mut view: blockrep_server::MaterializeView = parse_answer(&text)?;
    if admin.json && no_wait {
        println!("{text}");
        return Ok(());
    }
    let bar = (!admin.json).then(|| {
        let bar = indicatif::ProgressBar::new(view.size_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("launch {name}"));
        bar
    });
    while !view.done && !no_wait {
        if let Some(bar) = &bar {
            bar.set_position(view.copied_bytes);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let text = admin_call(&admin.admin, "GET", "/v1/launches", None).await?;
        let launches: Vec<LaunchView> = parse_answer(&text)?;
        view = launches
            .into_iter()
            .filter(|l| l.name == name)
            .flat_map(|l| l.materialize)
            .find(|m| m.volume == view.volume)
            .ok_or_else(|| anyhow::anyhow!("launch {name} is no longer being materialized"))?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if admin.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!("launch {name}: {}", print::materialize_text(&view));
    }
    Ok(())
}

/// Runs the launch's checks and reports each to the server; fails when one
/// failed (the launch stays: its record shows what failed).
async fn run_checks(
    admin: &str,
    launch: &LaunchView,
    args: &LaunchCheckArgs,
    json: bool,
) -> Result<()> {
    if args.names().is_empty() {
        return Ok(());
    }
    let urls: Vec<(String, String)> = match &launch.nbd_uri {
        Some(url) => vec![("disk".to_owned(), url.clone())],
        None => launch
            .volumes
            .iter()
            .filter_map(|v| Some((v.name.clone(), v.nbd_uri.clone()?)))
            .collect(),
    };
    // An `nbds://` export opens for the admin certificate: checks read it
    // with a copy named as libnbd and QEMU want it.
    let certs = match urls.iter().any(|(_, url)| url.starts_with("nbds://")) {
        true => crate::admin_client::tls_dir()
            .map(|dir| super::checks::CertDir::new(&dir))
            .transpose()?,
        false => None,
    };
    let urls = urls
        .into_iter()
        .map(|(volume, url)| match (&certs, url.starts_with("nbds://")) {
            (Some(certs), true) => {
                let with = format!("{url}?tls-certificates={}", certs.path().display());
                (volume, with)
            }
            _ => (volume, url),
        })
        .collect();
    let target = super::checks::Target {
        launch: launch.name.clone(),
        source: launch.source.clone(),
        urls,
        certs: certs.as_ref().map(|c| c.path().to_owned()),
    };
    let (args, run_on) = (args.clone(), target.clone());
    let results =
        tokio::task::spawn_blocking(move || super::checks::run_all(&args, &run_on)).await?;
    let mut failed = Vec::new();
    for check in results {
        let path = format!("/v1/launches/{}/checks", launch.name);
        let answer = admin_call(admin, "POST", &path, Some(serde_json::to_value(&check)?)).await?;
        if json {
            println!("{answer}");
        } else {
            println!(
                "check {} {} in {:.1}s",
                check.name,
                if check.passed { "passed" } else { "FAILED" },
                check.duration_ms as f64 / 1000.0
            );
        }
        if !check.passed {
            eprintln!("check {} output (end):\n{}", check.name, check.output_tail);
            failed.push(check.name);
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "launch {} failed its checks: {}",
            launch.name,
            failed.join(", ")
        );
    }
    Ok(())
}
