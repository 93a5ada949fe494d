//! The messages of the protocol, their wire enums (message type, chunk
//! codec, error code), version negotiation and the decoding error.

use std::fmt;

use blockrep_core::{ChunkId, Consistency, SourceId, VolumeName, wire_enum};
use bytes::Bytes;

/// The protocol version this build speaks. Version 2 added the checksum to
/// every frame header; the frame layout changed with it, so version 1 peers
/// fail at their first frame rather than in the negotiation. Version 3 added
/// the session nonce to `Welcome` and the proof of possession to `Ref` chunks.
/// Version 4 added the consistency label to `Commit` and sub-chunk patches
/// (`GetBlockValues`, `BlockValues`, `Patch`).
pub const PROTOCOL_VERSION: u16 = 6;

/// Bytes of the per-session nonce in [`Message::Welcome`].
pub const NONCE_LEN: usize = 32;
/// Bytes of the proof of possession a [`Codec::Ref`] chunk carries as its data.
pub const REF_PROOF_LEN: usize = 32;

/// The proof that a sender holds a chunk's bytes, carried by a [`Codec::Ref`]
/// chunk: blake3 keyed with the session's nonce over the chunk's bytes. The
/// nonce is fresh per session, so a proof can neither be computed from the
/// chunk id alone nor replayed from another session.
pub fn ref_proof(nonce: &[u8; NONCE_LEN], chunk: &[u8]) -> [u8; REF_PROOF_LEN] {
    *blake3::keyed_hash(nonce, chunk).as_bytes()
}

/// Picks the version both sides speak: the highest of `[min, max]` this build knows.
pub fn negotiate_version(min: u16, max: u16) -> Option<u16> {
    (min..=max)
        .contains(&PROTOCOL_VERSION)
        .then_some(PROTOCOL_VERSION)
}

wire_enum! {
    /// How a chunk's bytes travel in a [`Message::Chunk`] (one byte on the wire).
    pub enum Codec: u8 {
        /// The chunk is all zero; no data follows.
        Zero = 0 => "zero",
        /// The bytes as they are on disk.
        Raw = 1 => "raw",
        /// zstd-compressed bytes.
        Zstd = 2 => "zstd",
        /// The receiver already holds a chunk with this id. The data is the
        /// sender's proof that it holds the bytes too: [`ref_proof`] under the
        /// session's nonce, exactly [`REF_PROOF_LEN`] bytes.
        Ref = 3 => "ref",
    }
}

wire_enum! {
    /// Why a peer ended a session, as sent in [`Message::Error`] (a u16 on the wire).
    #[non_exhaustive]
    pub enum ErrorCode: u16, unknown Unknown => "error code {}", named from_u16 / to_u16 {
        /// No protocol version in common.
        UnsupportedVersion = 1 => "unsupported protocol version",
        /// The source id claimed does not match the certificate.
        SourceMismatch = 2 => "source id does not match certificate",
        /// Another session for this source is active.
        Busy = 3 => "source busy",
        /// A frame could not be decoded or violated a limit.
        BadFrame = 4 => "bad frame",
        /// A chunk failed verification (size, decompression, or hash).
        BadChunk = 5 => "bad chunk",
        /// The disk's geometry differs from the replica's.
        GeometryMismatch = 6 => "geometry mismatch",
        /// The commit's epoch does not follow the replica's head.
        EpochMismatch = 7 => "epoch mismatch",
        /// The root computed by the server differs from the agent's.
        RootMismatch = 8 => "root mismatch",
        /// A message arrived that the session's state does not allow.
        UnexpectedMessage = 9 => "unexpected message",
        /// The certificate does not authorize this.
        Unauthorized = 10 => "unauthorized",
        /// The server failed (e.g. a disk error); nothing was committed.
        Internal = 11 => "internal server error",
        /// The source has been cut over: replication is fenced until reset.
        Fenced = 12 => "source fenced after cutover",
        /// The request names something that does not exist (e.g. a launch).
        NotFound = 13 => "not found",
        /// Another replication server sharing the store holds the source's
        /// lease: the agent tries its next server.
        ServedElsewhere = 14 => "source served by another server",
    }
}

wire_enum! {
    /// The type byte of a frame: which [`Message`] its body holds. An unknown
    /// type is an error ([`ProtoErrorKind::UnknownType`]).
    pub enum MessageType: u8 {
        /// [`Message::Hello`].
        Hello = 1 => "Hello",
        /// [`Message::Welcome`].
        Welcome = 2 => "Welcome",
        /// [`Message::GetPages`].
        GetPages = 3 => "GetPages",
        /// [`Message::Page`].
        Page = 4 => "Page",
        /// [`Message::Chunk`].
        Chunk = 5 => "Chunk",
        /// [`Message::Commit`].
        Commit = 6 => "Commit",
        /// [`Message::Committed`].
        Committed = 7 => "Committed",
        /// [`Message::Error`].
        Error = 8 => "Error",
        /// [`Message::Backlog`].
        Backlog = 9 => "Backlog",
        /// [`Message::Offer`].
        Offer = 10 => "Offer",
        /// [`Message::Have`].
        Have = 11 => "Have",
        /// [`Message::CutoverReady`].
        CutoverReady = 12 => "CutoverReady",
        /// [`Message::FailbackStart`].
        FailbackStart = 13 => "FailbackStart",
        /// [`Message::FailbackPlan`].
        FailbackPlan = 14 => "FailbackPlan",
        /// [`Message::Want`].
        Want = 15 => "Want",
        /// [`Message::FailbackDone`].
        FailbackDone = 16 => "FailbackDone",
        /// [`Message::FailbackAck`].
        FailbackAck = 17 => "FailbackAck",
        /// [`Message::GetBasePages`].
        GetBasePages = 18 => "GetBasePages",
        /// [`Message::CutoverReport`].
        CutoverReport = 19 => "CutoverReport",
        /// [`Message::Progress`].
        Progress = 20 => "Progress",
        /// [`Message::GetBlockValues`].
        GetBlockValues = 21 => "GetBlockValues",
        /// [`Message::BlockValues`].
        BlockValues = 22 => "BlockValues",
        /// [`Message::Patch`].
        Patch = 23 => "Patch",
        /// [`Message::WantPatched`].
        WantPatched = 24 => "WantPatched",
        /// [`Message::Capture`].
        Capture = 25 => "Capture",
        /// [`Message::MachineHello`].
        MachineHello = 26 => "MachineHello",
        /// [`Message::MachineWelcome`].
        MachineWelcome = 27 => "MachineWelcome",
        /// [`Message::VolumeHead`].
        VolumeHead = 28 => "VolumeHead",
        /// [`Message::SelectVolume`].
        SelectVolume = 29 => "SelectVolume",
    }
}

/// Every message of the protocol.
///
/// Session order: agent `Hello` -> server `Welcome` (or `Error`) -> agent `GetPages`*
/// -> server `Page`* -> agent `Chunk`* `Commit` -> server `Committed` -> next epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Agent -> server: versions spoken, the source id the agent was configured with
    /// (checked against the certificate, never trusted), and the disk's geometry.
    Hello {
        version_min: u16,
        version_max: u16,
        source: SourceId,
        disk_size_bytes: u64,
        chunk_size_bytes: u32,
    },
    /// Server -> agent: chosen version, the session's nonce (for the proofs of
    /// `Ref` chunks) and the replica's committed head, if any.
    Welcome {
        version: u16,
        /// Fresh random bytes per session: the key of [`ref_proof`].
        nonce: [u8; NONCE_LEN],
        head_epoch: u64,
        /// Encoded [`blockrep_core::Root`] of the head; empty when there is none.
        head_root: Bytes,
        /// For a source encrypted at rest, the key of its id space
        /// ([`blockrep_core::IdSpace`]): the agent names chunks by their
        /// stored ids. `None` for a source stored in clear.
        id_key: Option<[u8; blockrep_core::ID_KEY_LEN]>,
    },
    /// Agent -> server: send these index pages of the head.
    GetPages { indices: Vec<u32> },
    /// Server -> agent: one index page of the head (encoded ids).
    Page { index: u32, ids: Bytes },
    /// Agent -> server: the new content of chunk `index`.
    Chunk {
        index: u64,
        id: ChunkId,
        codec: Codec,
        /// Length of the chunk's bytes once decoded.
        raw_len: u32,
        data: Bytes,
    },
    /// Agent -> server: how much the scan found to send, before the chunks.
    Backlog {
        scan_started_unix_ms: u64,
        chunks_pending: u64,
        bytes_pending: u64,
    },
    /// Agent -> server: ids of chunks about to be sent; the server answers with
    /// [`Message::Have`] so that chunks it already holds travel as references.
    Offer { ids: Vec<ChunkId> },
    /// Server -> agent: bit `i` (LSB first) set when the agent may send
    /// `ids[i]` of the matching `Offer` as a reference: the source's own data,
    /// or data of another source of its tenant. A chunk stored for another
    /// tenant is never admitted to.
    Have { bits: Bytes },
    /// Agent -> server: commit the epoch; `root` is the root the agent expects.
    Commit {
        epoch: u64,
        root: ChunkId,
        scan_started_unix_ms: u64,
        /// The epoch holds every change of its scan (not an intermediate step of
        /// a large sync): the replica then equals the disk as scanned.
        complete: bool,
        /// The final epoch before cutover.
        last: bool,
        /// How the scanned view was taken: what the committed root may claim.
        /// One byte on the wire ([`Consistency::to_byte`]); an unknown byte is
        /// a malformed frame.
        consistency: Consistency,
    },
    /// Server -> agent: the epoch is durable.
    Committed {
        epoch: u64,
        root: ChunkId,
        chunks_received: u64,
        bytes_received: u64,
        /// Chunks received that were new to the source (whether another
        /// source's data held them is not said).
        chunks_stored: u64,
        /// The operator asked for a cutover: the agent should run its final epoch.
        cutover_requested: bool,
    },
    /// Server -> agent, after a `Commit` with `last`: the cutover snapshot and
    /// launch volume are ready.
    CutoverReady {
        epoch: u64,
        root: ChunkId,
        snapshot: String,
        launch: String,
        commit_ms: u64,
        launch_ms: u64,
    },
    /// Agent -> server, after `CutoverReady`: the agent's side of the downtime,
    /// kept with the source's cutover record.
    CutoverReport {
        hook_ms: u64,
        scan_ms: u64,
        transfer_ms: u64,
        total_ms: u64,
    },
    /// Agent -> server, first message after `Welcome` of a failback session:
    /// bring the disk back to this launch volume's content.
    FailbackStart { launch: String },
    /// Server -> agent: the launch's current root (the target) and the root the
    /// disk had at cutover (the base, to detect changes made to the disk since).
    FailbackPlan {
        target_root: Bytes,
        base_root: Bytes,
    },
    /// Agent -> server (failback): send these index pages of the base root
    /// (`GetPages` asks for pages of the target).
    GetBasePages { indices: Vec<u32> },
    /// Agent -> server (failback): send the target's data for these chunks.
    Want { indices: Vec<u64> },
    /// Agent -> server (failback): the disk now has `root`; `finalize` ends the
    /// failback (the source becomes `failed_back`).
    FailbackDone { root: ChunkId, finalize: bool },
    /// Server -> agent: whether `root` equals the target, and whether the
    /// operator asked to finalize.
    FailbackAck {
        matches: bool,
        finalize_requested: bool,
    },
    /// Server -> agent, unprompted, at most once per [`PROGRESS_INTERVAL`]
    /// while frames keep arriving, and once per interval while the server
    /// works on a commit (verifying, fsyncing, preparing a cutover launch):
    /// the agent's wait for an answer (which starts when its last byte enters
    /// the socket, not when it is delivered) then fails only on a path that
    /// stopped, not on one that is slow to drain or a server that is busy.
    /// Never sent while nothing arrives and nothing is being committed, so a
    /// dead path still goes silent. An agent ignores it wherever it comes.
    Progress {
        /// Bytes of frames the server has read on this connection so far.
        bytes_received: u64,
    },
    /// Agent -> server: the block values ([`blockrep_core::hash_with_block_values`])
    /// of these chunks, to find which blocks of a changed chunk differ from
    /// them. At most [`crate::BLOCK_VALUES_IDS_MAX`] ids.
    GetBlockValues { ids: Vec<ChunkId> },
    /// Server -> agent: one entry per id of the matching `GetBlockValues`, in
    /// order: the chunk's block values concatenated ([`blockrep_core::BLOCK_VALUE_LEN`]
    /// bytes each, one per block), or empty when the server does not hold the
    /// chunk for this source (the agent then sends the whole chunk).
    BlockValues { values: Vec<Bytes> },
    /// Agent -> server: the new content of chunk `index`, as the byte ranges
    /// that differ from chunk `base` (a chunk of this source the server
    /// holds). `data`, decoded with `codec` (raw or zstd), is the concatenation
    /// of the ranges' new bytes; the server applies them to `base` and keeps
    /// the result only if it hashes to `id`.
    Patch {
        index: u64,
        base: ChunkId,
        id: ChunkId,
        codec: Codec,
        /// Length of the chunk (and of its base): a patch never resizes a chunk.
        raw_len: u32,
        /// `(offset, len)` in the chunk, sorted, not overlapping, none empty.
        ranges: Vec<(u32, u32)>,
        data: Bytes,
    },
    /// Agent -> server (failback): send the target's data for these chunks,
    /// each as a `Patch` against the disk's chunk where that is smaller, else
    /// as a `Chunk`. An entry is a chunk index, the id of the chunk the disk
    /// holds there, and that chunk's block values (empty when the disk holds
    /// no data there). At most [`crate::WANT_PATCHED_MAX`] entries.
    WantPatched { entries: Vec<(u64, ChunkId, Bytes)> },
    /// Agent -> server, before a `Commit` in write-capture mode (`agent
    /// --serve`): the state of the capture, for status and metrics. Counters
    /// are since the agent started; latencies are of the workload's writes
    /// since the previous report.
    Capture {
        /// Bytes written by the workload and not yet in a committed epoch.
        dirty_bytes: u64,
        /// Bytes of old content held so that the cut in flight reads as of
        /// its instant.
        preserved_bytes: u64,
        /// Epochs cut since the agent started.
        cuts: u64,
        /// Writes the workload made through the agent's export.
        writes: u64,
        /// Median write latency the workload saw, in microseconds.
        write_p50_us: u64,
        /// 99th percentile write latency the workload saw, in microseconds.
        write_p99_us: u64,
    },
    /// Agent -> server, instead of `Hello`, from an agent that replicates a
    /// machine of several disks: versions, source, the chunk size all
    /// volumes share, and each volume's name and size, in the order the
    /// session's `VolumeHead` and `SelectVolume` index them. At most
    /// [`blockrep_core::VOLUMES_MAX`] volumes.
    MachineHello {
        version_min: u16,
        version_max: u16,
        source: SourceId,
        chunk_size_bytes: u32,
        volumes: Vec<(VolumeName, u64)>,
        /// The operator allows volumes the head has and `volumes` lacks to
        /// be dropped from the machine (`--allow-volume-removal`); without
        /// it such a session is refused. One byte on the wire, 0 or 1.
        allow_volume_removal: bool,
    },
    /// Server -> agent, the answer to `MachineHello`: chosen version, the
    /// session's nonce, the machine's head epoch and root; one `VolumeHead`
    /// per volume follows.
    MachineWelcome {
        version: u16,
        nonce: [u8; NONCE_LEN],
        head_epoch: u64,
        /// The root the head names (a machine root, or a single disk's
        /// root); the zero id without a head. An agent whose volumes make
        /// this root has nothing to commit.
        head_root: ChunkId,
        /// As in [`Message::Welcome`].
        id_key: Option<[u8; blockrep_core::ID_KEY_LEN]>,
    },
    /// Server -> agent, after `MachineWelcome`: the encoded
    /// [`blockrep_core::Root`] volume `index` has in the head; empty for a
    /// volume the head does not have yet (its first sync).
    VolumeHead { index: u16, root: Bytes },
    /// Agent -> server (machine session): the frames that follow, until the
    /// next `SelectVolume`, are about volume `index` (`GetPages`, `Offer`,
    /// `Chunk`, `Patch`, `GetBlockValues`). A machine's `Commit` names the
    /// [`blockrep_core::MachineRoot`] of all volumes.
    SelectVolume { index: u16 },
    /// Either way: the session ends for this reason.
    Error { code: ErrorCode, message: String },
}

/// How often, at most, a server sends [`Message::Progress`]. An agent's I/O
/// time-out must be longer, with a margin for scheduling: agents refuse one
/// shorter than [`IO_TIMEOUT_MIN`].
pub const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The shortest I/O time-out an agent accepts: two progress intervals, so one
/// late `Progress` does not end a live session.
pub const IO_TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Message {
    /// Which message this is: its frame's type byte.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Welcome { .. } => MessageType::Welcome,
            Message::GetPages { .. } => MessageType::GetPages,
            Message::Page { .. } => MessageType::Page,
            Message::Chunk { .. } => MessageType::Chunk,
            Message::Commit { .. } => MessageType::Commit,
            Message::Committed { .. } => MessageType::Committed,
            Message::Error { .. } => MessageType::Error,
            Message::Backlog { .. } => MessageType::Backlog,
            Message::Offer { .. } => MessageType::Offer,
            Message::Have { .. } => MessageType::Have,
            Message::CutoverReady { .. } => MessageType::CutoverReady,
            Message::FailbackStart { .. } => MessageType::FailbackStart,
            Message::FailbackPlan { .. } => MessageType::FailbackPlan,
            Message::Want { .. } => MessageType::Want,
            Message::FailbackDone { .. } => MessageType::FailbackDone,
            Message::FailbackAck { .. } => MessageType::FailbackAck,
            Message::GetBasePages { .. } => MessageType::GetBasePages,
            Message::CutoverReport { .. } => MessageType::CutoverReport,
            Message::Progress { .. } => MessageType::Progress,
            Message::GetBlockValues { .. } => MessageType::GetBlockValues,
            Message::BlockValues { .. } => MessageType::BlockValues,
            Message::Patch { .. } => MessageType::Patch,
            Message::WantPatched { .. } => MessageType::WantPatched,
            Message::Capture { .. } => MessageType::Capture,
            Message::MachineHello { .. } => MessageType::MachineHello,
            Message::MachineWelcome { .. } => MessageType::MachineWelcome,
            Message::VolumeHead { .. } => MessageType::VolumeHead,
            Message::SelectVolume { .. } => MessageType::SelectVolume,
        }
    }

    /// The message type's byte on the wire.
    pub fn type_byte(&self) -> u8 {
        self.message_type().to_wire()
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        self.message_type().as_str()
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoErrorKind {
    /// The frame length exceeds [`crate::FRAME_LEN_MAX`] or is too short for a
    /// checksum and a type.
    FrameTooLarge,
    /// Unknown message type.
    UnknownType,
    /// The body is shorter or longer than its fields, or a field is invalid.
    Malformed,
    /// A count or length inside the body exceeds its limit.
    LimitExceeded,
    /// The frame's checksum does not match its bytes: it was damaged before it
    /// was sent (TLS protects it only from there on).
    Checksum,
}

/// A decoding error: the peer sent something invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    kind: ProtoErrorKind,
    message: String,
}

impl ProtoError {
    pub(crate) fn new(kind: ProtoErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The cause.
    pub fn kind(&self) -> ProtoErrorKind {
        self.kind
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProtoError {}
