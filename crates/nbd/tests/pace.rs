//! Small requests run on the connection's task, but an export that turns out
//! slow (a cold device) still gets its requests side by side, as it would on
//! a thread per request.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockrep_nbd::wire::Command;
use blockrep_nbd::{Export, Limits, SLOW_IN_WINDOW};
use common::{MapRegistry, RawClient, TestServer, request};

const DISK_BYTES: u64 = 1024 * 1024;
/// Reads from here on take [`SLOW_READ`], like a device's.
const SLOW_OFFSET: u64 = 512 * 1024;
const SLOW_READ: Duration = Duration::from_millis(20);
/// A read here waits until the read of [`RELEASE_OFFSET`] has run.
const GATED_OFFSET: u64 = 0;
const RELEASE_OFFSET: u64 = 4096;
/// How long the gated read waits before it gives up and fails.
const GATE_PATIENCE: Duration = Duration::from_secs(2);

/// Zeroes, read with the delays and the gate above.
#[derive(Debug, Default)]
struct GatedExport {
    released: Mutex<bool>,
    release: Condvar,
}

impl Export for GatedExport {
    fn size_bytes(&self) -> u64 {
        DISK_BYTES
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        if offset >= SLOW_OFFSET {
            std::thread::sleep(SLOW_READ);
        } else if offset == RELEASE_OFFSET {
            *self.released.lock().unwrap() = true;
            self.release.notify_all();
        } else if offset == GATED_OFFSET {
            let released = self.released.lock().unwrap();
            let (released, _) = self
                .release
                .wait_timeout_while(released, GATE_PATIENCE, |released| !*released)
                .unwrap();
            if !*released {
                return Err(std::io::Error::other("the releasing read never ran"));
            }
        }
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn trim(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn server(limits: Limits) -> TestServer {
    let export: Arc<dyn Export> = Arc::new(GatedExport::default());
    TestServer::with_registry(MapRegistry::default().with("disk", "", export), limits)
}

/// The gated read (handle 100) then the releasing one (handle 101), as one
/// batch of bytes.
fn gated_pair() -> Vec<u8> {
    let mut batch =
        blockrep_nbd::wire::encode_request(&request(Command::Read, 100, GATED_OFFSET, 4096))
            .to_vec();
    batch.extend_from_slice(&blockrep_nbd::wire::encode_request(&request(
        Command::Read,
        101,
        RELEASE_OFFSET,
        4096,
    )));
    batch
}

/// Sends the gated read then the releasing one in one go; both must succeed,
/// whichever is answered first: they ran at the same time.
fn assert_gated_pair_runs_side_by_side(client: &mut RawClient) {
    client.send(&gated_pair());
    let mut replies = Vec::new();
    for _ in 0..2 {
        let reply = client.read_reply();
        if reply.0 == 0 {
            client.read_vec(4096);
        }
        replies.push(reply);
    }
    // Run one after the other, the gated read would wait out its patience
    // and fail. Side by side both succeed, in either order: the releasing
    // read may even run first.
    replies.sort_unstable_by_key(|reply| reply.1);
    assert_eq!(
        replies,
        [(0, 100), (0, 101)],
        "the gated read held up the read after it"
    );
}

#[test]
fn a_slow_export_gets_its_requests_off_the_connection_task() {
    let server = server(Limits::default());
    let (mut client, _, _) = RawClient::go(server.addr, "disk");
    // One at a time, so that each runs inline and shows the export slow.
    for handle in 0..u64::from(SLOW_IN_WINDOW) {
        client.send_request(
            &request(Command::Read, handle, SLOW_OFFSET + handle * 4096, 4096),
            &[],
        );
        assert_eq!(client.read_reply(), (0, handle));
        client.read_vec(4096);
    }
    assert_gated_pair_runs_side_by_side(&mut client);
}

#[test]
fn with_inline_off_every_request_goes_to_a_thread() {
    let server = server(Limits {
        inline_request_bytes_max: 0,
        ..Limits::default()
    });
    let (mut client, _, _) = RawClient::go(server.addr, "disk");
    assert_gated_pair_runs_side_by_side(&mut client);
}

#[test]
fn small_reads_of_a_fast_export_run_inline_one_after_another() {
    // The gated read, inline, blocks the connection: the releasing read only
    // runs after the gate gave up. This is what inline means, and why a slow
    // export must be detected.
    let server = server(Limits::default());
    let (mut client, _, _) = RawClient::go(server.addr, "disk");
    client.send(&gated_pair());
    let (error, handle) = client.read_reply();
    assert_eq!(handle, 100, "the read after the gated one ran first");
    assert_ne!(error, 0, "the gated read was released");
    assert_eq!(client.read_reply(), (0, 101));
    client.read_vec(4096);
}
