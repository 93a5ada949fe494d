//! The NBD wire format, with no I/O: fixed-size headers in, typed values out,
//! and the encoders for everything the server sends.
//!
//! Every integer on the wire is big-endian (network byte order). Parsers take
//! exactly the bytes of one header or one option's data; anything a peer
//! controls (string lengths, counts) is checked against what was received and
//! against a cap before it is used, and trailing bytes are errors. Nothing here
//! panics on any input, which is what the fuzz targets and property tests rely on.
//!
//! [`check_request`] holds the transmission-phase policy (bounds, flags,
//! read-only, size caps) as a pure function so that it can be tested without a
//! socket.

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows [`NBD_MAGIC`] in the greeting and starts every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every reply to an option in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Bytes in the server greeting: magic, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes in the client flags that answer the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Bytes in an option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes in an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes in a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of zeroes after the `NBD_OPT_EXPORT_NAME` reply unless the client set
/// [`CLIENT_FLAG_NO_ZEROES`].
pub const EXPORT_NAME_PADDING_LEN: usize = 124;

/// Longest string (export name, description) the protocol allows.
pub const STRING_BYTES_MAX: usize = 4096;
/// Most info requests accepted in one `NBD_OPT_INFO`/`NBD_OPT_GO`: there are
/// four defined info types, so a longer list can only be padding or an attack.
pub const INFO_REQUESTS_MAX: usize = 64;
/// Largest option data accepted: the largest valid `NBD_OPT_GO` (name length,
/// longest name, count, [`INFO_REQUESTS_MAX`] requests) rounded up. Larger
/// options end the connection rather than being read and skipped.
pub const OPTION_DATA_BYTES_MAX: u32 = 8192;

/// Handshake flag: the server speaks fixed newstyle negotiation.
pub const HANDSHAKE_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const HANDSHAKE_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle negotiation.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set; says the other flags are meaningful.
pub const TRANSMISSION_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const TRANSMISSION_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const TRANSMISSION_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FUA`.
pub const TRANSMISSION_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server accepts `NBD_CMD_TRIM`.
pub const TRANSMISSION_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server accepts `NBD_CMD_WRITE_ZEROES`.
pub const TRANSMISSION_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: flushes and FUA writes are visible to and durable for
/// every connection to the export, so a client may spread I/O over several.
pub const TRANSMISSION_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flag: force unit access; the reply waits until the data is durable.
pub const COMMAND_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`NBD_CMD_WRITE_ZEROES` only): do not punch a hole.
pub const COMMAND_FLAG_NO_HOLE: u16 = 1 << 1;

/// Option reply type: the option succeeded (or a list ended).
pub const REPLY_ACK: u32 = 1;
/// Option reply type: one export of an `NBD_OPT_LIST`.
pub const REPLY_SERVER: u32 = 2;
/// Option reply type: one piece of export information (`NBD_OPT_INFO`/`GO`).
pub const REPLY_INFO: u32 = 3;
/// Option error: the option is not supported.
pub const REPLY_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: the option is understood but server policy refuses it.
pub const REPLY_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: the option's data is malformed or the option is out of place.
pub const REPLY_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: TLS must be started first.
pub const REPLY_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option error: no export of that name.
pub const REPLY_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REPLY_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

/// Info type: size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// Info type: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Info type: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Why bytes from the peer could not be parsed. Each of these ends the
/// connection when it happens in a header, or earns `NBD_REP_ERR_INVALID` when
/// it happens inside an option's data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A magic number did not match.
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// The magic the protocol requires here.
        expected: u64,
        /// What the peer sent.
        found: u64,
    },
    /// The client set flags the server did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Data ended before a length it declared.
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the declared lengths require.
        needed: usize,
        /// Bytes actually present.
        available: usize,
    },
    /// Data went on after everything it declared.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// A string is longer than [`STRING_BYTES_MAX`].
    #[error("string of {0} bytes is longer than {STRING_BYTES_MAX}")]
    StringTooLong(usize),
    /// A string is not UTF-8 or contains NUL.
    #[error("string is not UTF-8 without NUL")]
    BadString,
    /// More info requests than [`INFO_REQUESTS_MAX`].
    #[error("{0} info requests, more than {INFO_REQUESTS_MAX}")]
    TooManyInfoRequests(usize),
}

blockrep_core::wire_enum! {
    /// An option a client can send during the handshake (a u32 on the wire).
    /// An unknown option is kept, so that it can be refused politely.
    pub enum OptionType: u32, unknown Other => "NBD option {}", named from_u32 / to_u32 {
        /// Pick an export and enter transmission; cannot fail politely.
        ExportName = 1 => "NBD_OPT_EXPORT_NAME",
        /// The client is leaving.
        Abort = 2 => "NBD_OPT_ABORT",
        /// List exports.
        List = 3 => "NBD_OPT_LIST",
        /// Upgrade the connection to TLS.
        StartTls = 5 => "NBD_OPT_STARTTLS",
        /// Describe an export.
        Info = 6 => "NBD_OPT_INFO",
        /// Describe an export and enter transmission.
        Go = 7 => "NBD_OPT_GO",
        /// Structured replies (refused by this server).
        StructuredReply = 8 => "NBD_OPT_STRUCTURED_REPLY",
    }
}

blockrep_core::wire_enum! {
    /// A transmission-phase command (a u16 on the wire). An unknown command is
    /// kept, and answered with `EINVAL`.
    pub enum Command: u16, unknown Other => "NBD command {}", named from_u16 / to_u16 {
        /// Read `length` bytes.
        Read = 0 => "NBD_CMD_READ",
        /// Followed by `length` bytes of payload.
        Write = 1 => "NBD_CMD_WRITE",
        /// The client is leaving; no reply.
        Disc = 2 => "NBD_CMD_DISC",
        /// Make every completed write durable.
        Flush = 3 => "NBD_CMD_FLUSH",
        /// The range's data is no longer needed.
        Trim = 4 => "NBD_CMD_TRIM",
        /// Write zeroes over the range, with no payload.
        WriteZeroes = 6 => "NBD_CMD_WRITE_ZEROES",
    }
}

blockrep_core::wire_enum! {
    /// Error values carried in a simple reply (a u32 on the wire). The
    /// protocol fixes these numbers; they match Linux errno values but are not
    /// the local system's errno.
    pub enum ErrorCode: u32, named from_u32 / to_u32 {
        /// Write to a read-only export.
        Perm = 1 => "EPERM",
        /// The backing store failed.
        Io = 5 => "EIO",
        /// Bad offset, length, flags or command.
        Inval = 22 => "EINVAL",
        /// Write beyond the end of the export, or the store is full.
        NoSpc = 28 => "ENOSPC",
        /// The server is shutting down.
        Shutdown = 108 => "ESHUTDOWN",
    }
}

impl ErrorCode {
    /// The error to send for a failed export operation.
    pub fn from_io(error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match error.kind() {
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Self::Perm,
            ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded => {
                Self::NoSpc
            }
            ErrorKind::InvalidInput => Self::Inval,
            _ => Self::Io,
        }
    }
}

/// Flags the client sends after the greeting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

/// Parses the client flags; a flag this server did not offer is an error (the
/// protocol requires the server to drop such a client).
pub fn parse_client_flags(bytes: &[u8; CLIENT_FLAGS_LEN]) -> Result<ClientFlags, WireError> {
    let flags = u32::from_be_bytes(*bytes);
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & !known != 0 {
        return Err(WireError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// Encodes client flags (for clients and tests).
pub fn encode_client_flags(flags: ClientFlags) -> [u8; CLIENT_FLAGS_LEN] {
    let mut value = 0;
    if flags.fixed_newstyle {
        value |= CLIENT_FLAG_FIXED_NEWSTYLE;
    }
    if flags.no_zeroes {
        value |= CLIENT_FLAG_NO_ZEROES;
    }
    value.to_be_bytes()
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags
/// (fixed newstyle and no zeroes).
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    let flags = HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES;
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The header of one option sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Which option.
    pub option: OptionType,
    /// Bytes of option data that follow; not yet checked against any cap.
    pub length: u32,
}

/// Parses an option header; only a bad magic is an error.
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, WireError> {
    let magic = be_u64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: OptionType::from_u32(be_u32(bytes, 8)),
        length: be_u32(bytes, 12),
    })
}

/// Encodes an option header (for clients and tests).
pub fn encode_option_header(header: OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0; OPTION_HEADER_LEN];
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&header.option.to_u32().to_be_bytes());
    out[12..16].copy_from_slice(&header.length.to_be_bytes());
    out
}

/// The header of one option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers, as the client sent it.
    pub option: u32,
    /// `REPLY_*`.
    pub reply_type: u32,
    /// Bytes of reply data that follow.
    pub length: u32,
}

/// Appends an option reply (header and data) to `out`.
///
/// `data` is built by this crate and is never longer than a few KiB; a longer
/// one is a bug here, not peer input.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8], out: &mut Vec<u8>) {
    let length = u32::try_from(data.len()).expect("option reply data fits in u32");
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(data);
}

/// Parses an option reply header (for clients and tests).
pub fn parse_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, WireError> {
    let magic = be_u64(bytes, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: be_u32(bytes, 8),
        reply_type: be_u32(bytes, 12),
        length: be_u32(bytes, 16),
    })
}

/// Parses the data of `NBD_OPT_EXPORT_NAME`: the whole data is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String, WireError> {
    parse_string(data)
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// `INFO_*` types the client asks for, in its order.
    pub info_types: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`:
/// u32 name length, name, u16 request count, that many u16 info types.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    let name_len = usize::try_from(be_u32_at(data, 0)?).unwrap_or(usize::MAX);
    if name_len > STRING_BYTES_MAX {
        return Err(WireError::StringTooLong(name_len));
    }
    let name_end = 4 + name_len;
    let name_bytes = data.get(4..name_end).ok_or(WireError::Truncated {
        needed: name_end,
        available: data.len(),
    })?;
    let name = parse_string(name_bytes)?;
    let count = usize::from(be_u16_at(data, name_end)?);
    if count > INFO_REQUESTS_MAX {
        return Err(WireError::TooManyInfoRequests(count));
    }
    let requests_start = name_end + 2;
    let requests_end = requests_start + 2 * count;
    let requests = data
        .get(requests_start..requests_end)
        .ok_or(WireError::Truncated {
            needed: requests_end,
            available: data.len(),
        })?;
    if data.len() > requests_end {
        return Err(WireError::TrailingBytes(data.len() - requests_end));
    }
    let info_types = requests
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Ok(InfoRequest { name, info_types })
}

/// Encodes the data of `NBD_OPT_INFO`/`NBD_OPT_GO` (for clients and tests).
/// The name and list must respect [`STRING_BYTES_MAX`] and a u16 count.
pub fn encode_info_request(request: &InfoRequest) -> Vec<u8> {
    let name_len = u32::try_from(request.name.len()).expect("export name fits in u32");
    let count = u16::try_from(request.info_types.len()).expect("info request count fits in u16");
    let mut out = Vec::with_capacity(6 + request.name.len() + 2 * request.info_types.len());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(request.name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for info_type in &request.info_types {
        out.extend_from_slice(&info_type.to_be_bytes());
    }
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`: type, size, transmission flags.
pub fn encode_info_export(size_bytes: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`: type, minimum, preferred and
/// maximum (largest payload) sizes in bytes.
pub fn encode_info_block_size(
    minimum_bytes: u32,
    preferred_bytes: u32,
    maximum_bytes: u32,
) -> [u8; 14] {
    let mut out = [0; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum_bytes.to_be_bytes());
    out[6..10].copy_from_slice(&preferred_bytes.to_be_bytes());
    out[10..14].copy_from_slice(&maximum_bytes.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_NAME`: type, name.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&INFO_NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_SERVER` data: u32 name length, name, description.
pub fn encode_reply_server(name: &str, description: &str) -> Vec<u8> {
    let name_len = u32::try_from(name.len()).expect("export name fits in u32");
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// The reply to a successful `NBD_OPT_EXPORT_NAME`: size, transmission flags,
/// and 124 zero bytes unless the client asked for none.
pub fn encode_export_name_reply(
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING_LEN);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_PADDING_LEN, 0);
    }
    out
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `COMMAND_FLAG_*` bits as sent, unchecked.
    pub flags: u16,
    /// What to do.
    pub command: Command,
    /// Opaque value echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Bytes affected; for [`Command::Write`] also the payload length.
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_bytes(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Parses a request header; only a bad magic is an error (which ends the
/// connection: the stream can no longer be trusted to be in step).
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be_u16(bytes, 4),
        command: Command::from_u16(be_u16(bytes, 6)),
        handle: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        length: be_u32(bytes, 24),
    })
}

/// Encodes a request header (for clients and tests).
pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_u16().to_be_bytes());
    out[8..16].copy_from_slice(&request.handle.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.length.to_be_bytes());
    out
}

/// A simple reply header; for a successful read, the data follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 for success, else an [`ErrorCode`] value.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(reply: SimpleReply) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&reply.error.to_be_bytes());
    out[8..16].copy_from_slice(&reply.handle.to_be_bytes());
    out
}

/// Parses a simple reply header (for clients and tests).
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, WireError> {
    let magic = be_u32(bytes, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(WireError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(SimpleReply {
        error: be_u32(bytes, 4),
        handle: be_u64(bytes, 8),
    })
}

/// What the server knows about the export when it checks a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportLimits {
    /// The export's size.
    pub size_bytes: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Largest read or write payload accepted.
    pub request_bytes_max: u32,
}

/// Why a request will not be executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Reply with this error. A refused write's payload must still be consumed
    /// (it is no larger than `request_bytes_max`) to stay in step.
    Reply(ErrorCode),
    /// End the connection: a write payload too large to be worth skipping.
    Disconnect,
}

/// Decides whether a request may run against an export. Pure policy: the
/// server calls it before reserving any memory for the request.
pub fn check_request(request: &Request, export: &ExportLimits) -> Result<(), Refusal> {
    let allowed_flags = match request.command {
        Command::WriteZeroes => COMMAND_FLAG_FUA | COMMAND_FLAG_NO_HOLE,
        _ => COMMAND_FLAG_FUA,
    };
    // Checked first: an oversized write cannot even be answered without
    // reading (or skipping) its payload.
    if request.command == Command::Write && request.length > export.request_bytes_max {
        return Err(Refusal::Disconnect);
    }
    if request.flags & !allowed_flags != 0 {
        return Err(Refusal::Reply(ErrorCode::Inval));
    }
    let end = request.offset.checked_add(u64::from(request.length));
    let within = end.is_some_and(|end| end <= export.size_bytes);
    match request.command {
        Command::Read => {
            if request.length > export.request_bytes_max || !within {
                return Err(Refusal::Reply(ErrorCode::Inval));
            }
        }
        Command::Write | Command::WriteZeroes => {
            if export.read_only {
                return Err(Refusal::Reply(ErrorCode::Perm));
            }
            if !within {
                return Err(Refusal::Reply(ErrorCode::NoSpc));
            }
        }
        Command::Trim => {
            if export.read_only {
                return Err(Refusal::Reply(ErrorCode::Perm));
            }
            if !within {
                return Err(Refusal::Reply(ErrorCode::Inval));
            }
        }
        // Offset and length of a flush are reserved; being lenient costs nothing.
        Command::Flush | Command::Disc => {}
        Command::Other(_) => return Err(Refusal::Reply(ErrorCode::Inval)),
    }
    Ok(())
}

fn parse_string(bytes: &[u8]) -> Result<String, WireError> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(WireError::StringTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(WireError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadString)
}

fn be_u16_at(data: &[u8], at: usize) -> Result<u16, WireError> {
    let bytes = data.get(at..at + 2).ok_or(WireError::Truncated {
        needed: at + 2,
        available: data.len(),
    })?;
    Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn be_u32_at(data: &[u8], at: usize) -> Result<u32, WireError> {
    let bytes = data.get(at..at + 4).ok_or(WireError::Truncated {
        needed: at + 4,
        available: data.len(),
    })?;
    Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

// The fixed-offset readers below index fixed-size arrays at constant offsets,
// so a wrong offset fails every test rather than hiding behind peer input.
fn be_u16<const N: usize>(bytes: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32<const N: usize>(bytes: &[u8; N], at: usize) -> u32 {
    let mut out = [0; 4];
    out.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(out)
}

fn be_u64<const N: usize>(bytes: &[u8; N], at: usize) -> u64 {
    let mut out = [0; 8];
    out.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(out)
}

#[cfg(test)]
mod tests;
