//! Where a store is kept: `--store s3://...` and its service flags, shared by
//! the server and the commands that open a store.

use anyhow::{Context, Result};
use clap::Args;

use crate::units;

#[derive(Debug, Clone, Args)]
pub(crate) struct StoreArgs {
    /// Keep the store in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO,
    /// SeaweedFS) instead of the data directory, which becomes its working
    /// copy and cache. The bucket must exist. Credentials come from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the other AWS_*
    /// variables: session token, web identity, instance metadata).
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub(crate) store: Option<String>,
    /// URL of the S3 service (e.g. http://127.0.0.1:8333 for SeaweedFS);
    /// default AWS's, for the region.
    #[arg(long, requires = "store", value_name = "URL")]
    pub(crate) s3_endpoint: Option<String>,
    /// Region of the bucket (default AWS_REGION, else us-east-1).
    #[arg(long, requires = "store")]
    pub(crate) s3_region: Option<String>,
    /// Most bytes of sealed packs kept in the data directory as a cache of
    /// the bucket; older packs are read from the bucket by ranged GETs.
    #[arg(long, requires = "store", default_value = "4GiB", value_parser = units::parse_size)]
    pub(crate) cache_max: u64,
    /// How long a source's lease lasts unless renewed (servers sharing the
    /// bucket serve each source one at a time): after a server dies, another
    /// takes its sources after at most this long.
    #[arg(long, requires = "store", default_value = "15s", value_parser = units::parse_duration)]
    pub(crate) lease_ttl: std::time::Duration,
}

impl StoreArgs {
    /// The bucket asked for, if any.
    pub(crate) fn bucket(&self) -> Result<Option<blockrep_server::BucketConfig>> {
        let Some(url) = &self.store else {
            return Ok(None);
        };
        let location = blockrep_objects::S3Location::parse(url).context("--store")?;
        Ok(Some(blockrep_server::BucketConfig {
            location,
            service: blockrep_objects::S3Service {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                credentials: None,
            },
            cache_bytes: self.cache_max,
            lease_ttl: self.lease_ttl.max(std::time::Duration::from_millis(300)),
            holder: String::new(),
        }))
    }

    /// The same flags, for a `blockrep server` started by this process.
    pub(crate) fn server_args(&self) -> Vec<String> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        let mut args = vec!["--store".to_owned(), store.clone()];
        if let Some(endpoint) = &self.s3_endpoint {
            args.extend(["--s3-endpoint".to_owned(), endpoint.clone()]);
        }
        if let Some(region) = &self.s3_region {
            args.extend(["--s3-region".to_owned(), region.clone()]);
        }
        args.extend([
            "--cache-max".to_owned(),
            self.cache_max.to_string(),
            "--lease-ttl".to_owned(),
            format!("{}ms", self.lease_ttl.as_millis()),
        ]);
        args
    }

    /// Opens the store: in the bucket, with `data` as its working copy (a
    /// directory no running server uses), or `data` itself read-only.
    pub(crate) fn open(&self, data: &std::path::Path) -> Result<blockrep_store::Store> {
        let Some(bucket) = self.bucket()? else {
            return Ok(blockrep_store::Store::open_read_only(data)?);
        };
        let client = blockrep_objects::Bucket::s3(&bucket.location, &bucket.service)
            .and_then(blockrep_objects::BlockingBucket::new)
            .with_context(|| format!("bucket {}", bucket.location))?;
        let options = blockrep_store::BucketOptions {
            cache_bytes: bucket.cache_bytes,
        };
        Ok(blockrep_store::Store::open_in_bucket(
            data, client, options,
        )?)
    }
}
