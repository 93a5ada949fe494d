//! The consistency label of what a session commits.
//!
//! A complete epoch's root is what its scan read, so it takes the label the
//! agent sent. An intermediate step mixes the head with part of a scan: it is
//! `live` whatever the agent says (the store enforces the same). An epoch that
//! changed nothing is the head's root found again by a new scan: if that scan
//! read a frozen view, the head is that point too, and its label rises to the
//! scan's; a weaker label never lowers it.

use std::sync::Arc;

use blockrep_core::{ChunkId, Consistency};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Outcome, Session, internal};

/// The label a commit of a new root is stored with.
pub(super) fn commit_label(complete: bool, consistency: Consistency) -> Consistency {
    if complete {
        consistency
    } else {
        Consistency::Live
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// An unchanged epoch: raises the head's label when a complete scan
    /// labelled `consistency` found it again. Returns the head's label when it
    /// was read, `None` when nothing was looked at (an intermediate step).
    pub(super) async fn confirm_head(
        &mut self,
        epoch: u64,
        root: ChunkId,
        complete: bool,
        consistency: Consistency,
    ) -> Result<Option<Consistency>, Outcome> {
        if !complete {
            // Nothing to write, but nothing is acknowledged by a store
            // whose fsync failed either: the head it holds may not be durable.
            self.shared
                .store
                .check_synced()
                .map_err(|e| internal(format!("cannot confirm the head: {e}")))?;
            return Ok(None);
        }
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let confirming = tokio::task::spawn_blocking(move || {
            store.confirm_head(&source, epoch, &root, consistency)
        });
        let head = self
            .connection
            .working(confirming)
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("cannot record the head's label: {e}")))?;
        Ok(Some(head.consistency))
    }
}
