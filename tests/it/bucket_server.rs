//! A replication server whose store is kept in a bucket of a real
//! S3-compatible store (SeaweedFS on loopback): the whole lifecycle runs as
//! it does on a local store, and the bucket alone holds the result.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::seaweedfs::SeaweedFs;
use blockrep_testkit::{AgentRig, Pki, ServerProcess};

const NBD_ARGS: [&str; 4] = ["--nbd-listen", "127.0.0.1:0", "--retention", "off"];

#[test]
fn the_whole_lifecycle_runs_on_a_store_in_a_bucket_and_the_bucket_alone_holds_it() {
    if !(have_tool("qemu-img") && have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    let Some(weed) = SeaweedFs::start("lifecycle in a bucket") else {
        return;
    };
    let access = weed.access("lifecycle");
    let rig = AgentRig::start_in(&bin(), Pki::new(&["app"]), &NBD_ARGS, Some(access.clone()));
    let disk = crate::lifecycle::whole_lifecycle(&rig, &|| blockrep_core::IdSpace::PLAIN);
    let admin = rig.server.admin_addr.unwrap();
    let token = rig.pki.path().join("admin.token");

    // Health names the bucket, with nothing left to upload.
    let (code, body) = admin_request(admin, "GET", "/health", None);
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["backend"]["location"], "s3://blockrep/lifecycle");
    assert_eq!(health["backend"]["upload"]["bytes_pending"], 0, "{body}");
    let (_, metrics) = admin_request(admin, "GET", "/metrics", None);
    assert!(
        metrics.contains("blockrep_store_bytes_pending_upload 0")
            && metrics.contains(r#"blockrep_store_backend{backend="s3://blockrep/lifecycle"} 1"#),
        "{metrics}"
    );

    // GC through the admin API, then verify and export from the bucket, in
    // a working copy of their own.
    let gc = Command::new(BIN)
        .args(["gc", "--admin", &admin.to_string(), "--admin-token"])
        .arg(&token)
        .output()
        .unwrap();
    assert_success(&gc);
    let verify_copy = tempfile::tempdir().unwrap();
    let mut verify = Command::new(BIN);
    verify.args(["verify", "--data"]).arg(verify_copy.path());
    access.apply(&mut verify);
    let verify = verify.output().unwrap();
    assert_success(&verify);
    assert!(stdout(&verify).contains("checked"), "{}", stdout(&verify));

    // The cutover launch's volume after failback is the disk: the launch
    // head read from the bucket agrees.
    let launch = blockrep_testkit::admin::admin_request(admin, "GET", "/v1/launches", None).1;
    assert!(launch.contains("app-cutover"), "{launch}");
    let head = rig.head("app");
    assert!(head.is_some());

    // A second server on an empty data directory: the same head, the same
    // disk, served from the bucket alone. It serves the source's launches
    // only once it may hold the source: not while the first server does.
    let root = admin_source(admin, "app").unwrap().root;
    let cutover_name = admin_source(admin, "app").unwrap().cutover.unwrap().launch;
    let empty = tempfile::tempdir().unwrap();
    let second = ServerProcess::start_in(
        &bin(),
        "127.0.0.1:0",
        &empty.path().join("data"),
        rig.pki.path(),
        &NBD_ARGS,
        Some(&access),
    );
    let view = admin_source(second.admin_addr.unwrap(), "app").unwrap();
    assert_eq!(view.root, root);
    let cutover_launch = format!("nbd://{}/{cutover_name}", second.nbd_addr.unwrap());
    let refused = std::process::Command::new("nbdinfo")
        .args(["--size", &cutover_launch])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "served beside the source's server"
    );
    assert!(
        second.wait_for_log("served by another server", Duration::from_secs(5)),
        "{}",
        second.log()
    );
    // The first server stops cleanly, releasing the source: the second
    // serves the launch now.
    let mut rig = rig;
    rig.server.stop();
    assert!(
        qemu_img_identical(&cutover_launch, &disk),
        "the cutover volume served from the bucket differs from the failed-back disk"
    );
}
