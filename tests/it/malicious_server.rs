//! The agent against a malicious server: a fake server (real mutual TLS on
//! 127.0.0.1 with the test CA's server certificate, frames from
//! `blockrep_proto`'s codec) answers the real `blockrep failback` and
//! `blockrep agent --once` processes with roots, pages, chunks and answers that
//! do not fit the disk or the request. Each one must end the process with exit
//! status 1 and a clear protocol error, never a panic, and failback must write
//! nothing to the disk.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use blockrep_core::{ChunkId, Geometry, Page, Root};
use blockrep_proto::{Codec, Message, PROTOCOL_VERSION, decode, encode};
use blockrep_testkit::{Pki, random_bytes};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: u32 = 65_536;
/// 16 chunks of 64 KiB.
const DISK: u64 = 16 * CHUNK as u64;
/// How long the fake server waits for the agent at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// One step of a fake server's script.
enum Step {
    /// Send this message.
    Send(Message),
    /// The next message from the agent must be of this type.
    Expect(&'static str),
    /// Skip messages from the agent until one of this type.
    SkipUntil(&'static str),
}

/// A one-connection fake server running `steps`, then reading until the agent
/// hangs up. Its thread returns what went wrong, if anything.
struct FakeServer {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl FakeServer {
    fn start(pki: &Pki, steps: Vec<Step>) -> Self {
        let config =
            blockrep_pki::server_config(&pki.cert("ca"), &pki.cert("server"), &pki.key("server"))
                .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(listener, config, steps))
        });
        Self { addr, thread }
    }

    /// What the server saw go wrong (a script the agent did not follow).
    fn finish(self) -> Result<(), String> {
        self.thread.join().unwrap()
    }
}

async fn serve(
    listener: std::net::TcpListener,
    config: rustls::ServerConfig,
    steps: Vec<Step>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (tcp, _) = tokio::time::timeout(STEP_TIMEOUT, listener.accept())
        .await
        .map_err(|_| "no agent connected".to_string())?
        .map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    for step in steps {
        match step {
            Step::Send(message) => {
                let mut out = BytesMut::new();
                encode(&message, &mut out);
                tls.write_all(&out).await.map_err(|e| e.to_string())?;
                tls.flush().await.map_err(|e| e.to_string())?;
            }
            Step::Expect(name) => {
                let got = recv(&mut tls, &mut buf).await?;
                if got.name() != name {
                    return Err(format!("expected {name}, the agent sent {}", got.name()));
                }
            }
            Step::SkipUntil(name) => while recv(&mut tls, &mut buf).await?.name() != name {},
        }
    }
    // Let the agent read everything and hang up by itself.
    while recv(&mut tls, &mut buf).await.is_ok() {}
    Ok(())
}

async fn recv<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Message, String> {
    loop {
        if let Some(message) = decode(buf).map_err(|e| e.to_string())? {
            return Ok(message);
        }
        let read = tokio::time::timeout(STEP_TIMEOUT, stream.read_buf(buf))
            .await
            .map_err(|_| "timed out waiting for the agent".to_string())?
            .map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("the agent hung up".into());
        }
    }
}

fn geometry() -> Geometry {
    Geometry::new(DISK, CHUNK).unwrap()
}

fn welcome(head_epoch: u64, head_root: Vec<u8>) -> Message {
    Message::Welcome {
        version: PROTOCOL_VERSION,
        head_epoch,
        head_root: Bytes::from(head_root),
        nonce: [7; blockrep_proto::NONCE_LEN],
        id_key: None,
    }
}

/// The root of the all-zero disk of the test's geometry.
fn zero_root() -> Root {
    Root::from_chunk_ids(geometry(), &vec![ChunkId::ZERO; 16])
}

/// Chunk 0 holds `chunk`, the rest is zero: the root and its one page.
fn one_chunk_root(chunk: &[u8]) -> (Root, Page) {
    let mut ids = vec![ChunkId::ZERO; 16];
    ids[0] = ChunkId::from(blake3::hash(chunk));
    let (root, mut pages) = Root::build(geometry(), &ids);
    (root, pages.remove(0))
}

/// Runs a process with a deadline; kills it (and fails) if it does not end.
fn run_with_deadline(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the agent did not end within 90 s");
        }
    }
}

fn failback_command(disk: &Path, addr: SocketAddr, pki: &Pki) -> Command {
    let mut command = Command::new(bin());
    command
        .args(["failback", "--once", "--disk"])
        .arg(disk)
        .args([
            "--from",
            &addr.to_string(),
            "--source",
            "a",
            "--launch",
            "a-cutover",
            "--tls-dir",
        ])
        .arg(pki.path());
    command
}

fn agent_command(disk: &Path, addr: SocketAddr, pki: &Pki) -> Command {
    let mut command = Command::new(bin());
    command
        .args(["agent", "--once", "--disk"])
        .arg(disk)
        .args(["--to", &addr.to_string(), "--source", "a", "--tls-dir"])
        .arg(pki.path());
    command
}

/// The process failed with exit status 1 and `expected` in its error, without
/// a panic.
fn assert_refused(output: &Output, expected: &str, case: &str) {
    let text = stderr(output);
    assert!(
        !text.contains("panicked"),
        "{case}: the agent panicked: {text}"
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{case}: exit status {}: {text}",
        output.status
    );
    assert!(
        text.contains("protocol error") && text.contains(expected),
        "{case}: the error does not say {expected:?}: {text}"
    );
}

/// A failback against a server running `steps` on an all-zero disk: refused
/// with `expected`, and the disk untouched.
fn assert_failback_refused(case: &str, steps: Vec<Step>, expected: &str) {
    let pki = Pki::new(&["a"]);
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("a.raw");
    std::fs::write(&disk, vec![0u8; DISK as usize]).unwrap();
    let server = FakeServer::start(&pki, steps);
    let output = run_with_deadline(failback_command(&disk, server.addr, &pki));
    assert_refused(&output, expected, case);
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0),
        "{case}: failback wrote to the disk"
    );
    server.finish().unwrap_or_else(|e| panic!("{case}: {e}"));
}

/// The steps up to a failback plan of `target` and `base`.
fn plan(target: &Root, base: &[u8]) -> Vec<Step> {
    vec![
        Step::Expect("Hello"),
        Step::Send(welcome(0, Vec::new())),
        Step::Expect("FailbackStart"),
        Step::Send(Message::FailbackPlan {
            target_root: Bytes::from(target.encode()),
            base_root: Bytes::from(base.to_vec()),
        }),
    ]
}

#[test]
fn failback_refuses_a_base_root_of_another_geometry() {
    // The launch has the disk's geometry; the base root (the disk at cutover)
    // is of half its size, or of another chunk size: no chunk-by-chunk
    // comparison can be made, and today's diff asserted on it.
    let half = Geometry::new(DISK / 2, CHUNK).unwrap();
    let smaller_chunks = Geometry::new(DISK, CHUNK / 2).unwrap();
    for (other, expected) in [
        (half, "failback base root is of 524288 bytes"),
        (
            smaller_chunks,
            "failback base root is of 1048576 bytes in 32768-byte chunks",
        ),
    ] {
        let base = Root::from_chunk_ids(other, &vec![ChunkId::ZERO; other.chunk_count() as usize]);
        let steps = plan(&zero_root(), &base.encode());
        assert_failback_refused("base of another geometry", steps, expected);
    }
}

#[test]
fn failback_refuses_pages_and_chunks_that_do_not_fit_the_request() {
    let data = random_bytes(CHUNK as usize, 1);
    let (target, page) = one_chunk_root(&data);
    let id = ChunkId::from(blake3::hash(&data));
    let page_bytes = Bytes::from(page.encode());
    let page_reply = |index: u32, ids: Bytes| {
        let mut steps = plan(&target, &zero_root().encode());
        steps.push(Step::Expect("GetPages"));
        steps.push(Step::Send(Message::Page { index, ids }));
        steps
    };
    // One id short (a length that is not a multiple of 32 the codec refuses).
    let short_page = page_bytes.slice(..page_bytes.len() - 32);
    assert_failback_refused(
        "page of the wrong length",
        page_reply(0, short_page),
        "page 0",
    );
    assert_failback_refused(
        "page not asked for",
        page_reply(7, page_bytes.clone()),
        "asked for page 0, got 7",
    );
    let zero_page = Bytes::from(vec![0u8; page_bytes.len()]);
    assert_failback_refused(
        "page that is not the root's",
        page_reply(0, zero_page),
        "does not match its root",
    );

    let chunk_reply = |chunk: Message| {
        let mut steps = page_reply(0, page_bytes.clone());
        steps.push(Step::Expect("Want"));
        steps.push(Step::Send(chunk));
        steps
    };
    let chunk = |index: u64, codec: Codec, raw_len: u32, data: &[u8]| Message::Chunk {
        index,
        id,
        codec,
        raw_len,
        data: Bytes::copy_from_slice(data),
    };
    assert_failback_refused(
        "chunk index past the end of the disk",
        chunk_reply(chunk(1 << 40, Codec::Raw, CHUNK, &data)),
        "is not the chunk 0 asked for",
    );
    assert_failback_refused(
        "chunk of the wrong length",
        chunk_reply(chunk(0, Codec::Raw, 100, &data[..100])),
        "is not the chunk 0 asked for",
    );
    let other = random_bytes(CHUNK as usize, 2);
    assert_failback_refused(
        "chunk whose bytes do not hash to its id",
        chunk_reply(chunk(0, Codec::Raw, CHUNK, &other)),
        "does not hash to its id",
    );
    let bomb = zstd::bulk::compress(&vec![7u8; 16 * CHUNK as usize], 1).unwrap();
    assert_failback_refused(
        "chunk that decompresses past its length",
        chunk_reply(chunk(0, Codec::Zstd, CHUNK, &bomb)),
        "does not decompress",
    );
}

#[test]
fn agent_and_failback_refuse_a_welcome_that_does_not_fit() {
    let half = Geometry::new(DISK / 2, CHUNK).unwrap();
    let other_root = Root::from_chunk_ids(half, &[ChunkId::ZERO; 8]).encode();
    let cases: [(&str, Message, &str); 3] = [
        (
            "head root that does not decode",
            welcome(3, b"not a root".to_vec()),
            "head root",
        ),
        (
            "head root of another geometry",
            welcome(3, other_root),
            "server sent a head of 524288 bytes",
        ),
        (
            "protocol version never offered",
            Message::Welcome {
                version: PROTOCOL_VERSION + 7,
                head_epoch: 0,
                head_root: Bytes::new(),
                nonce: [7; blockrep_proto::NONCE_LEN],
                id_key: None,
            },
            "protocol version",
        ),
    ];
    for (case, message, expected) in cases {
        for failback in [false, true] {
            let pki = Pki::new(&["a"]);
            let work = tempfile::tempdir().unwrap();
            let disk = work.path().join("a.raw");
            std::fs::write(&disk, vec![0u8; DISK as usize]).unwrap();
            let server = FakeServer::start(
                &pki,
                vec![Step::Expect("Hello"), Step::Send(message.clone())],
            );
            let command = if failback {
                failback_command(&disk, server.addr, &pki)
            } else {
                agent_command(&disk, server.addr, &pki)
            };
            let output = run_with_deadline(command);
            assert_refused(&output, expected, case);
            server.finish().unwrap();
        }
    }
}

/// A `Committed` of epoch 1 naming a root the agent did not send.
fn committed_elsewhere() -> Message {
    Message::Committed {
        epoch: 1,
        root: ChunkId([9; 32]),
        chunks_received: 0,
        bytes_received: 0,
        chunks_stored: 0,
        cutover_requested: false,
    }
}

/// Whether the agent's certificate names a tenant: the first sync of a
/// source of a tenant offers what it scanned, one without a tenant hashes
/// chunks as it sends them and offers nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tenant {
    None,
    Acme,
}

#[test]
fn agent_refuses_answers_that_do_not_fit_its_requests() {
    let data = random_bytes(CHUNK as usize, 3);
    let (head, page) = one_chunk_root(&data);
    let page_bytes = Bytes::from(page.encode());
    // The disk differs from the head in chunk 1, so the agent asks for page 0.
    let mut disk_bytes = vec![0u8; DISK as usize];
    disk_bytes[..CHUNK as usize].copy_from_slice(&data);
    disk_bytes[CHUNK as usize] = 1;
    let cases: Vec<(&str, Vec<Step>, &str, Tenant)> = vec![
        (
            "head page of the wrong length",
            vec![
                Step::Expect("Hello"),
                Step::Send(welcome(3, head.encode())),
                Step::Expect("GetPages"),
                Step::Send(Message::Page {
                    index: 0,
                    ids: page_bytes.slice(..32),
                }),
            ],
            "page 0",
            Tenant::None,
        ),
        (
            "head page index not asked for",
            vec![
                Step::Expect("Hello"),
                Step::Send(welcome(3, head.encode())),
                Step::Expect("GetPages"),
                Step::Send(Message::Page {
                    index: u32::MAX,
                    ids: page_bytes.clone(),
                }),
            ],
            "asked for page 0, got 4294967295",
            Tenant::None,
        ),
        (
            "Have of another length than its Offer",
            vec![
                Step::Expect("Hello"),
                Step::Send(welcome(0, Vec::new())),
                Step::SkipUntil("Offer"),
                Step::Send(Message::Have {
                    bits: Bytes::from(vec![0xff; 100]),
                }),
            ],
            "Have does not match its Offer",
            Tenant::Acme,
        ),
        (
            "Committed with another root",
            vec![
                Step::Expect("Hello"),
                Step::Send(welcome(0, Vec::new())),
                Step::SkipUntil("Offer"),
                Step::Send(Message::Have {
                    bits: Bytes::from(vec![0]),
                }),
                Step::SkipUntil("Commit"),
                Step::Send(committed_elsewhere()),
            ],
            "server committed epoch 1 root",
            Tenant::Acme,
        ),
        (
            "Committed with another root, a first sync sent as hashed",
            vec![
                Step::Expect("Hello"),
                Step::Send(welcome(0, Vec::new())),
                Step::SkipUntil("Commit"),
                Step::Send(committed_elsewhere()),
            ],
            "server committed epoch 1 root",
            Tenant::None,
        ),
    ];
    for (case, steps, expected, tenant) in cases {
        let pki = Pki::new(&["a"]);
        if tenant == Tenant::Acme {
            pki.issue_in_tenant("a", "acme");
        }
        let work = tempfile::tempdir().unwrap();
        let disk = work.path().join("a.raw");
        std::fs::write(&disk, &disk_bytes).unwrap();
        let server = FakeServer::start(&pki, steps);
        let output = run_with_deadline(agent_command(&disk, server.addr, &pki));
        assert_refused(&output, expected, case);
        server.finish().unwrap_or_else(|e| panic!("{case}: {e}"));
    }
}

#[test]
fn failback_refuses_patches_it_cannot_apply_or_verify() {
    // The disk holds `own` in chunk 0 (as it did at cutover: the base), the
    // launch holds `target`, which differs in its second 4 KiB block. The
    // agent asks with its block values; the server answers with patches that
    // are against another chunk, overlap, or build the wrong bytes.
    let own = random_bytes(CHUNK as usize, 11);
    let mut target = own.clone();
    target[4096..8192].copy_from_slice(&random_bytes(4096, 12));
    let (target_root, target_page) = one_chunk_root(&target);
    let (base_root, _) = one_chunk_root(&own);
    let own_id = ChunkId::from(blake3::hash(&own));
    let target_id = ChunkId::from(blake3::hash(&target));
    let patch = |base: ChunkId, ranges: Vec<(u32, u32)>, data: Vec<u8>| {
        let mut steps = plan(&target_root, &base_root.encode());
        steps.push(Step::Expect("GetPages"));
        steps.push(Step::Send(Message::Page {
            index: 0,
            ids: Bytes::from(target_page.encode()),
        }));
        steps.push(Step::Expect("WantPatched"));
        steps.push(Step::Send(Message::Patch {
            index: 0,
            base,
            id: target_id,
            codec: Codec::Raw,
            raw_len: CHUNK,
            ranges,
            data: Bytes::from(data),
        }));
        steps
    };
    let right = target[4096..8192].to_vec();
    let cases = [
        (
            "patch against a chunk the disk does not hold",
            patch(
                ChunkId::from(blake3::hash(b"other")),
                vec![(4096, 4096)],
                right.clone(),
            ),
            "but the disk holds",
        ),
        (
            "patch with overlapping ranges",
            patch(
                own_id,
                vec![(4096, 4096), (6144, 2048)],
                [right.clone(), vec![0; 2048]].concat(),
            ),
            "cannot be applied",
        ),
        (
            "patch with a range beyond the chunk",
            patch(own_id, vec![(CHUNK - 2048, 4096)], right.clone()),
            "cannot be applied",
        ),
        (
            "patch that builds other bytes than the target's",
            patch(own_id, vec![(4096, 4096)], random_bytes(4096, 13)),
            "expected",
        ),
    ];
    for (case, steps, expected) in cases {
        let pki = Pki::new(&["a"]);
        let work = tempfile::tempdir().unwrap();
        let disk = work.path().join("a.raw");
        let mut image = vec![0u8; DISK as usize];
        image[..CHUNK as usize].copy_from_slice(&own);
        std::fs::write(&disk, &image).unwrap();
        let server = FakeServer::start(&pki, steps);
        let output = run_with_deadline(failback_command(&disk, server.addr, &pki));
        assert_refused(&output, expected, case);
        assert!(
            std::fs::read(&disk).unwrap() == image,
            "{case}: failback wrote to the disk"
        );
        server.finish().unwrap_or_else(|e| panic!("{case}: {e}"));
    }
}
