//! The rule that keeps a torn recovery point from being launched by mistake.
//!
//! A `live` snapshot was read from the live disk over time: its chunks may
//! come from different moments, and the file system on it may not mount or
//! boot. `launch create` from one is refused unless the operator says
//! `--allow-live` (`"allow_live": true` in the admin API); the launch then
//! keeps the `live` label. The cutover launch is made by the server from the
//! final commit, not through this gate: it is labelled, never refused.

use blockrep_core::{Consistency, SourceId};
use blockrep_store::{Error, LaunchInfo, LaunchKind, Store};

/// Whether snapshot `snapshot` of `source` may be launched: `Some(why)` when
/// it is `live` and `allow_live` is not set (a missing snapshot is left to
/// the launch itself to report).
pub(crate) fn refusal(
    store: &Store,
    source: &SourceId,
    snapshot: &str,
    allow_live: bool,
) -> Result<Option<String>, Error> {
    let live = store
        .snapshot(source, snapshot)?
        .is_some_and(|found| found.consistency == Consistency::Live);
    if live && !allow_live {
        return Ok(Some(format!(
            "snapshot {snapshot} of {source} is live: it was read from the live disk \
                 while it changed, so its file system may be torn and may not boot; launch \
                 a crash-consistent or quiesced snapshot, or pass --allow-live \
                 (\"allow_live\": true in the API) to launch it anyway"
        )));
    }
    Ok(None)
}

/// Creates the launch if the gate lets it: checked before, and again on the
/// launch made, whose label is the one its snapshot had when it was read (a
/// snapshot deleted and re-made `live` under the same name in between is
/// caught then; the launch is deleted again). `Ok(Err(why))` is a refusal.
pub(crate) fn create(
    store: &Store,
    source: &SourceId,
    snapshot: &str,
    name: &str,
    kind: LaunchKind,
    allow_live: bool,
    workflow: &blockrep_store::LaunchWorkflow,
) -> Result<Result<LaunchInfo, String>, Error> {
    if let Some(why) = refusal(store, source, snapshot, allow_live)? {
        return Ok(Err(why));
    }
    let launch = store.create_launch_with(
        source,
        snapshot,
        name,
        kind,
        blockrep_core::clock::now_unix_ms(),
        workflow,
    )?;
    if launch.consistency == Consistency::Live && !allow_live {
        store.delete_launch(&launch.name)?;
        return Ok(Err(format!(
            "snapshot {snapshot} of {source} became live while the launch was made: \
             pass --allow-live (\"allow_live\": true in the API) to launch it anyway"
        )));
    }
    Ok(Ok(launch))
}
