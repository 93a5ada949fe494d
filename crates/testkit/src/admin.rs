//! The server's admin API as the tests speak it: plain HTTP/1.1 requests that
//! carry the admin token of the server this process started, and the
//! recovery points a test takes through it while an agent runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use blockrep_server::{LaunchView, SnapshotView, SourceView};

use crate::ack_log::{Ack, read_acks};
use crate::{AgentProcess, ServerProcess};

/// The `Authorization` header line (with its CRLF) carrying the admin token of
/// the server whose admin API is at `admin`, as the blockrep CLI sends it.
pub fn admin_authorization(admin: SocketAddr) -> String {
    crate::admin_token_for(admin).map_or_else(String::new, |token| {
        format!("Authorization: Bearer {token}\r\n")
    })
}

/// An admin API request with the server's admin token; returns the status code
/// and the body.
pub fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).unwrap();
    let body = body.unwrap_or("");
    let authorization = admin_authorization(admin);
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// `GET /v1/snapshots`, as JSON values.
pub fn snapshots_json(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (code, body) = admin_request(admin, "GET", "/v1/snapshots", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Recovery points taken while an agent runs with `--ack-log`.
#[derive(Debug)]
pub struct AckedPoints<'a> {
    /// The admin API of the server the agent replicates to.
    pub admin: SocketAddr,
    /// The source the agent replicates.
    pub source: &'a str,
    /// The agent's `--ack-log`.
    pub ack_log: &'a Path,
    /// Snapshot names are this prefix and a number from 0.
    pub prefix: &'a str,
    /// How long the points may take.
    pub timeout: Duration,
}

impl AckedPoints<'_> {
    /// Snapshots the head each time the ack log holds one more complete
    /// commit that `counts`, until `wanted` snapshots with distinct roots
    /// exist (a snapshot of a root already taken is deleted, its name free
    /// again); their `(name, root)` in order. Fails if the agent exits or
    /// the timeout passes first.
    pub fn take(
        &self,
        agent: &mut AgentProcess,
        wanted: usize,
        counts: impl Fn(&Ack) -> bool,
    ) -> Vec<(String, String)> {
        let (admin, source, timeout) = (self.admin, self.source, self.timeout);
        let mut taken: Vec<(String, String)> = Vec::new();
        let mut acks_seen = 0;
        let enough = crate::tools::wait_until(timeout, || {
            let complete = read_acks(self.ack_log)
                .iter()
                .filter(|a| a.complete && counts(a))
                .count();
            if complete > acks_seen {
                acks_seen = complete;
                let name = format!("{}{}", self.prefix, taken.len());
                let body = format!(r#"{{"source":"{source}","name":"{name}"}}"#);
                let (code, body) = admin_request(admin, "POST", "/v1/snapshots", Some(&body));
                assert_eq!(code, 201, "snapshot create: {body}");
                let view: serde_json::Value = serde_json::from_str(&body).unwrap();
                let root = view["root"].as_str().unwrap().to_owned();
                if taken.iter().any(|(_, r)| *r == root) {
                    let (code, body) = admin_request(
                        admin,
                        "DELETE",
                        &format!("/v1/snapshots/{source}/{name}"),
                        None,
                    );
                    assert!(code < 300, "snapshot delete: {body}");
                } else {
                    taken.push((name, root));
                }
            }
            taken.len() >= wanted || agent.child.try_wait().unwrap().is_some()
        });
        assert!(
            enough && taken.len() >= wanted,
            "{} points (wanted {wanted}) when the agent ended or {timeout:?} passed; agent stdout: {:#?}\nstderr: {}",
            taken.len(),
            agent.lines(),
            agent.stderr.lock().unwrap()
        );
        taken
    }
}

/// `GET /v1/sources` from the admin API, parsed.
pub fn admin_sources(admin: SocketAddr) -> Vec<SourceView> {
    let (code, body) = admin_request(admin, "GET", "/v1/sources", None);
    assert_eq!(code, 200, "GET /v1/sources: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}"))
}

/// The admin API's view of one source, if it knows it.
pub fn admin_source(admin: SocketAddr, source: &str) -> Option<SourceView> {
    admin_sources(admin)
        .into_iter()
        .find(|s| s.source == source)
}

/// The snapshots the server's admin API lists.
pub fn snapshots(server: &ServerProcess) -> Vec<SnapshotView> {
    let (code, body) = admin_request(server.admin_addr.unwrap(), "GET", "/v1/snapshots", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Snapshots `source`'s head as `name` (`POST /v1/snapshots`), which must
/// succeed.
pub fn create_snapshot(server: &ServerProcess, source: &str, name: &str) -> SnapshotView {
    let (code, body) = admin_request(
        server.admin_addr.unwrap(),
        "POST",
        "/v1/snapshots",
        Some(&format!(r#"{{"source":"{source}","name":"{name}"}}"#)),
    );
    assert_eq!(code, 201, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Makes the launch `name` of `source`'s `snapshot` (`POST /v1/launches`,
/// live launches allowed), which must succeed.
pub fn create_launch(
    server: &ServerProcess,
    source: &str,
    snapshot: &str,
    name: &str,
) -> LaunchView {
    let (code, body) = admin_request(
        server.admin_addr.unwrap(),
        "POST",
        "/v1/launches",
        Some(&format!(
            r#"{{"source":"{source}","snapshot":"{snapshot}","name":"{name}","allow_live":true}}"#
        )),
    );
    assert_eq!(code, 201, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `GET /metrics`, which must answer 200: the exposition text.
pub fn metrics(server: &ServerProcess) -> String {
    let (code, body) = admin_request(server.admin_addr.unwrap(), "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until the admin API shows `root` as `source`'s head; fails the test
/// with the source's view if `timeout` passes first.
pub fn wait_for_head_root(admin: SocketAddr, source: &str, root: &str, timeout: Duration) {
    assert!(
        crate::tools::wait_until(timeout, || admin_source(admin, source)
            .and_then(|view| view.root)
            .as_deref()
            == Some(root)),
        "the replica of {source} did not converge to {root} within {timeout:?}: {:?}",
        admin_source(admin, source)
    );
}
