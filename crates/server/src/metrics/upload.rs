//! The store's backend and, for a store in a bucket, its upload backlog,
//! named after S3 Replication Time Control's `BytesPendingReplication` and
//! `OperationsPendingReplication`.

use blockrep_store::Store;

use super::exposition::{Exposition, Value};

/// The `blockrep_store_backend` and `blockrep_store_*upload*` families.
pub(super) fn upload_text(store: &Store) -> String {
    let mut x = Exposition::default();
    x.family(
        "blockrep_store_backend",
        "gauge",
        "1, labelled with where the store keeps packs and records: local, or s3://BUCKET/PREFIX.",
    );
    let backend = store.backend();
    x.sample(
        "blockrep_store_backend",
        &[("backend", backend.as_str())],
        Value::Int(1),
    );
    let Some(stats) = store.upload_stats() else {
        return x.finish();
    };
    let families = [
        (
            "blockrep_store_bytes_pending_upload",
            "gauge",
            "Bytes of sealed packs not yet in the bucket (S3 RTC's BytesPendingReplication).",
            stats.bytes_pending,
        ),
        (
            "blockrep_store_operations_pending_upload",
            "gauge",
            "Objects not yet in the bucket, each pack and its index (S3 RTC's OperationsPendingReplication).",
            stats.objects_pending,
        ),
        (
            "blockrep_store_upload_errors_total",
            "counter",
            "Pack uploads and record writes to the bucket that failed (each is retried).",
            stats.errors_total,
        ),
        (
            "blockrep_store_uploaded_bytes_total",
            "counter",
            "Bytes of packs uploaded to the bucket.",
            stats.uploaded_bytes_total,
        ),
    ];
    for (name, kind, help, value) in families {
        x.family(name, kind, help);
        x.sample(name, &[], Value::Int(value));
    }
    x.finish()
}
