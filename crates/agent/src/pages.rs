//! The server's index pages, fetched and checked: the one way the agent
//! learns chunk ids it did not scan (the head's for an epoch's diff, a
//! launch's and its base's for failback).
//!
//! Nothing the server sends is trusted: each page must be the one asked for,
//! of the length its root implies, and hash to the page id its root names.

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Page, Root};
use blockrep_proto::{GET_PAGES_MAX, Message};

use crate::Error;
use crate::connection::{Connection, Transport};

/// Which root's pages are asked for, and how an error names that root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PagesOf {
    /// The source's head, for an epoch's diff (`GetPages`).
    Head,
    /// A failback's target, the launch's root (`GetPages`, answered from the
    /// launch once failback has started).
    FailbackTarget,
    /// A failback's base, the root the disk held at cutover (`GetBasePages`).
    FailbackBase,
}

impl PagesOf {
    fn request(self, indices: Vec<u32>) -> Message {
        match self {
            PagesOf::Head | PagesOf::FailbackTarget => Message::GetPages { indices },
            PagesOf::FailbackBase => Message::GetBasePages { indices },
        }
    }

    fn root_name(self) -> &'static str {
        match self {
            PagesOf::Head => "the head root",
            PagesOf::FailbackTarget | PagesOf::FailbackBase => "its root",
        }
    }
}

/// Fetches the index pages `pages` of `root` (`GET_PAGES_MAX` a request)
/// and, once each is checked against `root`, copies its chunk ids into
/// `ids` (every chunk id of the disk) at the page's chunks.
pub(crate) async fn fetch_pages(
    connection: &mut Connection<impl Transport>,
    root: &Root,
    of: PagesOf,
    pages: &[usize],
    ids: &mut [ChunkId],
) -> Result<(), Error> {
    for batch in pages.chunks(GET_PAGES_MAX) {
        let indices = batch.iter().map(|&p| p as u32).collect();
        connection.send(&of.request(indices)).await?;
        connection.flush().await?;
        for &page_index in batch {
            let Message::Page { index, ids: bytes } = connection.recv().await? else {
                return Err(Error::Protocol("expected Page".into()));
            };
            if index as usize != page_index {
                return Err(Error::Protocol(format!(
                    "asked for page {page_index}, got {index}"
                )));
            }
            let page = Page::decode(&bytes, root.page_len(page_index))
                .map_err(|e| Error::Protocol(format!("page {index}: {e}")))?;
            if page.id() != root.page_ids()[page_index] {
                return Err(Error::Protocol(format!(
                    "page {index} does not match {}",
                    of.root_name()
                )));
            }
            let start = page_index * CHUNKS_PER_PAGE;
            ids[start..start + page.ids().len()].copy_from_slice(page.ids());
        }
    }
    Ok(())
}
