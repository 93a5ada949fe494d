//! A bucket (and prefix) of an S3-compatible store, through `object_store`.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};

use crate::Error;

/// Size of each part of a multipart upload, and the largest object sent
/// in one PUT: above the 5 MiB most stores require of every part but the
/// last, and one buffer per upload in flight.
pub const PART_BYTES: usize = 8 << 20;

/// Parts of one multipart upload sent at once (memory: this many parts).
pub const PARTS_IN_FLIGHT: usize = 4;

/// Retries of one request that failed in a way worth retrying (a 5xx, a
/// connection refused) before it is reported.
pub const REQUEST_RETRIES_MAX: usize = 3;
/// No retry of a request starts later than this after its first attempt.
pub const REQUEST_RETRY_WINDOW: Duration = Duration::from_secs(10);
/// Longest one request may take, a part of a multipart upload included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where blockrep keeps its objects: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::Config(format!("{url:?} is not an s3://BUCKET/PREFIX location"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Config(format!("{url:?} names no bucket")));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(Error::Config(format!("{url:?}: a prefix of . or .. parts")));
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.is_empty() {
            true => write!(f, "s3://{}", self.bucket),
            false => write!(f, "s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// How to reach an S3 service.
#[derive(Debug, Clone, Default)]
pub struct S3Service {
    /// Its URL; `None`: AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Access key id and secret; `None`: from the usual AWS environment
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
    pub credentials: Option<(String, String)>,
}

/// The version of an object as read or written: what a conditional write
/// names (its ETag, and the store's version id where it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(UpdateVersion);

impl Version {
    /// The object's ETag, as the store gave it: equal ETags of one key are
    /// equal contents.
    pub fn e_tag(&self) -> Option<&str> {
        self.0.e_tag.as_deref()
    }
}

/// An object as a listing names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key, relative to the bucket's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its ETag, where the store lists one (compare with [`Version::e_tag`]).
    pub e_tag: Option<String>,
}

/// Objects under a prefix of one bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// What it is called in messages: `s3://BUCKET/PREFIX`.
    name: String,
}

impl Bucket {
    /// The bucket at `location` of `service`. An `http://` endpoint is
    /// allowed (a store on loopback).
    pub fn s3(location: &S3Location, service: &S3Service) -> Result<Self, Error> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&location.bucket)
            // Explicit limits: a store that is away fails a request within
            // seconds (the caller retries the whole step later) instead of
            // holding a commit for the client's default three minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: REQUEST_RETRIES_MAX,
                retry_timeout: REQUEST_RETRY_WINDOW,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(REQUEST_TIMEOUT),
            )
            // If-Match and If-None-Match on PutObject, as S3 and the
            // compatible stores blockrep supports implement them.
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // The request is signed, its body is not hashed into the
            // signature: a SHA-256 pass over every uploaded byte would cost
            // a core-second per GiB, and the body's integrity is blockrep's
            // own (every record carries a crc32, every blob is checked
            // against its blake3 id when read, a record object is checked
            // when restored).
            .with_unsigned_payload(true);
        if let Some(endpoint) = &service.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &service.region {
            builder = builder.with_region(region);
        }
        if let Some((key_id, secret)) = &service.credentials {
            builder = builder
                .with_access_key_id(key_id)
                .with_secret_access_key(secret);
        }
        let store = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        let mut bucket = Self::new(Arc::new(store), &location.prefix);
        bucket.name = location.to_string();
        Ok(bucket)
    }

    /// What the bucket is called in messages (`s3://BUCKET/PREFIX`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Objects of `store` under `prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/').to_owned();
        Self {
            store,
            name: prefix.clone(),
            prefix,
        }
    }

    fn path(&self, key: &str) -> Path {
        match self.prefix.is_empty() {
            true => Path::from(key),
            false => Path::from(format!("{}/{key}", self.prefix)),
        }
    }

    /// Writes `key` only if it does not exist: of several writers racing,
    /// exactly one succeeds and the others get [`Error::Exists`].
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<Version, Error> {
        self.put_mode(key, data, PutMode::Create).await
    }

    /// Writes `key` whatever it holds: for objects whose every writer writes
    /// the same bytes (a sealed pack's index, uploaded again after a failure).
    pub async fn put(&self, key: &str, data: Bytes) -> Result<Version, Error> {
        self.put_mode(key, data, PutMode::Overwrite).await
    }

    /// Replaces `key` only if it is still at `version`; [`Error::Conflict`]
    /// if it changed or went since.
    pub async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        version: &Version,
    ) -> Result<Version, Error> {
        self.put_mode(key, data, PutMode::Update(version.0.clone()))
            .await
    }

    async fn put_mode(&self, key: &str, data: Bytes, mode: PutMode) -> Result<Version, Error> {
        let create = mode == PutMode::Create;
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let put = self
            .store
            .put_opts(&self.path(key), PutPayload::from(data), options)
            .await;
        // Judged by the write's mode: a create that lost is `Exists`; an
        // update whose condition failed in any way (412, or the 409 of a
        // racing write the client reports as exists) is `Conflict`.
        match put {
            Ok(result) => Ok(Version(result.into())),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) if create => Err(Error::Exists(key.to_owned())),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(Error::Conflict(key.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// `key`'s content and version, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => {
                let version = Version(UpdateVersion {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                });
                Ok(Some((result.bytes().await?, version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads the file at `path` as `key`, sealed: the object appears
    /// whole when the upload completes, or not at all. A file longer than
    /// [`PART_BYTES`] goes up as a multipart upload of parts of that size,
    /// [`PARTS_IN_FLIGHT`] at a time (memory stays that many parts). An upload that fails
    /// is aborted, so its parts do not linger; one dropped before it ends (a
    /// cancelled task) leaves them to the bucket's rule for incomplete
    /// uploads.
    pub async fn upload_file(&self, key: &str, path: &std::path::Path) -> Result<Version, Error> {
        use tokio::io::AsyncReadExt;
        let io = |what: &str| {
            let what = format!("cannot {what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io("open"))?;
        let len = file.metadata().await.map_err(io("stat"))?.len();
        if len <= PART_BYTES as u64 {
            let mut data = Vec::with_capacity(len as usize);
            file.read_to_end(&mut data).await.map_err(io("read"))?;
            let options = PutOptions::default();
            let put = self
                .store
                .put_opts(&self.path(key), PutPayload::from(data), options)
                .await?;
            return Ok(Version(put.into()));
        }
        let upload = self.store.put_multipart(&self.path(key)).await?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let sent = async {
            let mut left = len;
            while left > 0 {
                // Several parts in flight: one stream to an object store is
                // slower than the store.
                parts.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                let part_len = left.min(PART_BYTES as u64) as usize;
                let mut part = vec![0u8; part_len];
                file.read_exact(&mut part).await.map_err(io("read"))?;
                parts.put(Bytes::from(part));
                left -= part_len as u64;
            }
            Ok::<_, Error>(())
        }
        .await;
        match sent {
            Ok(()) => Ok(Version(parts.finish().await?.into())),
            Err(e) => {
                // Best effort: a store keeps the parts of an upload never
                // completed until it is aborted (or its lifecycle rule runs).
                let _ = parts.abort().await;
                Err(e)
            }
        }
    }

    /// The objects directly under `dir` (keys relative to the bucket's
    /// prefix) with their sizes.
    pub async fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, Error> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.path(dir)))
            .await
            .map_err(no_such_bucket)?;
        Ok(self.relative(listed.objects))
    }

    /// Every object whose key starts with `dir/` (keys relative to the
    /// bucket's prefix, at any depth) with its size.
    pub async fn list_all(&self, dir: &str) -> Result<Vec<(String, u64)>, Error> {
        let listed = self.list_tagged(dir).await?;
        Ok(listed.into_iter().map(|l| (l.key, l.size)).collect())
    }

    /// [`Bucket::list_all`] with each object's ETag: what a reader needs to
    /// fetch again only the objects that changed since it last read them.
    pub async fn list_tagged(&self, dir: &str) -> Result<Vec<Listed>, Error> {
        let listed: Vec<_> = self
            .store
            .list(Some(&self.path(dir)))
            .try_collect()
            .await
            .map_err(no_such_bucket)?;
        Ok(self.listed(listed))
    }

    /// Listed objects as keys relative to the prefix, with their sizes.
    fn relative(&self, listed: Vec<object_store::ObjectMeta>) -> Vec<(String, u64)> {
        self.listed(listed)
            .into_iter()
            .map(|listed| (listed.key, listed.size))
            .collect()
    }

    /// Listed objects with keys relative to the prefix.
    fn listed(&self, listed: Vec<object_store::ObjectMeta>) -> Vec<Listed> {
        let strip = match self.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.prefix),
        };
        listed
            .into_iter()
            .map(|meta| {
                let key = meta.location.to_string();
                let key = key.strip_prefix(&strip).unwrap_or(&key).to_owned();
                Listed {
                    key,
                    size: meta.size,
                    e_tag: meta.e_tag,
                }
            })
            .collect()
    }

    /// Deletes `key`; one that does not exist is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes `range` of `key` (a ranged GET).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Error> {
        Ok(self.store.get_range(&self.path(key), range).await?)
    }
}

/// A missing bucket said plainly: the client reports it as a generic 404.
fn no_such_bucket(e: object_store::Error) -> Error {
    if e.to_string().contains("NoSuchBucket") {
        Error::Config(
            "the bucket does not exist (blockrep never creates one: create it, \
             with the access its servers need, first)"
                .into(),
        )
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_name_a_bucket_and_an_optional_prefix() {
        let at = |bucket: &str, prefix: &str| S3Location {
            bucket: bucket.into(),
            prefix: prefix.into(),
        };
        assert_eq!(S3Location::parse("s3://b").unwrap(), at("b", ""));
        assert_eq!(S3Location::parse("s3://b/").unwrap(), at("b", ""));
        assert_eq!(S3Location::parse("s3://b/x/y/").unwrap(), at("b", "x/y"));
        for bad in ["b/x", "s3://", "s3:///x", "s3://b/../x", "http://b/x"] {
            assert!(S3Location::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
