//! Records another server of the bucket wrote, read again for a listing.
//!
//! A server's working copy has the records of the sources it serves as they
//! are (it writes them), and those of other sources as it last read them: at
//! open, or when it last took their lease. Before it lists snapshots or
//! launches, it reads those again, fetching only the records whose ETag
//! changed since it last read them.

use std::collections::BTreeMap;
use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_objects::Listed;

use super::{BucketRecords, Remote, bucket_error};
use crate::error::Error;
use crate::store::Store;
use crate::vfs::RealFs;

/// The bucket's `listed` objects directly under `dir/NAME/`, by `NAME`.
fn by_name(listed: Vec<Listed>, dir: &str) -> BTreeMap<String, Vec<Listed>> {
    let mut out: BTreeMap<String, Vec<Listed>> = BTreeMap::new();
    for object in listed {
        let mut parts = object.key.split('/');
        if parts.next() == Some(dir)
            && let Some(name) = parts.next()
        {
            out.entry(name.to_owned()).or_default().push(object);
        }
    }
    out
}

impl Store {
    /// The records layer over this data directory's own file system, for
    /// writing what the bucket holds without publishing it again.
    fn records(&self, remote: &Arc<Remote>) -> BucketRecords {
        BucketRecords::new(
            Arc::new(RealFs),
            self.data_dir().to_owned(),
            Arc::clone(remote),
        )
    }

    /// For a store in a bucket: reads again the snapshot records of `source`
    /// (or of every source) that another server may have written, so that
    /// a listing here shows what the bucket holds. A source this server
    /// serves (its lease held at `now_unix_ms`) is skipped: its records here
    /// are the newest. Only records that changed are read (their ETags
    /// differ), plus one listing of the bucket. Returns how many records
    /// changed; 0 for a local store.
    pub fn refresh_snapshots(
        &self,
        source: Option<&SourceId>,
        now_unix_ms: u64,
    ) -> Result<usize, Error> {
        self.refresh_per_source(source.map(std::slice::from_ref), "/snapshots", now_unix_ms)
    }

    /// For a store in a bucket: reads again the records of `sources`
    /// themselves (head, lifecycle, migration history, tenant, failed
    /// checks) as the bucket holds them, as [`Store::refresh_snapshots`]
    /// does for their snapshots; a source this server serves is skipped.
    /// A head read this way may name blobs of packs this server has not
    /// read yet: what reads them (a session, a launch, a snapshot) takes
    /// the source's lease first, which reads the packs. Returns how many
    /// records changed; 0 for a local store.
    pub fn refresh_sources(&self, sources: &[SourceId], now_unix_ms: u64) -> Result<usize, Error> {
        self.refresh_per_source(Some(sources), "", now_unix_ms)
    }

    /// The records at `sources/ID{level}` of the sources `only` names (or of
    /// every source the bucket or this server knows: one this server knows
    /// alone was deleted, and its records there go too), but those this
    /// server serves, brought up to the bucket's with one listing.
    fn refresh_per_source(
        &self,
        only: Option<&[SourceId]>,
        level: &str,
        now_unix_ms: u64,
    ) -> Result<usize, Error> {
        let Some(remote) = &self.remote else {
            return Ok(0);
        };
        // Not beside a claim, which replaces a source's records whole. This
        // server changes the records only of a source it serves, which a
        // refresh skips, and it can start serving one only through a claim:
        // the catalog's lock is not needed, and not held across the
        // bucket's requests (a cutover's snapshot waits on it).
        let _one = crate::mutex::lock(&remote.claiming);
        let prefix = match only {
            Some([]) => return Ok(0),
            Some([one]) => format!("sources/{}", one.as_str()),
            _ => "sources".to_owned(),
        };
        let listed = remote
            .bucket
            .list_tagged(&prefix)
            .map_err(|e| bucket_error(format!("cannot list {prefix}/ in the bucket"), e))?;
        let mut by_source = by_name(listed, "sources");
        let sources: Vec<SourceId> = match only {
            Some(only) => only.to_vec(),
            None => {
                let known =
                    crate::catalog::list_names(self.vfs(), &self.data_dir().join("sources"))?;
                let mut names: std::collections::BTreeSet<String> =
                    by_source.keys().cloned().collect();
                names.extend(known);
                names
                    .iter()
                    .filter_map(|name| SourceId::new(name).ok())
                    .collect()
            }
        };
        let records = self.records(remote);
        let mut changed = 0;
        for source in sources {
            if self.serves(&source, now_unix_ms) {
                continue;
            }
            let dir = format!("sources/{}{level}", source.as_str());
            let listed = by_source.remove(source.as_str()).unwrap_or_default();
            changed += records.refresh_level(&dir, &listed)?;
        }
        Ok(changed)
    }

    /// For a store in a bucket: reads again the records of the launches
    /// another server may have made, changed or deleted, as
    /// [`Store::refresh_snapshots`] does for snapshots. A launch is skipped
    /// when this server serves its source or has a volume of it open; a
    /// launch new to this server is read once the bucket has its head.
    /// Returns how many records changed; 0 for a local store.
    pub fn refresh_launches(&self, now_unix_ms: u64) -> Result<usize, Error> {
        let Some(remote) = &self.remote else {
            return Ok(0);
        };
        // As for snapshots: this server makes, changes and opens the launches
        // of a source it serves (skipped here), or takes its lease first,
        // which waits for this lock; the catalog's is not held across the
        // bucket's requests. (An expiry of a launch of a source nobody
        // serves may race with a refresh that read it before: the refresh
        // after it removes what is left.)
        let _one = crate::mutex::lock(&remote.claiming);
        let records = self.records(remote);
        let listed = remote
            .bucket
            .list_tagged("launches")
            .map_err(|e| bucket_error("cannot list launches/ in the bucket", e))?;
        let mut launches = by_name(listed, "launches");
        for name in crate::catalog::list_names(self.vfs(), &self.launches_dir())? {
            launches.entry(name).or_default();
        }
        let open: Vec<String> = crate::mutex::lock(&self.catalog.open_launches)
            .iter()
            .filter(|(_, volume)| volume.strong_count() > 0)
            .map(|(key, _)| key.split('/').next().unwrap_or_default().to_owned())
            .collect();
        let mut plans = Vec::new();
        for (name, listed) in &launches {
            if open.contains(name) || crate::catalog::validate_name("launch", name).is_err() {
                continue;
            }
            let source = match self.read_launch(name, false) {
                Ok(Some(info)) if self.serves(&info.source, now_unix_ms) => continue,
                Ok(Some(info)) => Some(info.source),
                // New here: wait until the bucket has the whole launch.
                Ok(None) => {
                    let has = |file: &str| listed.iter().any(|o| o.key.ends_with(file));
                    if !(has("/meta") && has("/head")) {
                        continue;
                    }
                    None
                }
                // Unreadable here: the bucket's copy replaces it.
                Err(_) => None,
            };
            let plan = records.plan_level(&format!("launches/{name}"), listed)?;
            if !plan.is_empty() {
                let gone = listed.is_empty().then_some(source);
                plans.push((name, gone, plan));
            }
        }
        if plans.is_empty() {
            return Ok(0);
        }
        // A launch names its root's blobs: the packs the bucket listed by
        // now hold them (records are published after their packs), and are
        // indexed here before any launch that names them is.
        self.blobs.refresh()?;
        let mut changed = 0;
        let mut newer = Vec::new();
        for (name, gone, plan) in plans {
            let Some(source) = gone else {
                let applied = records.apply_level(plan)?;
                changed += applied.changed;
                if applied.newer_than_listed {
                    newer.extend(applied.read);
                }
                continue;
            };
            // Deleted elsewhere: removed here as a deletion here removes it
            // (its records not published: the bucket's went first).
            self.remove_launch_with(name, source.as_ref(), || {
                changed += records.apply_level(plan)?.changed;
                records.remove_level(&format!("launches/{name}"))
            })?;
        }
        if !newer.is_empty()
            && let Err(e) = self.blobs.refresh()
        {
            // Read again next time, and the packs with them: a version
            // this server holds would otherwise look current.
            for key in newer {
                remote.set_version(&key, None);
            }
            return Err(e);
        }
        Ok(changed)
    }
}
