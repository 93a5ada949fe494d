//! Option haggling: from the greeting to a chosen export.
//!
//! Reads are unbuffered on purpose: after `NBD_OPT_STARTTLS` the next bytes on
//! the socket are the client's TLS hello, and a read-ahead buffer would swallow
//! them.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, ErrorKind};
use crate::wire::{self, ClientFlags, OptionType};
use crate::{Client, Export, Limits, Registry};

/// How option haggling ended.
pub(crate) enum Outcome {
    /// Enter transmission on this export.
    Transmit(Arc<dyn Export>),
    /// The client sent `NBD_OPT_STARTTLS` and got `NBD_REP_ACK`: upgrade, then haggle on.
    StartTls,
    /// The client sent `NBD_OPT_ABORT`.
    Abort,
}

/// The state of one connection's negotiation; survives the TLS upgrade.
pub(crate) struct Handshake<'a> {
    registry: &'a Arc<dyn Registry>,
    limits: &'a Limits,
    tls_offered: bool,
    tls_required: bool,
    pub(crate) tls_active: bool,
    client: ClientFlags,
    /// Who the registry is asked on behalf of; gains its certificates when
    /// TLS comes up.
    pub(crate) peer: Client,
    options_seen: u32,
}

/// Sends the greeting and reads the client's flags.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<ClientFlags, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&wire::encode_greeting())
        .await
        .map_err(|e| Error::io("sending greeting", e))?;
    stream
        .flush()
        .await
        .map_err(|e| Error::io("sending greeting", e))?;
    let mut flags = [0; wire::CLIENT_FLAGS_LEN];
    stream
        .read_exact(&mut flags)
        .await
        .map_err(|e| Error::io("reading client flags", e))?;
    wire::parse_client_flags(&flags).map_err(|e| Error::wire("client flags", e))
}

impl<'a> Handshake<'a> {
    pub(crate) fn new(
        registry: &'a Arc<dyn Registry>,
        limits: &'a Limits,
        tls_offered: bool,
        tls_required: bool,
        client: ClientFlags,
        peer: Client,
    ) -> Self {
        Self {
            registry,
            limits,
            tls_offered,
            tls_required,
            tls_active: false,
            client,
            peer,
            options_seen: 0,
        }
    }

    /// Answers options until one of them ends the negotiation.
    pub(crate) async fn haggle<S>(&mut self, stream: &mut S) -> Result<Outcome, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let (option, data) = self.read_option(stream).await?;
            if let Some(outcome) = self.answer(stream, option, &data).await? {
                return Ok(outcome);
            }
        }
    }

    async fn read_option<S>(&mut self, stream: &mut S) -> Result<(OptionType, Vec<u8>), Error>
    where
        S: AsyncRead + Unpin,
    {
        let mut header = [0; wire::OPTION_HEADER_LEN];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|e| Error::io("reading option header", e))?;
        let header = wire::parse_option_header(&header).map_err(|e| Error::wire("option", e))?;
        self.options_seen += 1;
        if self.options_seen > self.limits.options_max {
            return Err(Error::new(
                ErrorKind::PeerMisbehaved,
                format!("more than {} options", self.limits.options_max),
            ));
        }
        if header.length > wire::OPTION_DATA_BYTES_MAX {
            return Err(Error::new(
                ErrorKind::PeerMisbehaved,
                format!(
                    "option {} carries {} bytes, more than {}",
                    header.option.to_u32(),
                    header.length,
                    wire::OPTION_DATA_BYTES_MAX
                ),
            ));
        }
        // Bounded by OPTION_DATA_BYTES_MAX just above.
        let mut data = vec![0; header.length as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(|e| Error::io("reading option data", e))?;
        Ok((header.option, data))
    }

    /// Answers one option; `Some` when negotiation is over.
    async fn answer<S>(
        &mut self,
        stream: &mut S,
        option: OptionType,
        data: &[u8],
    ) -> Result<Option<Outcome>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let code = option.to_u32();
        let tls_missing = self.tls_required && !self.tls_active;
        if tls_missing && !matches!(option, OptionType::StartTls | OptionType::Abort) {
            if option == OptionType::ExportName {
                return Err(Error::new(
                    ErrorKind::Refused,
                    "NBD_OPT_EXPORT_NAME before the required STARTTLS",
                ));
            }
            send_reply(stream, code, wire::REPLY_ERR_TLS_REQD, b"TLS is required").await?;
            return Ok(None);
        }
        match option {
            OptionType::ExportName => self.export_name(stream, data).await.map(Some),
            OptionType::Go | OptionType::Info => self.info(stream, option, data).await,
            OptionType::List => {
                self.list(stream, data).await?;
                Ok(None)
            }
            OptionType::Abort => {
                // The client may already be gone; its leaving is not an error.
                let _ = send_reply(stream, code, wire::REPLY_ACK, &[]).await;
                Ok(Some(Outcome::Abort))
            }
            OptionType::StartTls => self.start_tls(stream, data).await,
            OptionType::StructuredReply | OptionType::Other(_) => {
                send_reply(stream, code, wire::REPLY_ERR_UNSUP, &[]).await?;
                Ok(None)
            }
        }
    }

    async fn export_name<S>(&self, stream: &mut S, data: &[u8]) -> Result<Outcome, Error>
    where
        S: AsyncWrite + Unpin,
    {
        // This option has no error reply: anything wrong ends the session.
        let name = wire::parse_export_name(data).map_err(|e| Error::wire("export name", e))?;
        let export = self
            .lookup(&name)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::Refused, unknown_export(&name)))?;
        let reply = wire::encode_export_name_reply(
            export.size_bytes(),
            transmission_flags(export.as_ref()),
            self.client.no_zeroes,
        );
        write_flushed(stream, &reply, "sending export").await?;
        Ok(Outcome::Transmit(export))
    }

    async fn info<S>(
        &self,
        stream: &mut S,
        option: OptionType,
        data: &[u8],
    ) -> Result<Option<Outcome>, Error>
    where
        S: AsyncWrite + Unpin,
    {
        let code = option.to_u32();
        let request = match wire::parse_info_request(data) {
            Ok(request) => request,
            Err(e) => {
                let message = e.to_string();
                send_reply(stream, code, wire::REPLY_ERR_INVALID, message.as_bytes()).await?;
                return Ok(None);
            }
        };
        let Some(export) = self.lookup(&request.name).await? else {
            let message = unknown_export(&request.name);
            send_reply(stream, code, wire::REPLY_ERR_UNKNOWN, message.as_bytes()).await?;
            return Ok(None);
        };
        let mut out = Vec::new();
        let export_info =
            wire::encode_info_export(export.size_bytes(), transmission_flags(export.as_ref()));
        wire::encode_option_reply(code, wire::REPLY_INFO, &export_info, &mut out);
        if request.info_types.contains(&wire::INFO_NAME) {
            let name = wire::encode_info_name(&request.name);
            wire::encode_option_reply(code, wire::REPLY_INFO, &name, &mut out);
        }
        // Sent whether asked or not (the protocol allows it) so that clients
        // know the largest request this server takes.
        let block_size =
            wire::encode_info_block_size(1, PREFERRED_BLOCK_BYTES, self.limits.request_bytes_max);
        wire::encode_option_reply(code, wire::REPLY_INFO, &block_size, &mut out);
        wire::encode_option_reply(code, wire::REPLY_ACK, &[], &mut out);
        write_flushed(stream, &out, "sending export info").await?;
        Ok((option == OptionType::Go).then_some(Outcome::Transmit(export)))
    }

    async fn list<S>(&self, stream: &mut S, data: &[u8]) -> Result<(), Error>
    where
        S: AsyncWrite + Unpin,
    {
        let code = OptionType::List.to_u32();
        if !data.is_empty() {
            return send_reply(stream, code, wire::REPLY_ERR_INVALID, b"LIST takes no data").await;
        }
        let registry = Arc::clone(self.registry);
        let peer = self.peer.clone();
        let exports = tokio::task::spawn_blocking(move || registry.list(&peer))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("listing exports: {e}")))?;
        let mut out = Vec::new();
        for (name, description) in &exports {
            // Names the protocol cannot carry could not be opened anyway.
            if name.len() > wire::STRING_BYTES_MAX || name.contains('\0') {
                continue;
            }
            let description = truncate_utf8(description, wire::STRING_BYTES_MAX);
            let entry = wire::encode_reply_server(name, description);
            wire::encode_option_reply(code, wire::REPLY_SERVER, &entry, &mut out);
        }
        wire::encode_option_reply(code, wire::REPLY_ACK, &[], &mut out);
        write_flushed(stream, &out, "sending export list").await
    }

    async fn start_tls<S>(&self, stream: &mut S, data: &[u8]) -> Result<Option<Outcome>, Error>
    where
        S: AsyncWrite + Unpin,
    {
        let code = OptionType::StartTls.to_u32();
        let (reply, message): (u32, &[u8]) = if self.tls_active {
            (wire::REPLY_ERR_INVALID, b"TLS is already active")
        } else if !self.tls_offered || !self.client.fixed_newstyle {
            (wire::REPLY_ERR_POLICY, b"TLS is not offered")
        } else if !data.is_empty() {
            (wire::REPLY_ERR_INVALID, b"STARTTLS takes no data")
        } else {
            send_reply(stream, code, wire::REPLY_ACK, &[]).await?;
            return Ok(Some(Outcome::StartTls));
        };
        send_reply(stream, code, reply, message).await?;
        Ok(None)
    }

    async fn lookup(&self, name: &str) -> Result<Option<Arc<dyn Export>>, Error> {
        let registry = Arc::clone(self.registry);
        let name = name.to_owned();
        let peer = self.peer.clone();
        tokio::task::spawn_blocking(move || registry.lookup(&peer, &name))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("looking up export: {e}")))
    }
}

/// The refusal of a name, the same whether it exists nowhere or the registry
/// will not show it to this client, so that refusals reveal nothing.
fn unknown_export(name: &str) -> String {
    format!("no export named {name:?} that this client may open")
}

/// Preferred block size advertised to clients: the page size, which every
/// backing store handles without read-modify-write. Never above the maximum,
/// because `request_bytes_max` is at least [`crate::REQUEST_BYTES_MAX_FLOOR`].
const PREFERRED_BLOCK_BYTES: u32 = 4096;

/// The transmission flags for an export.
pub(crate) fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = wire::TRANSMISSION_FLAG_HAS_FLAGS
        | wire::TRANSMISSION_FLAG_SEND_FLUSH
        | wire::TRANSMISSION_FLAG_SEND_FUA;
    if export.read_only() {
        flags |= wire::TRANSMISSION_FLAG_READ_ONLY;
    } else {
        flags |= wire::TRANSMISSION_FLAG_SEND_TRIM | wire::TRANSMISSION_FLAG_SEND_WRITE_ZEROES;
    }
    if export.multi_conn_safe() {
        flags |= wire::TRANSMISSION_FLAG_CAN_MULTI_CONN;
    }
    flags
}

async fn send_reply<S>(
    stream: &mut S,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), Error>
where
    S: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(wire::OPTION_REPLY_HEADER_LEN + data.len());
    wire::encode_option_reply(option, reply_type, data, &mut out);
    write_flushed(stream, &out, "sending option reply").await
}

/// Writes and flushes: a TLS stream holds data back until flushed.
async fn write_flushed<S>(stream: &mut S, bytes: &[u8], context: &str) -> Result<(), Error>
where
    S: AsyncWrite + Unpin,
{
    stream
        .write_all(bytes)
        .await
        .map_err(|e| Error::io(context, e))?;
    stream.flush().await.map_err(|e| Error::io(context, e))
}

fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
