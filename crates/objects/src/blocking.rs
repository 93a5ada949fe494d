//! A [`Bucket`] for synchronous callers. The replica store is synchronous
//! code (its callers run it on blocking threads), so each call here runs on a
//! small runtime of its own and the calling thread waits for the outcome. The
//! call is handed over rather than `block_on`ed, so it is also safe from a
//! thread that belongs to another runtime.

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;

use bytes::Bytes;

use crate::{Bucket, Error, Lease, LeaseRecord, Listed, Version};

/// Worker threads of the runtime requests run on: requests wait on the
/// network, not the CPU.
const WORKER_THREADS: usize = 2;

/// A [`Bucket`] whose methods block until the request is done.
#[derive(Debug)]
pub struct BlockingBucket {
    bucket: Bucket,
    /// Always `Some` until dropped (taken to shut down without waiting).
    runtime: Option<tokio::runtime::Runtime>,
}

impl BlockingBucket {
    /// Wraps `bucket`, starting the runtime its requests run on.
    pub fn new(bucket: Bucket) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("blockrep-bucket")
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                what: "cannot start the bucket client's runtime".into(),
                source,
            })?;
        Ok(Self {
            bucket,
            runtime: Some(runtime),
        })
    }

    /// The asynchronous bucket underneath.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    fn run<T, F>(&self, call: impl FnOnce(Bucket) -> F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let future = call(self.bucket.clone());
        let Some(runtime) = &self.runtime else {
            return Err(stopped());
        };
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// See [`Bucket::put_new`].
    pub fn put_new(&self, key: &str, data: Bytes) -> Result<Version, Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.put_new(&key, data).await })
    }

    /// See [`Bucket::put`].
    pub fn put(&self, key: &str, data: Bytes) -> Result<Version, Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.put(&key, data).await })
    }

    /// See [`Bucket::put_if`].
    pub fn put_if(&self, key: &str, data: Bytes, version: &Version) -> Result<Version, Error> {
        let (key, version) = (key.to_owned(), version.clone());
        self.run(|b| async move { b.put_if(&key, data, &version).await })
    }

    /// See [`Bucket::get`].
    pub fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.get(&key).await })
    }

    /// See [`Bucket::get_range`].
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.get_range(&key, range).await })
    }

    /// See [`Bucket::upload_file`].
    pub fn upload_file(&self, key: &str, path: PathBuf) -> Result<Version, Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.upload_file(&key, &path).await })
    }

    /// See [`Bucket::list`].
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, Error> {
        let dir = dir.to_owned();
        self.run(|b| async move { b.list(&dir).await })
    }

    /// See [`Bucket::list_all`].
    pub fn list_all(&self, dir: &str) -> Result<Vec<(String, u64)>, Error> {
        let dir = dir.to_owned();
        self.run(|b| async move { b.list_all(&dir).await })
    }

    /// See [`Bucket::list_tagged`].
    pub fn list_tagged(&self, dir: &str) -> Result<Vec<Listed>, Error> {
        let dir = dir.to_owned();
        self.run(|b| async move { b.list_tagged(&dir).await })
    }

    /// See [`Lease::take`].
    pub fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Lease, Error> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run(|b| async move { Lease::take(&b, &name, &holder, ttl_ms, now_unix_ms).await })
    }

    /// See [`Lease::renew`]: the lease renewed, or the error that lost it.
    pub fn renew_lease(&self, lease: Lease, ttl_ms: u64, now_unix_ms: u64) -> Result<Lease, Error> {
        self.run(|b| async move {
            let mut lease = lease;
            lease.renew(&b, ttl_ms, now_unix_ms).await?;
            Ok(lease)
        })
    }

    /// See [`Lease::release`].
    pub fn release_lease(&self, lease: Lease) -> Result<(), Error> {
        self.run(|b| async move { lease.release(&b).await })
    }

    /// The leases directly under `leases/DIR/` (`leases/` itself for an
    /// empty `dir`), by name relative to it; unreadable ones are skipped.
    pub fn read_leases(&self, dir: &str) -> Result<Vec<(String, LeaseRecord)>, Error> {
        let dir = match dir {
            "" => "leases".to_owned(),
            dir => format!("leases/{dir}"),
        };
        self.run(|b| async move {
            let mut records = Vec::new();
            for (key, _) in b.list(&dir).await? {
                if let Some((data, _)) = b.get(&key).await?
                    && let Ok(record) = LeaseRecord::decode(&key, &data)
                {
                    let name = key.rsplit('/').next().unwrap_or(&key).to_owned();
                    records.push((name, record));
                }
            }
            Ok(records)
        })
    }

    /// See [`Bucket::delete`].
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let key = key.to_owned();
        self.run(|b| async move { b.delete(&key).await })
    }
}

impl Drop for BlockingBucket {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which a thread of another
        // runtime may not do; nothing is left to wait for here anyway (every
        // call waited for its own task).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn stopped() -> Error {
    Error::Io {
        what: "the bucket client stopped before the request finished".into(),
        source: std::io::Error::other("runtime shut down"),
    }
}
