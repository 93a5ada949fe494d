//! blockrep's end-to-end tests: one module per area, linked into one test
//! binary (`cargo test --test it`; `cargo test --test it AREA::` runs one
//! area). They drive the real binary, real clients and, as root, real kernel
//! file systems; helpers that need the binary are in [`common`], the rest in
//! `blockrep_testkit`.
//!
//! The tests of all areas share one process and run on parallel threads, so
//! none sets environment variables, changes the working directory or binds
//! fixed ports: every server listens on 127.0.0.1:0 and every path is a
//! temporary directory of its own.
#![allow(clippy::unwrap_used)]

mod common;

mod access;
mod admin_auth;
mod bench;
mod bucket_failover;
mod bucket_gc;
mod bucket_outage;
mod bucket_server;
mod bucket_store;
mod capture;
mod capture_fs;
mod capture_status;
mod compression;
mod consistency;
mod continuous;
mod dedup;
mod disk_shrink;
mod drill_boot;
mod edge_shapes;
mod encryption;
mod encryption_bucket;
mod encryption_convert;
mod frozen_view;
mod frozen_view_faults;
mod fuzz_corpus;
mod gc_verify;
mod hostile;
mod keys;
mod kill_loop;
mod launch;
mod launch_materialize;
mod launch_overlay;
mod lifecycle;
mod machine;
mod machine_cutover;
mod machine_order;
mod machine_steps;
mod malicious_server;
mod nbd_access;
mod net_faults;
mod observability;
mod patch_delta;
mod patches;
mod point_in_time;
mod rejections;
mod replication;
mod revocation;
mod serve_access;
mod store_hardening;
mod stream_corruption;
mod workflow;
