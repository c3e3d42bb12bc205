//! The PostgreSQL wire protocol of a replication connection (`replication=database`), and
//! of the initial copy's relay between two ordinary sessions.
//!
//! Upstream tokio-postgres cannot speak CopyBoth, so the replication connection is ours:
//! this module opens the socket (TCP, or a unix socket when the host is a directory), runs
//! the startup and authentication (cleartext, MD5, SCRAM-SHA-256 without channel binding),
//! runs replication commands with the simple query protocol, and, once `START_REPLICATION`
//! has switched the session to CopyBoth, hands the socket to a task of its own
//! ([`Stream`]). The same sessions, opened without `replication`, carry the initial copy:
//! [`relay_copy`] moves a COPY from the source to the target without parsing its rows
//! (tokio-postgres would turn every row into a message of its own on both sides). Message encoding, parsing and the authentication exchanges come from the
//! `postgres-protocol` crate; the replication sub-protocol inside CopyData (`w` XLogData,
//! `k` primary keepalive, `r` standby status update) is parsed and built here.
//!
//! # The streaming task
//!
//! The task owns the socket. It reads CopyData into one buffer with cancel-safe reads,
//! turns each message into a [`RawEvent`] and hands it to the consumer through a bounded
//! channel. A full channel stops the reads (TCP flow control then holds the server back),
//! never the standby status updates: one is written every 250 ms, at once when the
//! consumer confirms a new position, and at once when a
//! keepalive asks for a reply, however slow the consumer is, so `wal_sender_timeout`
//! never fires while a long transaction is being applied. The status update reports the
//! confirmed LSN (shared with the consumer through an atomic) as written, flushed and
//! applied.
//!
//! # Errors and secrets
//!
//! Failures are [`WireError`]s; `client.rs` words them for the operator. The password is
//! only ever handed to the authentication exchanges: no error, log line or `Debug` output
//! of this module contains it. Nothing here panics on input from the network: frame
//! lengths are checked (at least 4, at most [`MAX_FRAME`]) before anything is buffered
//! for them, and every field read is bounds-checked.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::ident::{quote_ident, quote_literal};
use crate::lsn::Lsn;

/// The largest backend message accepted, length field included: the server's own limit
/// for a message (1 GiB) plus room for the headers around it.
pub const MAX_FRAME: usize = (1 << 30) + 64 * 1024;

/// How often a standby status update is sent while streaming.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// How many events may wait for the consumer before the task stops reading, on TCP (16 Ki:
/// about 2700 pgbench transactions, of six messages each).
///
/// Enough for the consumer to read a whole group ahead while the target runs the one
/// before: with 1024, the stream stopped a few hundred transactions ahead, and the daemon
/// sat idle while the target ran a group.
///
/// Not much more, though: events held here only let the server decode further ahead of
/// the target. Where the walsender, the daemon and the target share CPUs, the target then
/// ends alone after the stream has: with 64 Ki, the last 0.4-0.5 s of a 2 s catch-up ran
/// on one of the machine's two CPUs, and with 16 Ki the median catch-up rate rose 12% and
/// 6% in two runs (faster in 7 of 8 pairs; 8 Ki was no better than 16 Ki). What is left
/// of that last stretch, 0.25-0.35 s, is mostly what the two TCP socket buffers hold
/// (several MB), which this capacity does not bound. See docs/benchmarks.md, sessions 13
/// and 14. A unix socket keeps [`SOCKET_CHANNEL_CAPACITY`].
///
/// On TCP, a task that reads every message as it arrives makes the server send a segment
/// per message, which costs both sides far more than large segments. There the reads are
/// spaced by [`READ_INTERVAL`] (measured with 64 Ki and no interval: a catch-up cost the
/// daemon 18.8 ms of CPU per 1000 transactions and 530 context switches; with the interval
/// 9-12 ms and 50-90).
pub const CHANNEL_CAPACITY: usize = 16 * 1024;

/// [`CHANNEL_CAPACITY`] on a unix socket. The socket holds only a few hundred small
/// messages, so the server blocks whenever the task stops reading: a mapped job took 1.72×
/// native apply's time with 1024 events, 1.10× with 64 Ki. There the daemon, not the
/// target, is the slower side. 16 Ki measured slower in 3 of 3 pairs (session 13), but
/// on this path that bench run's first cutover build was slower than its second in
/// every pair of three runs, whichever build it was; so 64 Ki, as measured before,
/// stays.
pub const SOCKET_CHANNEL_CAPACITY: usize = 64 * 1024;

/// How many bytes of events may wait for the consumer before the task stops reading.
/// With the event count this bounds the memory between the socket and the consumer,
/// however large the rows.
pub const BUFFER_BYTES: usize = 32 * 1024 * 1024;

/// What an event counts against [`BUFFER_BYTES`]: its payload and its own size.
fn event_cost(event: &RawEvent, budget: usize) -> u32 {
    let payload = match event {
        RawEvent::XLogData { data, .. } => data.len(),
        RawEvent::KeepAlive { .. } => 0,
    };
    let cost = (payload + std::mem::size_of::<Item>()).min(budget.max(1));
    u32::try_from(cost).unwrap_or(u32::MAX)
}

/// Events handed to the consumer at once, at most: fewer hand-overs (and wake-ups of the
/// consumer) than one per message.
const MAX_BATCH: usize = 256;

/// Events read at once, waiting to be handed over, with what they cost.
struct Batch {
    events: Vec<RawEvent>,
    /// Of [`StreamConfig::buffer_bytes`] (at most all of it).
    bytes: u32,
    /// Of [`StreamConfig::capacity`].
    slots: u32,
}

/// The room a batch takes in the buffer: given back when dropped.
struct Room {
    _bytes: OwnedSemaphorePermit,
    _slots: OwnedSemaphorePermit,
}

impl Batch {
    fn try_room(&self, budget: &Arc<Semaphore>, slots: &Arc<Semaphore>) -> Option<Room> {
        let bytes = Arc::clone(budget).try_acquire_many_owned(self.bytes).ok()?;
        let slots = Arc::clone(slots).try_acquire_many_owned(self.slots).ok()?;
        Some(Room {
            _bytes: bytes,
            _slots: slots,
        })
    }

    async fn room(
        &self,
        budget: Arc<Semaphore>,
        slots: Arc<Semaphore>,
    ) -> Result<Room, tokio::sync::AcquireError> {
        let bytes = budget.acquire_many_owned(self.bytes).await?;
        let slots = slots.acquire_many_owned(self.slots).await?;
        Ok(Room {
            _bytes: bytes,
            _slots: slots,
        })
    }
}

/// A message read while streaming, for the consumer or not.
enum Incoming {
    Event(RawEvent),
    /// A keepalive, and whether the server asks for a reply.
    KeepAlive(RawEvent, bool),
    Nothing,
    /// The server ended the stream (CopyDone).
    Done,
}

/// How long the task waits for the server's side of the CopyBoth close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Read at least this much at a time.
const READ_CHUNK: usize = 64 * 1024;

/// At most this much read from the socket in one go, with a read interval (then parsed and
/// handed over before reading on).
const READ_BURST: usize = 4 * 1024 * 1024;

/// On TCP, the least time between two reads while data keeps coming
/// ([`StreamConfig::read_interval`]). In between, the server's sends pile up in the
/// socket's buffers and leave as large segments. Measured on a pgbench backlog of 55 k
/// transactions (docs/benchmarks.md, session 10): 22-29 k segments when reading at once,
/// 3-14 k with 20 ms; a 5 ms interval was too short to gather anything (the server sent
/// 166 k segments for 43 k transactions with 2 ms). Not on a unix socket, which holds only
/// a few hundred small messages: there a catch-up ran at 2.1 k txns/s with 20 ms, and
/// 6.7-6.9 k with 5 ms, against 21-30 k without.
pub const READ_INTERVAL: Duration = Duration::from_millis(20);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A failure on the replication connection.
#[derive(Debug)]
pub enum WireError {
    /// The socket failed (connect, read or write).
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    /// The server answered with an ErrorResponse.
    Server(ServerError),
    /// Authentication cannot go on on our side: a method we do not support, no password,
    /// or a SCRAM exchange that does not verify.
    Auth(String),
    /// The server sent something malformed or unexpected.
    Protocol(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Closed => f.write_str("the server closed the connection"),
            WireError::Server(e) => f.write_str(&e.message),
            WireError::Auth(m) => f.write_str(m),
            WireError::Protocol(m) => write!(f, "protocol violation: {m}"),
        }
    }
}

impl std::error::Error for WireError {}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

/// The fields of an ErrorResponse (or NoticeResponse) that we keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// `S` (localized) or `V` (never localized, PostgreSQL 9.6+).
    pub severity: String,
    /// `C`: the SQLSTATE, empty when missing.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
    /// `D`.
    pub detail: Option<String>,
    /// `H`.
    pub hint: Option<String>,
}

impl ServerError {
    fn from_fields(mut fields: ErrorFields<'_>) -> Self {
        let mut out = ServerError::default();
        // A malformed field list keeps what was read before the fault.
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => out.severity = value,
                b'S' if out.severity.is_empty() => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                b'D' => out.detail = Some(value),
                b'H' => out.hint = Some(value),
                _ => {}
            }
        }
        if out.message.is_empty() {
            out.message = if out.code.is_empty() {
                "unknown server error".to_string()
            } else {
                format!("server error {}", out.code)
            };
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

/// One backend message.
enum Backend {
    /// A message `postgres-protocol` parses.
    Message(Message),
    /// `W`: CopyBothResponse (its column formats do not matter to us).
    CopyBoth,
    /// A message of another type (`v` NegotiateProtocolVersion, for one).
    Other(u8),
}

/// The total size (type byte included) of the message at the start of `buf`, once its
/// header is there. Checks the length field.
fn frame_size(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(WireError::Protocol(format!(
            "message of type {} has an invalid length {len}",
            tag_name(buf[0])
        )));
    }
    if len > MAX_FRAME {
        return Err(WireError::Protocol(format!(
            "message of type {} announces {len} bytes, more than the limit of {MAX_FRAME}",
            tag_name(buf[0])
        )));
    }
    Ok(Some(len + 1))
}

/// A message type byte, printable.
fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// The authentication request codes `postgres-protocol` knows.
const KNOWN_AUTH_CODES: [i32; 11] = [0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12];

/// Take the next complete message off `buf`; `None` until one has fully arrived (the
/// buffer keeps what it has).
fn take_message(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    let Some(size) = frame_size(buf)? else {
        return Ok(None);
    };
    if buf.len() < size {
        return Ok(None);
    }
    match buf[0] {
        b'W' => {
            buf.advance(size);
            Ok(Some(Backend::CopyBoth))
        }
        b'R' => {
            if size < 9 {
                return Err(WireError::Protocol(
                    "authentication request without a code".into(),
                ));
            }
            let code = i32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
            if !KNOWN_AUTH_CODES.contains(&code) {
                return Err(WireError::Auth(format!(
                    "the server asks for an authentication method cutover does not know (request code {code})"
                )));
            }
            parse_known(buf)
        }
        b'1' | b'2' | b'3' | b'A' | b'c' | b'C' | b'd' | b'D' | b'E' | b'G' | b'H' | b'I'
        | b'K' | b'n' | b'N' | b's' | b'S' | b't' | b'T' | b'Z' => parse_known(buf),
        tag => {
            buf.advance(size);
            Ok(Some(Backend::Other(tag)))
        }
    }
}

fn parse_known(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    let tag = buf[0];
    match Message::parse(buf) {
        Ok(Some(m)) => Ok(Some(Backend::Message(m))),
        // Not reached: the whole frame is there.
        Ok(None) => Err(WireError::Protocol(format!(
            "incomplete message of type {}",
            tag_name(tag)
        ))),
        Err(e) => Err(WireError::Protocol(format!(
            "malformed message of type {}: {e}",
            tag_name(tag)
        ))),
    }
}

/// Make room for the next read: the rest of a message whose header has arrived, and at
/// least [`READ_CHUNK`] otherwise.
fn reserve_for_read(buf: &mut BytesMut) {
    let rest = match frame_size(buf) {
        Ok(Some(size)) => size.saturating_sub(buf.len()),
        _ => 0,
    };
    let want = rest.max(READ_CHUNK);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

// ---------------------------------------------------------------------------------------
// The replication sub-protocol (inside CopyData)
// ---------------------------------------------------------------------------------------

/// A message the server sends inside CopyData while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: WAL data (for a logical slot, one pgoutput message).
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// `k`: primary keepalive.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// Parse the payload of a CopyData message from the server.
pub fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, WireError> {
    let Some(&kind) = payload.first() else {
        return Err(WireError::Protocol(
            "empty CopyData message in the replication stream".into(),
        ));
    };
    match kind {
        b'w' => {
            if payload.len() < 25 {
                return Err(WireError::Protocol(format!(
                    "XLogData message of {} bytes, shorter than its 25-byte header",
                    payload.len()
                )));
            }
            let mut h = &payload[1..25];
            let wal_start = Lsn(h.get_u64());
            let wal_end = Lsn(h.get_u64());
            let send_time = h.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: payload.slice(25..),
            })
        }
        b'k' => {
            if payload.len() != 18 {
                return Err(WireError::Protocol(format!(
                    "primary keepalive message of {} bytes, not 18",
                    payload.len()
                )));
            }
            let mut h = &payload[1..18];
            let wal_end = Lsn(h.get_u64());
            let send_time = h.get_i64();
            let reply_requested = h.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(WireError::Protocol(format!(
            "unknown message type {} in the replication stream",
            tag_name(other)
        ))),
    }
}

/// Append a standby status update (`r`, in CopyData) reporting `lsn` as written, flushed
/// and applied, at `now` (microseconds since 2000-01-01), asking for no reply.
pub fn encode_status_update(lsn: Lsn, now: i64, out: &mut BytesMut) -> io::Result<()> {
    let mut body = [0u8; 34];
    body[0] = b'r';
    body[1..9].copy_from_slice(&lsn.0.to_be_bytes());
    body[9..17].copy_from_slice(&lsn.0.to_be_bytes());
    body[17..25].copy_from_slice(&lsn.0.to_be_bytes());
    body[25..33].copy_from_slice(&now.to_be_bytes());
    body[33] = 0;
    frontend::CopyData::new(&body[..])?.write(out);
    Ok(())
}

/// The current time as PostgreSQL counts it in the replication protocol: microseconds
/// since 2000-01-01 00:00:00 UTC.
pub fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y (proto_version 'n', publication_names
/// '"publication"'[, streaming 'on'])`. The publication is quoted as an identifier (so
/// any name survives the server's split of the list) inside a string literal.
pub fn start_replication_command(
    slot: &str,
    start: Lsn,
    proto_version: u32,
    publication: &str,
    streaming: bool,
) -> String {
    let mut options = format!(
        "proto_version '{proto_version}', publication_names {}",
        quote_literal(&quote_ident(publication))
    );
    if streaming {
        options.push_str(", streaming 'on'");
    }
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
        quote_ident(slot)
    )
}

/// `server_version` as a number like `server_version_num`: "15.18 (Debian ...)" is
/// 150018, "16beta1" 160000, "9.6.3" 90603.
pub fn parse_server_version(text: &str) -> Option<u32> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let mut parts = text[..end].split('.');
    let mut next = || -> Option<u32> {
        match parts.next() {
            Some(p) if !p.is_empty() => p.parse().ok(),
            _ => None,
        }
    };
    let major = next()?;
    if major >= 10 {
        let minor = next().unwrap_or(0);
        major.checked_mul(10_000)?.checked_add(minor.min(9_999))
    } else {
        let minor = next().unwrap_or(0);
        let patch = next().unwrap_or(0);
        Some(major * 10_000 + minor.min(99) * 100 + patch.min(99))
    }
}

// ---------------------------------------------------------------------------------------
// The session before streaming
// ---------------------------------------------------------------------------------------

/// A socket we can speak the protocol on.
pub trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// Open the socket: `{host}/.s.PGSQL.{port}` when `host` is a directory (starts with
/// `/`), else TCP (with Nagle off: status updates are small and must leave at once).
pub async fn open_socket(host: &str, port: u16) -> Result<Box<dyn Socket>, WireError> {
    if is_socket_dir(host) {
        #[cfg(unix)]
        {
            let path = format!("{}/.s.PGSQL.{port}", host.trim_end_matches('/'));
            let s = tokio::net::UnixStream::connect(&path).await?;
            return Ok(Box::new(s));
        }
        #[cfg(not(unix))]
        {
            return Err(WireError::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                "unix sockets are not supported on this platform",
            )));
        }
    }
    let s = tokio::net::TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// Whether `host` names a directory holding unix sockets rather than a TCP host.
fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// What the startup message carries. Deliberately without `Debug`: it holds the password.
pub struct Startup<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    /// The `options` startup parameter (`-c name=value ...`).
    pub options: &'a str,
    pub password: Option<&'a str>,
    /// A replication session (`replication=database`), or an ordinary one.
    pub replication: bool,
}

/// Open a session to the server `params` names: the socket, the startup with our pinned
/// session settings ([`crate::pg_conn::session_options`]) and the authentication. A
/// replication session (`replication=database`), or an ordinary one.
pub async fn connect(
    params: &cutover_config::ConnParams,
    application_name: &str,
    replication: bool,
) -> Result<Connection, WireError> {
    let io = open_socket(&params.host, params.port).await?;
    let options = crate::pg_conn::session_options(params);
    let startup = Startup {
        user: &params.user,
        database: &params.dbname,
        application_name,
        options: &options,
        password: params.password.as_ref().map(|p| p.expose()),
        replication,
    };
    Connection::startup(io, &startup).await
}

/// An authenticated session that is not streaming: it runs commands. A replication
/// session streams with [`Connection::start_replication`]; an ordinary one can relay a
/// COPY to another ([`relay_copy`]).
pub struct Connection {
    io: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    parameters: Vec<(String, String)>,
    /// A command was interrupted (its future dropped): what the server says next is no
    /// longer known, so the session takes no more commands.
    interrupted: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("server_version", &self.parameter("server_version"))
            .finish_non_exhaustive()
    }
}

/// A row of a simple query's result, in text format.
pub type Row = Vec<Option<Bytes>>;

impl Connection {
    /// Send the startup message on `io` and authenticate; returns when the server is
    /// ready for a command.
    pub async fn startup(io: Box<dyn Socket>, startup: &Startup<'_>) -> Result<Self, WireError> {
        let mut conn = Connection {
            io,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            parameters: Vec::new(),
            interrupted: false,
        };
        let params = [
            ("user", startup.user),
            ("database", startup.database),
            ("application_name", startup.application_name),
            ("options", startup.options),
            ("client_encoding", "UTF8"),
        ];
        let replication = startup.replication.then_some(("replication", "database"));
        frontend::startup_message(params.iter().copied().chain(replication), &mut conn.wbuf)?;
        conn.flush().await?;
        conn.authenticate(startup).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, startup: &Startup<'_>) -> Result<(), WireError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.read().await?;
            match msg {
                Backend::Message(Message::AuthenticationOk) => {}
                Backend::Message(Message::AuthenticationCleartextPassword) => {
                    let password = need_password(startup, "cleartext password")?;
                    frontend::password_message(password.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Backend::Message(Message::AuthenticationMd5Password(body)) => {
                    let password = need_password(startup, "MD5 password")?;
                    let hash = md5_hash(startup.user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Backend::Message(Message::AuthenticationSasl(body)) => {
                    let mut offered = Vec::new();
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(|e| {
                        WireError::Protocol(format!("malformed SASL mechanism list: {e}"))
                    })? {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                        return Err(WireError::Auth(format!(
                            "the server asks for SASL authentication with {}, and cutover supports only {} (without channel binding)",
                            offered.join(", "),
                            sasl::SCRAM_SHA_256
                        )));
                    }
                    let password = need_password(startup, "SCRAM-SHA-256")?;
                    let client =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        client.message(),
                        &mut self.wbuf,
                    )?;
                    self.flush().await?;
                    scram = Some(client);
                }
                Backend::Message(Message::AuthenticationSaslContinue(body)) => {
                    let client = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL continuation without a SASL exchange".into())
                    })?;
                    client.update(body.data()).map_err(|e| {
                        WireError::Auth(format!("SCRAM-SHA-256 authentication failed: {e}"))
                    })?;
                    frontend::sasl_response(client.message(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Backend::Message(Message::AuthenticationSaslFinal(body)) => {
                    let client = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL completion without a SASL exchange".into())
                    })?;
                    client.finish(body.data()).map_err(|e| {
                        WireError::Auth(format!(
                            "SCRAM-SHA-256 authentication failed: the server's proof does not verify ({e})"
                        ))
                    })?;
                }
                Backend::Message(Message::AuthenticationKerberosV5) => {
                    return Err(unsupported_method("Kerberos V5"));
                }
                Backend::Message(Message::AuthenticationScmCredential) => {
                    return Err(unsupported_method("SCM credential"));
                }
                Backend::Message(
                    Message::AuthenticationGss | Message::AuthenticationGssContinue(_),
                ) => return Err(unsupported_method("GSSAPI")),
                Backend::Message(Message::AuthenticationSspi) => {
                    return Err(unsupported_method("SSPI"));
                }
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
                // NegotiateProtocolVersion: we asked for 3.0 and no extensions, so
                // nothing in it concerns us.
                Backend::Other(b'v') => {}
                other => self.common(other, "the startup")?,
            }
        }
    }

    /// The value of a parameter the server reported (ParameterStatus).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Run one command with the simple query protocol; its rows in text format. A server
    /// error leaves the session usable (the error is returned once the server is ready
    /// again).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        self.send_query(sql).await?;
        Ok(self.read_results("a command").await?.0)
    }

    /// Send `sql` (a `COPY ... TO STDOUT` or `COPY ... FROM STDIN`) and wait until the
    /// server has switched to copy-out (`out`) or copy-in mode. A server error (the
    /// command failed) leaves the session usable.
    pub async fn start_copy(&mut self, sql: &str, out: bool) -> Result<(), WireError> {
        // The session counts as interrupted until the copy has ended and the server is
        // ready again (see `relay_copy`).
        self.send_query(sql).await?;
        let mut error = None;
        loop {
            match self.read().await? {
                Backend::Message(Message::CopyOutResponse(_)) if out && error.is_none() => {
                    return Ok(());
                }
                Backend::Message(Message::CopyInResponse(_)) if !out && error.is_none() => {
                    return Ok(());
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(ServerError::from_fields(body.fields()));
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.interrupted = false;
                    return Err(match error {
                        Some(e) => WireError::Server(e),
                        None => WireError::Protocol("the server did not start a COPY".into()),
                    });
                }
                other => self.common(other, "the start of a COPY")?,
            }
        }
    }

    /// Send `sql` as a simple Query. The session counts as interrupted until the server is
    /// ready again: a command whose future is dropped halfway leaves it unusable.
    async fn send_query(&mut self, sql: &str) -> Result<(), WireError> {
        if self.interrupted {
            return Err(WireError::Protocol(
                "the session was interrupted in the middle of an earlier command".into(),
            ));
        }
        self.interrupted = true;
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await
    }

    /// Read up to the end of the current command (ReadyForQuery): the rows (in text format)
    /// and the last CommandComplete's tag. A server error on the way is returned once the
    /// server is ready again, so the session stays usable.
    async fn read_results(&mut self, during: &str) -> Result<(Vec<Row>, String), WireError> {
        let mut rows = Vec::new();
        let mut tag = String::new();
        let mut error = None;
        loop {
            match self.read().await? {
                Backend::Message(Message::RowDescription(_) | Message::EmptyQueryResponse) => {}
                Backend::Message(Message::DataRow(body)) => {
                    let storage = body.buffer_bytes().clone();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges
                        .next()
                        .map_err(|e| WireError::Protocol(format!("malformed data row: {e}")))?
                    {
                        row.push(range.map(|r| storage.slice(r)));
                    }
                    rows.push(row);
                }
                Backend::Message(Message::CommandComplete(body)) => {
                    tag = body.tag().unwrap_or_default().to_string();
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(ServerError::from_fields(body.fields()));
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.interrupted = false;
                    return match error {
                        Some(e) => Err(WireError::Server(e)),
                        None => Ok((rows, tag)),
                    };
                }
                other => self.common(other, during)?,
            }
        }
    }

    /// Send `command` (`START_REPLICATION ...`) and, once the server answers with
    /// CopyBothResponse, hand the socket to a streaming task. `confirmed` is what the
    /// status updates report until [`Stream::confirm`] raises it.
    pub async fn start_replication(
        mut self,
        command: &str,
        confirmed: Lsn,
        config: StreamConfig,
    ) -> Result<Stream, WireError> {
        if self.interrupted {
            return Err(WireError::Protocol(
                "the session was interrupted in the middle of an earlier command".into(),
            ));
        }
        frontend::query(command, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.read().await? {
                Backend::CopyBoth => break,
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(WireError::Server(ServerError::from_fields(body.fields())));
                }
                other => self.common(other, "START_REPLICATION")?,
            }
        }
        Ok(Stream::spawn(self.io, self.rbuf, confirmed, config))
    }

    /// Messages that may come at any time; anything else is a protocol violation.
    fn common(&mut self, msg: Backend, during: &str) -> Result<(), WireError> {
        match msg {
            Backend::Message(Message::ParameterStatus(body)) => {
                let (Ok(name), Ok(value)) = (body.name(), body.value()) else {
                    return Err(WireError::Protocol("malformed ParameterStatus".into()));
                };
                self.parameters.push((name.to_string(), value.to_string()));
                Ok(())
            }
            Backend::Message(Message::BackendKeyData(_)) => Ok(()),
            Backend::Message(Message::NoticeResponse(body)) => {
                log_notice(body.fields());
                Ok(())
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                Err(WireError::Server(ServerError::from_fields(body.fields())))
            }
            Backend::Message(m) => Err(WireError::Protocol(format!(
                "unexpected message of type {} during {during}",
                message_tag(&m)
            ))),
            Backend::CopyBoth => Err(WireError::Protocol(format!(
                "unexpected CopyBothResponse during {during}"
            ))),
            Backend::Other(tag) => Err(WireError::Protocol(format!(
                "unexpected message of type {} during {during}",
                tag_name(tag)
            ))),
        }
    }

    async fn read(&mut self) -> Result<Backend, WireError> {
        loop {
            if let Some(msg) = take_message(&mut self.rbuf)? {
                return Ok(msg);
            }
            reserve_for_read(&mut self.rbuf);
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.io.flush().await?;
        Ok(())
    }
}

/// Which end of a [`relay_copy`] failed.
#[derive(Debug)]
pub enum RelayError {
    Source(WireError),
    Target(WireError),
}

/// What the relay reads from the source at once, at least.
const RELAY_READ: usize = 256 * 1024;

/// The size of the CopyData messages the relay sends to the target (the server reads its
/// COPY data in pieces of 64 KiB).
const RELAY_PIECE: usize = 64 * 1024;

/// Relay a COPY from `source` (in copy-out mode, see [`Connection::start_copy`]) to
/// `target` (in copy-in mode) until the source's data ends, then end the target's COPY.
/// Returns the rows the target counted.
///
/// The rows are not parsed: the source sends a CopyData message per row, and their
/// contents go, joined into messages of [`RELAY_PIECE`], to the target (which takes COPY
/// data cut anywhere, and pays per message). Only the source messages' headers are read,
/// to find where the data ends and to count rows and bytes for `progress` (called for
/// every message sent).
///
/// An error on either end leaves both sessions unusable (they are dropped with their
/// transactions); the caller starts over on fresh ones.
pub async fn relay_copy(
    source: &mut Connection,
    target: &mut Connection,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<u64, RelayError> {
    use RelayError::{Source, Target};
    let (mut rows, mut bytes) = (0u64, 0u64);
    // The message being filled: 'd', its length (set when it is sent), the data.
    let mut piece = BytesMut::with_capacity(RELAY_PIECE + RELAY_PIECE / 2);
    piece.extend_from_slice(&[b'd', 0, 0, 0, 0]);
    loop {
        let mut next_is_data = true;
        let mut at = 0;
        while let Some(size) = frame_size(&source.rbuf[at..]).map_err(Source)? {
            if source.rbuf[at] != b'd' {
                next_is_data = false;
                break;
            }
            if source.rbuf.len() - at < size {
                break;
            }
            if size - 5 >= RELAY_PIECE {
                // A large row goes as the message it came in, not copied into a piece.
                if piece.len() > 5 {
                    send_piece(target, &mut piece).await.map_err(Target)?;
                }
                target
                    .io
                    .write_all(&source.rbuf[at..at + size])
                    .await
                    .map_err(|e| Target(e.into()))?;
            } else {
                piece.extend_from_slice(&source.rbuf[at + 5..at + size]);
            }
            at += size;
            rows += 1;
            bytes += (size - 5) as u64;
            if piece.len() >= RELAY_PIECE {
                send_piece(target, &mut piece).await.map_err(Target)?;
                progress(std::mem::take(&mut rows), std::mem::take(&mut bytes));
            }
        }
        source.rbuf.advance(at);
        if !next_is_data {
            match take_message(&mut source.rbuf).map_err(Source)? {
                Some(Backend::Message(Message::CopyDone)) => break,
                Some(other) => {
                    source.common(other, "a COPY").map_err(Source)?;
                    continue;
                }
                // Not all there yet: read on.
                None => {}
            }
        }
        if source.rbuf.capacity() - source.rbuf.len() < RELAY_READ {
            let rest = frame_size(&source.rbuf)
                .ok()
                .flatten()
                .map_or(0, |size| size.saturating_sub(source.rbuf.len()));
            source.rbuf.reserve(rest.max(RELAY_READ));
        }
        if source
            .io
            .read_buf(&mut source.rbuf)
            .await
            .map_err(|e| Source(e.into()))?
            == 0
        {
            return Err(Source(WireError::Closed));
        }
    }
    if piece.len() > 5 {
        send_piece(target, &mut piece).await.map_err(Target)?;
    }
    progress(rows, bytes);
    source
        .read_results("the end of a COPY")
        .await
        .map_err(Source)?;
    frontend::copy_done(&mut target.wbuf);
    target.flush().await.map_err(Target)?;
    let (_, tag) = target
        .read_results("the end of a COPY")
        .await
        .map_err(Target)?;
    tag.strip_prefix("COPY ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            Target(WireError::Protocol(format!(
                "the server ended the COPY with \"{tag}\" instead of COPY and a row count"
            )))
        })
}

/// Send the CopyData message `piece` holds to `target`, and start the next one. A target
/// that failed (a constraint, a type) says so at once and drops the rest: its error is
/// looked for, without waiting, after every message.
async fn send_piece(target: &mut Connection, piece: &mut BytesMut) -> Result<(), WireError> {
    let len = u32::try_from(piece.len() - 1)
        .map_err(|_| WireError::Protocol("a COPY piece larger than 4 GiB".into()))?;
    piece[1..5].copy_from_slice(&len.to_be_bytes());
    target.io.write_all(piece).await?;
    piece.truncate(5);
    target.rbuf.reserve(1024);
    if let Some(read) = futures_util::FutureExt::now_or_never(target.io.read_buf(&mut target.rbuf))
        && read? == 0
    {
        return Err(WireError::Closed);
    }
    // What has arrived, now or with the server's answer to the COPY.
    while let Some(msg) = take_message(&mut target.rbuf)? {
        match msg {
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(WireError::Server(ServerError::from_fields(body.fields())));
            }
            other => target.common(other, "a COPY")?,
        }
    }
    Ok(())
}

fn need_password<'a>(startup: &Startup<'a>, method: &str) -> Result<&'a str, WireError> {
    startup.password.ok_or_else(|| {
        WireError::Auth(format!(
            "the server asks for {method} authentication, and no password was given"
        ))
    })
}

fn unsupported_method(method: &str) -> WireError {
    WireError::Auth(format!(
        "the server asks for {method} authentication, which cutover does not support"
    ))
}

fn log_notice(fields: ErrorFields<'_>) {
    let n = ServerError::from_fields(fields);
    tracing::debug!(
        severity = %n.severity,
        code = %n.code,
        detail = n.detail.as_deref().unwrap_or(""),
        "replication connection notice: {}",
        n.message
    );
}

/// The type byte of a parsed message, for errors.
fn message_tag(m: &Message) -> String {
    let tag = match m {
        Message::ParseComplete => b'1',
        Message::BindComplete => b'2',
        Message::CloseComplete => b'3',
        Message::NotificationResponse(_) => b'A',
        Message::CopyDone => b'c',
        Message::CommandComplete(_) => b'C',
        Message::CopyData(_) => b'd',
        Message::DataRow(_) => b'D',
        Message::ErrorResponse(_) => b'E',
        Message::CopyInResponse(_) => b'G',
        Message::CopyOutResponse(_) => b'H',
        Message::EmptyQueryResponse => b'I',
        Message::BackendKeyData(_) => b'K',
        Message::NoData => b'n',
        Message::NoticeResponse(_) => b'N',
        Message::PortalSuspended => b's',
        Message::ParameterStatus(_) => b'S',
        Message::ParameterDescription(_) => b't',
        Message::RowDescription(_) => b'T',
        Message::ReadyForQuery(_) => b'Z',
        _ => b'R',
    };
    tag_name(tag)
}

// ---------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------

/// What the stream hands the consumer, in the order the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    /// An XLogData message: for a logical slot, one pgoutput message in `data`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// A primary keepalive: the server is alive and has sent everything up to `wal_end`.
    KeepAlive { wal_end: Lsn },
}

/// Tuning of the streaming task.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    /// Events that may wait for the consumer.
    pub capacity: usize,
    /// Bytes of events that may wait for the consumer (an event larger than this waits
    /// alone).
    pub buffer_bytes: usize,
    /// Time between standby status updates.
    pub status_interval: Duration,
    /// Least time between two reads of the socket while data keeps coming (zero: read
    /// each message as it arrives). Data arriving after a quiet period is read at once.
    pub read_interval: Duration,
}

impl StreamConfig {
    /// The tuning for the socket [`open_socket`] opens to `host`: a unix socket or TCP.
    pub fn for_host(host: &str) -> Self {
        if is_socket_dir(host) {
            Self {
                capacity: SOCKET_CHANNEL_CAPACITY,
                read_interval: Duration::ZERO,
                ..Self::default()
            }
        } else {
            Self::default()
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            capacity: CHANNEL_CAPACITY,
            buffer_bytes: BUFFER_BYTES,
            status_interval: STATUS_INTERVAL,
            read_interval: READ_INTERVAL,
        }
    }
}

/// Positions shared by the task and the consumer.
#[derive(Debug, Default)]
struct Shared {
    /// What the consumer confirmed (monotonic).
    confirmed: AtomicU64,
    /// Signalled when `confirmed` moves: the task tells the server at once.
    moved: tokio::sync::Notify,
    /// The LSN in the last status update written to the socket.
    sent: AtomicU64,
    /// The highest WAL end the server reported.
    wal_end: AtomicU64,
}

enum Item {
    /// Events in arrival order (at most [`MAX_BATCH`]), and the room they take in the
    /// buffer, given back when the consumer has taken the last of them.
    Events(Vec<RawEvent>, Room),
    /// The server ended the stream (CopyDone).
    End,
    Failed(WireError),
}

/// A started stream: the consumer's side of the streaming task. Dropping it stops the
/// task and closes the socket.
pub struct Stream {
    rx: mpsc::Receiver<Item>,
    /// The rest of the batch being taken, and its bytes.
    batch: std::vec::IntoIter<RawEvent>,
    held: Option<Room>,
    shared: Arc<Shared>,
    stop: mpsc::Sender<Duration>,
    task: Option<JoinHandle<()>>,
    ended: bool,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("confirmed", &self.confirmed())
            .field("sent", &self.sent())
            .field("wal_end", &self.wal_end())
            .finish_non_exhaustive()
    }
}

impl Stream {
    fn spawn(io: Box<dyn Socket>, rbuf: BytesMut, confirmed: Lsn, config: StreamConfig) -> Self {
        let shared = Arc::new(Shared::default());
        shared.confirmed.store(confirmed.0, Ordering::Release);
        let capacity = config.capacity.clamp(1, Semaphore::MAX_PERMITS);
        // Every batch holds at least one event: the slots bound the channel.
        let (tx, rx) = mpsc::channel(capacity);
        let buffer_bytes = config
            .buffer_bytes
            .clamp(1, u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let (reader, writer) = tokio::io::split(io);
        let worker = Worker {
            reader,
            writer,
            rbuf,
            wbuf: BytesMut::with_capacity(64),
            shared: Arc::clone(&shared),
            tx,
            budget: Arc::new(Semaphore::new(buffer_bytes)),
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            buffer_bytes,
            stop: stop_rx,
            status_interval: config.status_interval,
            read_interval: config.read_interval,
            next_read: None,
        };
        let task = tokio::spawn(worker.run());
        Stream {
            rx,
            batch: Vec::new().into_iter(),
            held: None,
            shared,
            stop: stop_tx,
            task: Some(task),
            ended: false,
        }
    }

    /// The next event; `None` once the server ended the stream (CopyDone). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<RawEvent>, WireError> {
        loop {
            if let Some(event) = self.batch.next() {
                return Ok(Some(event));
            }
            // The batch's bytes return to the budget here, as it leaves the buffer.
            self.held = None;
            if self.ended {
                return Ok(None);
            }
            match self.rx.recv().await {
                Some(Item::Events(events, bytes)) => {
                    self.batch = events.into_iter();
                    self.held = Some(bytes);
                }
                Some(Item::End) => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Item::Failed(e)) => return Err(e),
                None => return Err(WireError::Closed),
            }
        }
    }

    /// Whether every event read so far has been handed out (the consumer is ahead).
    pub fn drained(&self) -> bool {
        self.batch.len() == 0 && self.rx.is_empty()
    }

    /// Raise the confirmed LSN (never lowers it).
    pub fn confirm(&self, lsn: Lsn) {
        if self.shared.confirmed.fetch_max(lsn.0, Ordering::AcqRel) < lsn.0 {
            self.shared.moved.notify_one();
        }
    }

    /// The confirmed LSN.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.shared.confirmed.load(Ordering::Acquire))
    }

    /// The LSN in the last status update written to the socket.
    pub fn sent(&self) -> Lsn {
        Lsn(self.shared.sent.load(Ordering::Acquire))
    }

    /// The highest WAL end the server reported.
    pub fn wal_end(&self) -> Lsn {
        Lsn(self.shared.wal_end.load(Ordering::Acquire))
    }

    /// End the stream: the task sends a last status update (waiting for it at most
    /// `grace`), CopyDone, waits briefly for the server's answer, and closes.
    pub async fn shutdown(mut self, grace: Duration) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        if task.is_finished() {
            return;
        }
        if self.stop.try_send(grace).is_err() {
            task.abort();
            return;
        }
        let limit = grace + CLOSE_WAIT + Duration::from_secs(1);
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            task.abort();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How the streaming loop ended without an error.
enum Ended {
    /// The server sent CopyDone.
    ServerDone,
    /// The consumer asked to stop (with this grace for the last status update), or went
    /// away.
    Stop(Duration),
}

struct Worker {
    reader: ReadHalf<Box<dyn Socket>>,
    writer: WriteHalf<Box<dyn Socket>>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Item>,
    /// Bytes of events the consumer has not taken yet may use ([`BUFFER_BYTES`]).
    budget: Arc<Semaphore>,
    /// Events the consumer has not taken yet, at most [`StreamConfig::capacity`].
    slots: Arc<Semaphore>,
    capacity: usize,
    buffer_bytes: usize,
    stop: mpsc::Receiver<Duration>,
    status_interval: Duration,
    read_interval: Duration,
    /// Set when a read left the socket empty: no read before this.
    next_read: Option<tokio::time::Instant>,
}

impl Worker {
    async fn run(mut self) {
        match self.stream().await {
            Ok(Ended::Stop(grace)) => {
                self.close(grace, false).await;
            }
            Ok(Ended::ServerDone) => {
                self.close(Duration::ZERO, true).await;
                self.deliver(Item::End).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "replication stream failed");
                self.deliver(Item::Failed(e)).await;
            }
        }
    }

    /// Hand the consumer a last item, unless it asks to stop first.
    async fn deliver(&mut self, item: Item) {
        tokio::select! {
            _ = self.tx.send(item) => {}
            _ = self.stop.recv() => {}
        }
    }

    async fn stream(&mut self) -> Result<Ended, WireError> {
        let mut ticker = tokio::time::interval(self.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<Batch> = None;
        let shared = Arc::clone(&self.shared);
        // A handle of our own: a permit borrows it across the select's handlers.
        let tx = self.tx.clone();
        loop {
            // Hand over batches of buffered messages while the channel has room; stop at
            // the first one it has no room for (it waits in `pending`).
            let mut reply = false;
            loop {
                if let Some(batch) = pending.take() {
                    let Some(room) = batch.try_room(&self.budget, &self.slots) else {
                        pending = Some(batch);
                        break;
                    };
                    match tx.try_reserve() {
                        Ok(permit) => permit.send(Item::Events(batch.events, room)),
                        Err(mpsc::error::TrySendError::Full(())) => {
                            pending = Some(batch);
                            break;
                        }
                        // The consumer is gone.
                        Err(mpsc::error::TrySendError::Closed(())) => {
                            return Ok(Ended::Stop(Duration::ZERO));
                        }
                    }
                }
                let mut events = Vec::new();
                let mut cost = 0u64;
                let mut done = false;
                let most = MAX_BATCH.min(self.capacity);
                while events.len() < most && cost < self.buffer_bytes as u64 {
                    let Some(msg) = take_message(&mut self.rbuf)? else {
                        break;
                    };
                    let event = match self.replication_event(msg)? {
                        Incoming::Event(event) => event,
                        Incoming::KeepAlive(event, reply_requested) => {
                            reply |= reply_requested;
                            event
                        }
                        Incoming::Nothing => continue,
                        Incoming::Done => {
                            done = true;
                            break;
                        }
                    };
                    cost += u64::from(event_cost(&event, self.buffer_bytes));
                    events.push(event);
                }
                // A batch costs at most the whole budget, so it can always pass alone.
                let batch = Batch {
                    bytes: u32::try_from(cost.min(self.buffer_bytes as u64)).unwrap_or(u32::MAX),
                    slots: u32::try_from(events.len()).unwrap_or(u32::MAX),
                    events,
                };
                if done {
                    // What came before the end is handed over first.
                    if !batch.events.is_empty() {
                        let (budget, slots) = (Arc::clone(&self.budget), Arc::clone(&self.slots));
                        let hand_over = async {
                            if let Ok(room) = batch.room(budget, slots).await {
                                let _ = tx.send(Item::Events(batch.events, room)).await;
                            }
                        };
                        tokio::select! {
                            _ = hand_over => {}
                            grace = self.stop.recv() => {
                                return Ok(Ended::Stop(grace.unwrap_or(Duration::ZERO)));
                            }
                        }
                    }
                    return Ok(Ended::ServerDone);
                }
                if batch.events.is_empty() {
                    break;
                }
                pending = Some(batch);
            }
            if reply {
                self.send_status().await?;
            }
            if pending.is_none() {
                reserve_for_read(&mut self.rbuf);
            }
            let next_read = self.next_read.filter(|_| pending.is_none());
            let can_read = pending.is_none() && next_read.is_none();
            let (budget, slots) = (Arc::clone(&self.budget), Arc::clone(&self.slots));
            // Room for the waiting batch: its bytes and events, then a place in the channel
            // (the waits give back what they hold when the select drops them).
            let room = async {
                match &pending {
                    Some(batch) => (batch.room(budget, slots).await, tx.reserve().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                grace = self.stop.recv() => {
                    return Ok(Ended::Stop(grace.unwrap_or(Duration::ZERO)));
                }
                _ = ticker.tick() => self.send_status().await?,
                // As PostgreSQL's own apply worker does: the source learns at once what it
                // may release, and a caught-up job shows so on the slot without a delay.
                _ = shared.moved.notified() => {
                    if shared.confirmed.load(Ordering::Acquire) > shared.sent.load(Ordering::Acquire) {
                        self.send_status().await?;
                    }
                }
                room = room, if pending.is_some() => match (room, pending.take()) {
                    ((Ok(room), Ok(permit)), Some(batch)) => {
                        permit.send(Item::Events(batch.events, room));
                    }
                    // The consumer is gone (the budget is never closed).
                    ((_, Err(_)) | (Err(_), _), _) => return Ok(Ended::Stop(Duration::ZERO)),
                    (_, None) => {}
                },
                _ = tokio::time::sleep_until(next_read.unwrap_or_else(tokio::time::Instant::now)), if next_read.is_some() => {
                    self.next_read = None;
                }
                n = self.reader.read_buf(&mut self.rbuf), if can_read => {
                    if n? == 0 {
                        return Err(WireError::Closed);
                    }
                    self.read_more();
                }
            }
        }
    }

    /// After a read, with a read interval: read on what the socket holds, up to
    /// [`READ_BURST`]. Once it is empty, the next read waits for the interval, so the
    /// server's sends fill the socket's buffers and coalesce, where reading each message as
    /// it arrives costs the server a TCP segment per message.
    fn read_more(&mut self) {
        if self.read_interval.is_zero() {
            return;
        }
        while self.rbuf.len() < READ_BURST {
            reserve_for_read(&mut self.rbuf);
            match futures_util::FutureExt::now_or_never(self.reader.read_buf(&mut self.rbuf)) {
                Some(Ok(n)) if n > 0 => {}
                // The socket is empty: wait before the next read.
                None => {
                    self.next_read = Some(tokio::time::Instant::now() + self.read_interval);
                    return;
                }
                // The end of the stream or an error: the next read reports it, once what
                // was read before it (a CopyDone, say) is handed over.
                Some(_) => return,
            }
        }
    }

    /// What a message read while streaming means.
    fn replication_event(&self, msg: Backend) -> Result<Incoming, WireError> {
        match msg {
            Backend::Message(Message::CopyData(body)) => {
                match parse_copy_data(body.into_bytes())? {
                    ReplicationMessage::XLogData {
                        wal_start,
                        wal_end,
                        data,
                        ..
                    } => {
                        self.saw_wal_end(wal_end);
                        Ok(Incoming::Event(RawEvent::XLogData {
                            wal_start,
                            wal_end,
                            data,
                        }))
                    }
                    ReplicationMessage::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        self.saw_wal_end(wal_end);
                        Ok(Incoming::KeepAlive(
                            RawEvent::KeepAlive { wal_end },
                            reply_requested,
                        ))
                    }
                }
            }
            Backend::Message(Message::CopyDone) => Ok(Incoming::Done),
            Backend::Message(Message::ErrorResponse(body)) => {
                Err(WireError::Server(ServerError::from_fields(body.fields())))
            }
            Backend::Message(Message::NoticeResponse(body)) => {
                log_notice(body.fields());
                Ok(Incoming::Nothing)
            }
            Backend::Message(Message::ParameterStatus(_)) => Ok(Incoming::Nothing),
            Backend::Message(m) => Err(WireError::Protocol(format!(
                "unexpected message of type {} in the replication stream",
                message_tag(&m)
            ))),
            Backend::CopyBoth => Err(WireError::Protocol(
                "unexpected CopyBothResponse in the replication stream".into(),
            )),
            Backend::Other(tag) => Err(WireError::Protocol(format!(
                "unexpected message of type {} in the replication stream",
                tag_name(tag)
            ))),
        }
    }

    fn saw_wal_end(&self, wal_end: Lsn) {
        self.shared.wal_end.fetch_max(wal_end.0, Ordering::AcqRel);
    }

    /// Write a standby status update with the confirmed LSN.
    async fn send_status(&mut self) -> Result<(), WireError> {
        let lsn = self.shared.confirmed.load(Ordering::Acquire);
        self.wbuf.clear();
        encode_status_update(Lsn(lsn), pg_now_micros(), &mut self.wbuf)?;
        self.writer.write_all(&self.wbuf).await?;
        self.writer.flush().await?;
        self.shared.sent.fetch_max(lsn, Ordering::AcqRel);
        Ok(())
    }

    /// End CopyBoth on our side and close the connection: a last status update (within
    /// `grace`), CopyDone, the server's answer (at most [`CLOSE_WAIT`]), Terminate.
    async fn close(&mut self, grace: Duration, server_done: bool) {
        if !server_done {
            match tokio::time::timeout(grace.max(Duration::from_millis(100)), self.send_status())
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "could not send the last status update");
                    return;
                }
                Err(_) => {
                    tracing::debug!("the last status update did not leave in time");
                    return;
                }
            }
        }
        let closed = tokio::time::timeout(CLOSE_WAIT, async {
            self.wbuf.clear();
            frontend::copy_done(&mut self.wbuf);
            self.writer.write_all(&self.wbuf).await?;
            self.writer.flush().await?;
            // The server may still be sending data; skip it until it is ready again.
            loop {
                while let Some(msg) = take_message(&mut self.rbuf)? {
                    if let Backend::Message(Message::ReadyForQuery(_) | Message::ErrorResponse(_)) =
                        msg
                    {
                        return Ok::<_, WireError>(());
                    }
                }
                reserve_for_read(&mut self.rbuf);
                if self.reader.read_buf(&mut self.rbuf).await? == 0 {
                    return Err(WireError::Closed);
                }
            }
        })
        .await;
        if let Ok(Err(e)) = &closed {
            tracing::debug!(error = %e, "replication stream closed uncleanly");
        }
        self.wbuf.clear();
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            self.writer.write_all(&self.wbuf).await?;
            self.writer.shutdown().await
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    #[test]
    fn a_unix_socket_holds_more_events_and_is_read_as_it_comes() {
        let unix = StreamConfig::for_host("/var/run/postgresql");
        assert_eq!(unix.capacity, SOCKET_CHANNEL_CAPACITY);
        assert_eq!(unix.read_interval, Duration::ZERO);
        let tcp = StreamConfig::for_host("127.0.0.1");
        assert_eq!(tcp.capacity, CHANNEL_CAPACITY);
        assert_eq!(tcp.read_interval, READ_INTERVAL);
        assert!(tcp.capacity < unix.capacity);
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn xlog(wal_start: u64, wal_end: u64, data: &[u8]) -> Vec<u8> {
        let mut p = vec![b'w'];
        p.extend_from_slice(&wal_start.to_be_bytes());
        p.extend_from_slice(&wal_end.to_be_bytes());
        p.extend_from_slice(&7i64.to_be_bytes());
        p.extend_from_slice(data);
        frame(b'd', &p)
    }

    fn keepalive(wal_end: u64, reply: bool) -> Vec<u8> {
        let mut p = vec![b'k'];
        p.extend_from_slice(&wal_end.to_be_bytes());
        p.extend_from_slice(&9i64.to_be_bytes());
        p.push(u8::from(reply));
        frame(b'd', &p)
    }

    fn error_response(code: &str, message: &str) -> Vec<u8> {
        let mut p = Vec::new();
        for (t, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', message),
        ] {
            p.push(t);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        p.extend_from_slice(b"Dthe detail\0Hthe hint\0\0");
        frame(b'E', &p)
    }

    #[test]
    fn frames_are_taken_whole_across_split_reads() {
        let mut wire = Vec::new();
        wire.extend(xlog(1, 2, b"hello"));
        wire.extend(keepalive(3, true));
        wire.extend(frame(b'c', b""));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(msg) = take_message(&mut buf).unwrap() {
                got.push(match msg {
                    Backend::Message(Message::CopyData(body)) => {
                        format!("{:?}", parse_copy_data(body.into_bytes()).unwrap())
                    }
                    Backend::Message(Message::CopyDone) => "done".into(),
                    _ => "other".into(),
                });
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].contains("XLogData") && got[0].contains("b\"hello\""),
            "{got:?}"
        );
        assert!(got[1].contains("reply_requested: true"), "{got:?}");
        assert_eq!(got[2], "done");
    }

    #[test]
    fn bad_frame_lengths_are_errors() {
        for len in [0u32, 1, 3] {
            let mut buf = BytesMut::from(&[b'd', 0, 0, 0, len as u8][..]);
            assert!(matches!(
                take_message(&mut buf),
                Err(WireError::Protocol(_))
            ));
        }
        let mut buf = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        let err = take_message(&mut buf).err().unwrap();
        assert!(err.to_string().contains("limit"), "{err}");
        // A huge announced size reserves nothing before it is refused.
        assert!(buf.capacity() < 1024);
        // Exactly 4: an empty body is fine.
        let mut buf = BytesMut::from(&frame(b'c', b"")[..]);
        assert!(matches!(
            take_message(&mut buf),
            Ok(Some(Backend::Message(Message::CopyDone)))
        ));
    }

    #[test]
    fn malformed_known_messages_are_errors_not_panics() {
        // ReadyForQuery without its status byte, ParameterStatus without NULs, a data
        // row whose column length runs past the end, CopyDone with a body.
        for f in [
            frame(b'Z', b""),
            frame(b'S', b"abc"),
            frame(b'D', &[0, 1, 0, 0, 0, 9, b'x']),
            frame(b'c', b"x"),
            frame(b'R', b""),
            frame(b'R', &[0, 0, 0, 99]),
        ] {
            let mut buf = BytesMut::from(&f[..]);
            match take_message(&mut buf) {
                Err(_) => {}
                Ok(Some(Backend::Message(Message::DataRow(body)))) => {
                    let mut r = body.ranges();
                    assert!(r.next().is_err());
                }
                Ok(_) => panic!("accepted {f:?}"),
            }
        }
        let mut buf = BytesMut::from(&frame(b'R', &[0, 0, 0, 99])[..]);
        let err = take_message(&mut buf).err().unwrap();
        assert!(err.to_string().contains("request code 99"), "{err}");
    }

    #[test]
    fn copy_data_payloads_parse_and_short_ones_fail() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x10u64.to_be_bytes());
        p.extend_from_slice(&0x20u64.to_be_bytes());
        p.extend_from_slice(&5i64.to_be_bytes());
        p.extend_from_slice(b"B...");
        assert_eq!(
            parse_copy_data(Bytes::from(p.clone())).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                send_time: 5,
                data: Bytes::from_static(b"B..."),
            }
        );
        // An empty payload after the header is valid.
        assert!(parse_copy_data(Bytes::from(p[..25].to_vec())).is_ok());
        for n in 0..25 {
            assert!(
                parse_copy_data(Bytes::from(p[..n].to_vec())).is_err(),
                "{n}"
            );
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x30u64.to_be_bytes());
        k.extend_from_slice(&6i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x30),
                send_time: 6,
                reply_requested: true,
            }
        );
        for n in 0..18 {
            assert!(
                parse_copy_data(Bytes::from(k[..n].to_vec())).is_err(),
                "{n}"
            );
        }
        k.push(0);
        assert!(parse_copy_data(Bytes::from(k)).is_err());
        let err = parse_copy_data(Bytes::from_static(b"zzz")).unwrap_err();
        assert!(err.to_string().contains("'z'"), "{err}");
    }

    #[test]
    fn status_update_encoding() {
        let mut out = BytesMut::new();
        encode_status_update(Lsn(0x0102_0304_0506_0708), 0x1122, &mut out).unwrap();
        let mut want = vec![b'd', 0, 0, 0, 38, b'r'];
        for _ in 0..3 {
            want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        }
        want.extend_from_slice(&0x1122i64.to_be_bytes());
        want.push(0);
        assert_eq!(&out[..], &want[..]);
        // The clock is PostgreSQL's: 2000-01-01 is zero, so today is well past 20 years.
        assert!(pg_now_micros() > 20 * 365 * 86_400 * 1_000_000);
    }

    #[test]
    fn start_command_quotes_the_publication_inside_a_literal() {
        assert_eq!(
            start_replication_command("cutover_job", Lsn(0x1_0000_0010), 1, "cutover_job", false),
            "START_REPLICATION SLOT \"cutover_job\" LOGICAL 1/10 (proto_version '1', publication_names '\"cutover_job\"')"
        );
        assert_eq!(
            start_replication_command("s", Lsn(0), 2, "we\"ird'pub, x", true),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '2', publication_names '\"we\"\"ird''pub, x\"', streaming 'on')"
        );
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-1.pgdg120+1)"),
            Some(150018)
        );
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("17.0"), Some(170000));
        assert_eq!(parse_server_version("14devel"), Some(140000));
        assert_eq!(parse_server_version("9.6.3"), Some(90603));
        assert_eq!(parse_server_version("10.23"), Some(100023));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("beta"), None);
        assert_eq!(parse_server_version("99999999999.1"), None);
    }

    #[test]
    fn error_fields_are_kept() {
        let f = error_response("55006", "replication slot \"s\" is active for PID 42");
        let mut buf = BytesMut::from(&f[..]);
        let Some(Backend::Message(Message::ErrorResponse(body))) = take_message(&mut buf).unwrap()
        else {
            panic!("not an error response");
        };
        let e = ServerError::from_fields(body.fields());
        assert_eq!(e.code, "55006");
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.message, "replication slot \"s\" is active for PID 42");
        assert_eq!(e.detail.as_deref(), Some("the detail"));
        assert_eq!(e.hint.as_deref(), Some("the hint"));
        // Truncated field lists keep what came before.
        let mut buf = BytesMut::from(&frame(b'E', b"C08006\0Mgone")[..]);
        let Some(Backend::Message(Message::ErrorResponse(body))) = take_message(&mut buf).unwrap()
        else {
            panic!("not an error response");
        };
        let e = ServerError::from_fields(body.fields());
        assert_eq!(e.code, "08006");
        assert_eq!(e.message, "server error 08006");
    }

    // --- With a scripted server on an in-memory pipe ---------------------------------

    /// Read one frontend message (type byte and body) from the fake server's end.
    async fn read_frontend(server: &mut DuplexStream) -> (u8, Vec<u8>) {
        let tag = server.read_u8().await.unwrap();
        let len = server.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        server.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    fn ready() -> Vec<u8> {
        frame(b'Z', b"I")
    }

    async fn serve_startup(server: &mut DuplexStream, auth: &[u8]) -> Vec<u8> {
        // The startup message has no type byte.
        let len = server.read_u32().await.unwrap() as usize;
        let mut startup = vec![0; len - 4];
        server.read_exact(&mut startup).await.unwrap();
        server.write_all(auth).await.unwrap();
        startup
    }

    fn startup<'a>(password: Option<&'a str>) -> Startup<'a> {
        Startup {
            user: "alice",
            database: "db",
            application_name: "cutover/test",
            options: "-c TimeZone=UTC",
            password,
            replication: true,
        }
    }

    #[tokio::test]
    async fn md5_startup_sends_the_parameters_and_the_hash() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let conn = tokio::spawn(async move {
            Connection::startup(Box::new(client), &startup(Some("s3cret"))).await
        });
        let params = serve_startup(&mut server, &frame(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])).await;
        let text = String::from_utf8_lossy(&params).into_owned();
        for pair in [
            "user\0alice\0",
            "database\0db\0",
            "replication\0database\0",
            "application_name\0cutover/test\0",
            "options\0-c TimeZone=UTC\0",
            "client_encoding\0UTF8\0",
        ] {
            assert!(text.contains(pair), "{pair:?} missing from {text:?}");
        }
        let (tag, body) = read_frontend(&mut server).await;
        assert_eq!(tag, b'p');
        let hash = md5_hash(b"alice", b"s3cret", [1, 2, 3, 4]);
        assert_eq!(&body[..body.len() - 1], hash.as_bytes());
        let mut answer = frame(b'R', &[0, 0, 0, 0]);
        answer.extend(frame(b'S', b"server_version\x0015.18 (Debian 15.18-1)\0"));
        answer.extend(frame(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
        answer.extend(frame(b'N', b"SNOTICE\0Mhello\0\0"));
        answer.extend(ready());
        server.write_all(&answer).await.unwrap();
        let conn = conn.await.unwrap().unwrap();
        assert_eq!(
            conn.parameter("server_version"),
            Some("15.18 (Debian 15.18-1)")
        );
        assert!(!format!("{conn:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn authentication_failures_name_the_method_and_never_the_password() {
        for (request, needle) in [
            (vec![0, 0, 0, 7], "GSSAPI"),
            (vec![0, 0, 0, 9], "SSPI"),
            (vec![0, 0, 0, 2], "Kerberos"),
            (
                b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0".to_vec(),
                "SCRAM-SHA-256-PLUS",
            ),
        ] {
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let conn = tokio::spawn(async move {
                Connection::startup(Box::new(client), &startup(Some("s3cret"))).await
            });
            serve_startup(&mut server, &frame(b'R', &request)).await;
            let err = conn.await.unwrap().unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(matches!(err, WireError::Auth(_)), "{text}");
            assert!(text.contains(needle), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        // No password for a password request.
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let conn =
            tokio::spawn(
                async move { Connection::startup(Box::new(client), &startup(None)).await },
            );
        serve_startup(&mut server, &frame(b'R', &[0, 0, 0, 3])).await;
        let err = conn.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no password"), "{err}");
        // The server refusing the password.
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let conn = tokio::spawn(async move {
            Connection::startup(Box::new(client), &startup(Some("s3cret"))).await
        });
        serve_startup(&mut server, &frame(b'R', &[0, 0, 0, 3])).await;
        let (tag, _) = read_frontend(&mut server).await;
        assert_eq!(tag, b'p');
        server
            .write_all(&error_response(
                "28P01",
                "password authentication failed for user \"alice\"",
            ))
            .await
            .unwrap();
        match conn.await.unwrap().unwrap_err() {
            WireError::Server(e) => {
                assert_eq!(e.code, "28P01");
                assert!(!format!("{e:?}").contains("s3cret"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A connection past startup, on a pipe.
    fn connected() -> (Connection, DuplexStream) {
        let (client, server) = tokio::io::duplex(1024 * 1024);
        (
            Connection {
                io: Box::new(client),
                rbuf: BytesMut::new(),
                wbuf: BytesMut::new(),
                parameters: Vec::new(),
                interrupted: false,
            },
            server,
        )
    }

    #[tokio::test]
    async fn simple_query_returns_rows_and_errors_leave_the_session_usable() {
        let (mut conn, mut server) = connected();
        let script = tokio::spawn(async move {
            let (tag, body) = read_frontend(&mut server).await;
            assert_eq!(tag, b'Q');
            assert_eq!(body, b"IDENTIFY_SYSTEM\0");
            let mut answer = frame(b'T', &[0, 0]);
            // Two columns: "abc" and NULL.
            answer.extend(frame(
                b'D',
                &[0, 2, 0, 0, 0, 3, b'a', b'b', b'c', 0xff, 0xff, 0xff, 0xff],
            ));
            answer.extend(frame(b'C', b"IDENTIFY_SYSTEM\0"));
            answer.extend(ready());
            server.write_all(&answer).await.unwrap();
            read_frontend(&mut server).await;
            let mut answer = error_response("42710", "replication slot \"x\" already exists");
            answer.extend(ready());
            server.write_all(&answer).await.unwrap();
            read_frontend(&mut server).await;
            let mut answer = frame(b'I', b"");
            answer.extend(ready());
            server.write_all(&answer).await.unwrap();
            server
        });
        let rows = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap();
        assert_eq!(rows, vec![vec![Some(Bytes::from_static(b"abc")), None]]);
        match conn.simple_query("CREATE_REPLICATION_SLOT x").await {
            Err(WireError::Server(e)) => assert!(e.message.contains("already exists")),
            other => panic!("{other:?}"),
        }
        assert!(conn.simple_query("").await.unwrap().is_empty());
        drop(script.await.unwrap());
    }

    #[tokio::test]
    async fn an_interrupted_command_poisons_the_session() {
        let (mut conn, _server) = connected();
        let r =
            tokio::time::timeout(Duration::from_millis(20), conn.simple_query("SELECT 1")).await;
        assert!(r.is_err());
        let err = conn.simple_query("SELECT 1").await.unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }

    /// Start streaming on a pipe; the fake server has sent CopyBothResponse and `extra`.
    async fn started(config: StreamConfig, extra: &[u8]) -> (Stream, DuplexStream) {
        let (conn, mut server) = connected();
        let mut answer = frame(b'W', &[0, 0, 0]);
        answer.extend_from_slice(extra);
        let server_side = tokio::spawn(async move {
            let (tag, body) = read_frontend(&mut server).await;
            assert_eq!(tag, b'Q');
            assert!(body.starts_with(b"START_REPLICATION"));
            server.write_all(&answer).await.unwrap();
            server
        });
        let stream = conn
            .start_replication(
                "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1')",
                Lsn(0x100),
                config,
            )
            .await
            .unwrap();
        (stream, server_side.await.unwrap())
    }

    /// A started stream whose status ticks are an hour apart, after its first one (which
    /// comes at once, with the start position): any later status update has another cause.
    async fn started_quiet() -> (Stream, DuplexStream) {
        let config = StreamConfig {
            capacity: 16,
            buffer_bytes: BUFFER_BYTES,
            status_interval: Duration::from_secs(3600),
            read_interval: Duration::ZERO,
        };
        let (stream, mut server) = started(config, b"").await;
        let (tag, body) = read_frontend(&mut server).await;
        assert_eq!(status_lsn(tag, &body), Some(0x100));
        (stream, server)
    }

    /// The LSN in a frontend CopyData status update.
    fn status_lsn(tag: u8, body: &[u8]) -> Option<u64> {
        if tag != b'd' || body.first() != Some(&b'r') || body.len() != 34 {
            return None;
        }
        let flush = u64::from_be_bytes(body[9..17].try_into().unwrap());
        Some(flush)
    }

    #[tokio::test]
    async fn events_flow_in_order_and_the_server_ending_is_none() {
        // Data sent together with the CopyBothResponse is not lost.
        let (mut stream, mut server) = started(StreamConfig::default(), &xlog(1, 5, b"a")).await;
        server.write_all(&keepalive(9, false)).await.unwrap();
        server.write_all(&xlog(10, 12, b"bc")).await.unwrap();
        assert_eq!(
            stream.recv().await.unwrap(),
            Some(RawEvent::XLogData {
                wal_start: Lsn(1),
                wal_end: Lsn(5),
                data: Bytes::from_static(b"a")
            })
        );
        assert_eq!(
            stream.recv().await.unwrap(),
            Some(RawEvent::KeepAlive { wal_end: Lsn(9) })
        );
        assert!(matches!(
            stream.recv().await.unwrap(),
            Some(RawEvent::XLogData {
                wal_start: Lsn(10),
                ..
            })
        ));
        assert_eq!(stream.wal_end(), Lsn(12));
        // CopyDone from the server, read together with the data before it: the data
        // comes first; we answer CopyDone, then Terminate.
        let mut last = xlog(13, 14, b"d");
        last.extend(frame(b'c', b""));
        server.write_all(&last).await.unwrap();
        let closer = tokio::spawn(async move {
            loop {
                let (tag, _) = read_frontend(&mut server).await;
                if tag == b'c' {
                    let mut answer = frame(b'C', b"START_REPLICATION\0");
                    answer.extend(ready());
                    server.write_all(&answer).await.unwrap();
                }
                if tag == b'X' {
                    return;
                }
            }
        });
        assert!(matches!(
            stream.recv().await.unwrap(),
            Some(RawEvent::XLogData {
                wal_start: Lsn(13),
                ..
            })
        ));
        assert_eq!(stream.recv().await.unwrap(), None);
        assert_eq!(stream.recv().await.unwrap(), None);
        tokio::time::timeout(Duration::from_secs(5), closer)
            .await
            .unwrap()
            .unwrap();
    }

    /// The WAL start of the next event, an XLogData (waiting 10 s at most).
    async fn next_start(stream: &mut Stream) -> u64 {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.recv());
        match next.await.expect("no event in 10 s").unwrap() {
            Some(RawEvent::XLogData { wal_start, .. }) => wal_start.0,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_are_spaced_while_data_comes_and_a_quiet_stream_is_read_at_once() {
        let interval = Duration::from_millis(1500);
        let config = StreamConfig {
            status_interval: Duration::from_secs(3600),
            read_interval: interval,
            ..StreamConfig::default()
        };
        let (mut stream, server) = started(config, b"").await;
        let (_rd, mut wr) = tokio::io::split(server);
        // After a quiet start, the first message is read as it arrives.
        wr.write_all(&xlog(1, 1, b"a")).await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(next_start(&mut stream).await, 1);
        assert!(t.elapsed() < interval / 2, "{:?}", t.elapsed());
        // The socket was read empty: what comes next waits for the interval, and then
        // everything written in the meantime comes in one read.
        let read = std::time::Instant::now();
        for i in 2..=4 {
            wr.write_all(&xlog(i, i, b"b")).await.unwrap();
        }
        assert_eq!(next_start(&mut stream).await, 2);
        assert!(read.elapsed() >= interval * 9 / 10, "{:?}", read.elapsed());
        assert_eq!(next_start(&mut stream).await, 3);
        assert_eq!(next_start(&mut stream).await, 4);
        assert!(stream.drained());
        // Quiet for longer than the interval: read at once again.
        tokio::time::sleep(interval + Duration::from_millis(100)).await;
        wr.write_all(&xlog(5, 5, b"c")).await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(next_start(&mut stream).await, 5);
        assert!(t.elapsed() < interval / 2, "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn the_byte_budget_holds_reading_back_and_lets_large_events_through() {
        // Room for half an event: each event waits alone, however many the channel holds.
        let config = StreamConfig {
            capacity: CHANNEL_CAPACITY,
            buffer_bytes: 512,
            status_interval: Duration::from_secs(3600),
            read_interval: Duration::ZERO,
        };
        let (mut stream, server) = started(config, b"").await;
        // 2000 events of 1000 bytes: 2 MB, far more than the pipe and one read hold.
        let data: Vec<u8> = (0..2000u64).flat_map(|i| xlog(i, i, &[7; 1000])).collect();
        let (_rd, mut wr) = tokio::io::split(server);
        let writing = tokio::spawn(async move {
            wr.write_all(&data).await.unwrap();
            wr
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writing.is_finished(), "the task read past its byte budget");
        // Every event arrives, in order, although each is larger than the whole budget.
        tokio::time::timeout(Duration::from_secs(20), async {
            for i in 0..2000u64 {
                match stream.recv().await.unwrap() {
                    Some(RawEvent::XLogData {
                        wal_start, data, ..
                    }) => {
                        assert_eq!(wal_start, Lsn(i));
                        assert_eq!(data.len(), 1000);
                    }
                    _ => panic!("event {i} is not the XLogData sent"),
                }
            }
        })
        .await
        .expect("events larger than the budget must not wait forever");
        writing.await.unwrap();
    }

    #[tokio::test]
    async fn status_updates_go_on_while_the_consumer_is_stuck() {
        let config = StreamConfig {
            capacity: 2,
            buffer_bytes: BUFFER_BYTES,
            status_interval: Duration::from_millis(20),
            read_interval: Duration::ZERO,
        };
        let (stream, server) = started(config, b"").await;
        stream.confirm(Lsn(0x200));
        stream.confirm(Lsn(0x150)); // never lowers it
        // Far more than the channel holds, and more than the pipe buffers.
        let writer_data: Vec<u8> = (0..5000u64).flat_map(|i| xlog(i, i, &[0; 300])).collect();
        let (mut rd, mut wr) = tokio::io::split(server);
        let writing = tokio::spawn(async move {
            let _ = wr.write_all(&writer_data).await;
            wr
        });
        // Nobody reads the stream; status updates still arrive, with the confirmed LSN.
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
        while tokio::time::Instant::now() < deadline {
            let tag = rd.read_u8().await.unwrap();
            let len = rd.read_u32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            rd.read_exact(&mut body).await.unwrap();
            if let Some(lsn) = status_lsn(tag, &body) {
                seen.push(lsn);
            }
        }
        assert!(seen.len() >= 5, "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 0x200);
        // Recorded right after the write.
        for _ in 0..100 {
            if stream.sent() == Lsn(0x200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stream.sent(), Lsn(0x200));
        assert!(
            !writing.is_finished(),
            "the task read everything: no backpressure"
        );
        drop(stream);
        writing.abort();
    }

    #[tokio::test]
    async fn a_keepalive_asking_for_a_reply_is_answered_at_once() {
        let (stream, mut server) = started_quiet().await;
        // Nothing new confirmed: only the keepalive can make the task write.
        server.write_all(&keepalive(0x400, true)).await.unwrap();
        let (tag, body) = tokio::time::timeout(Duration::from_secs(2), read_frontend(&mut server))
            .await
            .unwrap();
        assert_eq!(status_lsn(tag, &body), Some(0x100));
        assert_eq!(stream.wal_end(), Lsn(0x400));
    }

    #[tokio::test]
    async fn a_new_confirmation_is_sent_at_once() {
        let (stream, mut server) = started_quiet().await;
        for lsn in [0x300, 0x480] {
            stream.confirm(Lsn(lsn));
            let (tag, body) =
                tokio::time::timeout(Duration::from_secs(2), read_frontend(&mut server))
                    .await
                    .expect("the confirmation waited for the status interval");
            assert_eq!(status_lsn(tag, &body), Some(lsn));
        }
        // Confirming what was already sent sends nothing more.
        stream.confirm(Lsn(0x480));
        stream.confirm(Lsn(0x400));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), read_frontend(&mut server))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn errors_mid_stream_eof_and_garbage_fail_the_stream() {
        let (mut stream, mut server) = started(StreamConfig::default(), b"").await;
        server
            .write_all(&error_response(
                "57P01",
                "terminating connection due to administrator command",
            ))
            .await
            .unwrap();
        match stream.recv().await {
            Err(WireError::Server(e)) => assert_eq!(e.code, "57P01"),
            other => panic!("{other:?}"),
        }
        // After the failure the stream stays failed.
        assert!(stream.recv().await.is_err());

        let (mut stream, server) = started(StreamConfig::default(), &xlog(1, 1, b"x")).await;
        drop(server);
        assert!(stream.recv().await.unwrap().is_some());
        assert!(matches!(stream.recv().await, Err(WireError::Closed)));

        let (mut stream, mut server) = started(StreamConfig::default(), b"").await;
        server.write_all(&frame(b'd', b"q")).await.unwrap();
        assert!(matches!(stream.recv().await, Err(WireError::Protocol(_))));

        let (mut stream, mut server) = started(StreamConfig::default(), b"").await;
        server.write_all(&[b'd', 0, 0, 0, 2]).await.unwrap();
        assert!(matches!(stream.recv().await, Err(WireError::Protocol(_))));
    }

    #[tokio::test]
    async fn start_replication_refused_is_the_server_error() {
        let (conn, mut server) = connected();
        let script = tokio::spawn(async move {
            read_frontend(&mut server).await;
            let mut answer = error_response("55006", "replication slot \"s\" is active for PID 7");
            answer.extend(ready());
            server.write_all(&answer).await.unwrap();
            server
        });
        match conn
            .start_replication("START_REPLICATION", Lsn(0), StreamConfig::default())
            .await
        {
            Err(WireError::Server(e)) => assert!(e.message.contains("is active for PID")),
            other => panic!("{other:?}"),
        }
        drop(script.await.unwrap());
    }

    #[tokio::test]
    async fn shutdown_sends_the_confirmation_copy_done_and_terminate() {
        let (stream, mut server) = started_quiet().await;
        stream.confirm(Lsn(0x500));
        let script = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let (tag, body) = read_frontend(&mut server).await;
                seen.push((tag, status_lsn(tag, &body)));
                if tag == b'c' {
                    // Data still in flight, then the server's side of the close.
                    let mut answer = xlog(1, 1, b"late");
                    answer.extend(frame(b'c', b""));
                    answer.extend(frame(b'C', b"START_REPLICATION\0"));
                    answer.extend(ready());
                    server.write_all(&answer).await.unwrap();
                }
                if tag == b'X' {
                    return seen;
                }
            }
        });
        let started = std::time::Instant::now();
        stream.shutdown(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut seen = script.await.unwrap();
        // The confirmation may also have gone out on its own just before.
        seen.dedup();
        assert_eq!(seen, vec![(b'd', Some(0x500)), (b'c', None), (b'X', None)]);
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_socket() {
        let (stream, mut server) = started(StreamConfig::default(), b"").await;
        drop(stream);
        let mut sink = Vec::new();
        // Reads whatever status update was sent, then EOF.
        tokio::time::timeout(Duration::from_secs(2), server.read_to_end(&mut sink))
            .await
            .unwrap()
            .unwrap();
    }

    // --- The copy relay ---------------------------------------------------------------

    /// An ordinary session on a fake server (trust authentication), and the server's end.
    async fn plain_session(buffer: usize) -> (Connection, DuplexStream) {
        let (client, mut server) = tokio::io::duplex(buffer);
        let mut startup = startup(None);
        startup.replication = false;
        let conn = tokio::spawn(async move {
            let startup = Startup {
                replication: false,
                ..startup
            };
            Connection::startup(Box::new(client), &startup).await
        });
        let params = serve_startup(&mut server, &frame(b'R', &[0, 0, 0, 0])).await;
        assert!(!String::from_utf8_lossy(&params).contains("replication"));
        server.write_all(&ready()).await.unwrap();
        (conn.await.unwrap().unwrap(), server)
    }

    /// Start a relay of `rows` between two fake servers: both sessions enter copy mode, and
    /// the relay runs in a task that returns its result and the rows and bytes it counted.
    async fn relay_started(
        target_buffer: usize,
    ) -> (
        tokio::task::JoinHandle<(Result<u64, RelayError>, u64, u64)>,
        DuplexStream,
        DuplexStream,
    ) {
        let (mut source, mut src) = plain_session(64 * 1024).await;
        let (mut target, mut dst) = plain_session(target_buffer).await;
        let relay = tokio::spawn(async move {
            source
                .start_copy("COPY (SELECT 1) TO STDOUT", true)
                .await
                .unwrap();
            target.start_copy("COPY t FROM STDIN", false).await.unwrap();
            let (mut rows, mut bytes) = (0, 0);
            let result = relay_copy(&mut source, &mut target, &mut |r, b| {
                rows += r;
                bytes += b;
            })
            .await;
            (result, rows, bytes)
        });
        let (tag, body) = read_frontend(&mut src).await;
        assert_eq!(
            (tag, &body[..]),
            (b'Q', &b"COPY (SELECT 1) TO STDOUT\0"[..])
        );
        src.write_all(&frame(b'H', &[0, 0, 0])).await.unwrap();
        let (tag, _) = read_frontend(&mut dst).await;
        assert_eq!(tag, b'Q');
        dst.write_all(&frame(b'G', &[0, 0, 0])).await.unwrap();
        (relay, src, dst)
    }

    #[tokio::test]
    async fn the_relay_joins_the_rows_into_large_messages_and_ends_both_copies() {
        let (relay, mut src, mut dst) = relay_started(64 * 1024).await;
        let mut rows: Vec<Vec<u8>> = (0..5000)
            .map(|i| format!("{i}\trow number {i}\n").into_bytes())
            .collect();
        // A row larger than a piece, in the middle: it goes as it came, in order.
        rows[2500] = [b"2500\t".as_slice(), &vec![b'z'; 3 * RELAY_PIECE], b"\n"].concat();
        let expected: Vec<u8> = rows.concat();
        let source_side = tokio::spawn(async move {
            let mut wire: Vec<u8> = rows.iter().flat_map(|r| frame(b'd', r)).collect();
            wire.extend(frame(b'c', b""));
            wire.extend(frame(b'C', b"COPY 5000\0"));
            wire.extend(frame(b'Z', b"T"));
            // In odd pieces, so messages arrive split across reads.
            for piece in wire.chunks(7919) {
                src.write_all(piece).await.unwrap();
            }
            src
        });
        let mut received = Vec::new();
        let mut messages = 0;
        loop {
            let (tag, body) = read_frontend(&mut dst).await;
            match tag {
                b'd' => {
                    messages += 1;
                    received.extend_from_slice(&body);
                }
                b'c' => break,
                other => panic!("unexpected message {}", other as char),
            }
        }
        assert_eq!(
            received, expected,
            "the target got other bytes than the source sent"
        );
        assert!(
            messages <= expected.len().div_ceil(RELAY_PIECE) + 1,
            "{messages} messages for {} bytes: the rows were not joined",
            expected.len()
        );
        let mut end = frame(b'C', b"COPY 5000\0");
        end.extend(frame(b'Z', b"T"));
        dst.write_all(&end).await.unwrap();
        let (result, rows, bytes) = relay.await.unwrap();
        assert_eq!(result.unwrap(), 5000);
        assert_eq!((rows, bytes), (5000, expected.len() as u64));
        drop(source_side.await.unwrap());
    }

    #[tokio::test]
    async fn a_target_that_fails_stops_the_relay_at_once() {
        let (relay, mut src, mut dst) = relay_started(1 << 20).await;
        let mut answer = error_response("23505", "duplicate key value violates unique constraint");
        answer.extend(ready());
        dst.write_all(&answer).await.unwrap();
        // The source goes on sending (it would for a long table), and never ends.
        let source_side = tokio::spawn(async move {
            let row = frame(b'd', &[b'x'; 200]);
            loop {
                if src.write_all(&row).await.is_err() {
                    return;
                }
            }
        });
        let (result, _, _) = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay went on copying into a target that had failed")
            .unwrap();
        match result {
            Err(RelayError::Target(WireError::Server(e))) => assert_eq!(e.code, "23505"),
            other => panic!("expected the target's error, got {other:?}"),
        }
        source_side.abort();
        drop(dst);
    }

    #[tokio::test]
    async fn a_source_that_fails_is_the_relays_error() {
        let (relay, mut src, _dst) = relay_started(1 << 20).await;
        let mut wire = frame(b'd', b"1\tone\n");
        wire.extend(error_response(
            "57P01",
            "terminating connection due to administrator command",
        ));
        src.write_all(&wire).await.unwrap();
        let (result, _, _) = relay.await.unwrap();
        match result {
            Err(RelayError::Source(WireError::Server(e))) => assert_eq!(e.code, "57P01"),
            other => panic!("expected the source's error, got {other:?}"),
        }
    }
}
