//! `blockrep status`: every source's state, lag and backlog from the admin API.

use anyhow::{Result, bail};

use super::parse_answer;
use crate::admin_client;
use crate::cli::StatusArgs;
use crate::print;

/// Prints the sources table (or the API's JSON with `--json`).
pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let path = if args.all {
        "/v1/sources?all=true"
    } else {
        "/v1/sources"
    };
    let (code, body) = admin_client::request(&args.admin, "GET", path, None).await?;
    if code != 200 {
        bail!("admin API answered {code}: {body}");
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let sources: Vec<blockrep_server::SourceView> = parse_answer(&body)?;
    print::sources(&sources);
    Ok(())
}
