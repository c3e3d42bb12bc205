//! The replication connection: our types and error wording over [`super::wire`].
//!
//! Upstream tokio-postgres cannot speak the replication protocol (CopyBoth), so the
//! replication session runs on our own transport (`wire.rs`): startup and authentication,
//! replication commands, `START_REPLICATION`, and, once streaming, a task of its own that
//! answers keepalives and sends standby status updates every 250 ms even while we are busy
//! applying a long transaction (hard case 8). Everything it hands us is turned into our
//! own [`StreamEvent`]s and [`Error`]s here.
//!
//! [`ReplicationSession::start`] requests pgoutput protocol version 1, so the server sends
//! each transaction once it has committed, and spills large transactions on its side
//! (`logical_decoding_work_mem`). Our apply consumes a transaction as it arrives, so
//! memory stays bounded on our side too. [`ReplicationSession::start_with`] can ask for
//! protocol 2 with `streaming 'on'` (PostgreSQL 14+): in-progress transactions then arrive
//! in blocks between Stream Start and Stream Stop, the server no longer spills them, and
//! [`ReplicationStream::next`] spools them to local files and hands each on whole at its
//! commit ([`super::spool`]), so the events keep protocol 1's shape: whole transactions in
//! commit order.

use std::path::PathBuf;

use cutover_config::ConnParams;

use crate::error::{Error, ErrorClass, Result};
use crate::lsn::Lsn;
use crate::pg_source::decode::{self, Begin, Commit, LogicalMessage};
use crate::pg_source::spool::{Destreamer, Pushed};
use crate::pg_source::wire::{self, WireError};

pub use crate::pg_source::wire::RawEvent;

/// What the stream delivers, in order.
#[derive(Debug)]
pub enum StreamEvent {
    Begin(Begin),
    Commit(Commit),
    /// Any other pgoutput message (Relation, Insert, Update, Delete, Truncate, Type, Origin).
    Message(LogicalMessage),
    /// The server is alive and has sent everything up to `wal_end`.
    KeepAlive {
        wal_end: Lsn,
    },
}

/// The pgoutput options of `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOptions {
    /// `proto_version`: 1, or 2 and up (PostgreSQL 14+) for streamed transactions.
    pub proto_version: u32,
    /// `streaming 'on'` (needs protocol 2+): in-progress transactions are streamed, spooled
    /// under this directory, and handed on whole at their commit ([`Destreamer`]), so the
    /// events [`ReplicationStream::next`] returns keep protocol 1's shape.
    pub stream_spool: Option<PathBuf>,
}

impl Default for StartOptions {
    /// Protocol 1 without streaming: what [`ReplicationSession::start`] asks for.
    fn default() -> Self {
        Self {
            proto_version: 1,
            stream_spool: None,
        }
    }
}

impl StartOptions {
    /// Protocol 2 with in-progress transactions streamed and spooled under `dir`.
    pub fn streaming(dir: PathBuf) -> Self {
        Self {
            proto_version: 2,
            stream_spool: Some(dir),
        }
    }
}

/// A replication session that has not started streaming: replication commands such as
/// `CREATE_REPLICATION_SLOT` run on it. It stays idle between commands, so a snapshot it
/// exported stays valid until it starts streaming or is dropped.
pub struct ReplicationSession {
    conn: wire::Connection,
    endpoint: String,
    /// How the stream buffers, by the kind of socket (TCP or unix).
    stream_config: wire::StreamConfig,
    slot: String,
    publication: String,
    start: Lsn,
}

impl std::fmt::Debug for ReplicationSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationSession")
            .field("endpoint", &self.endpoint)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// A slot just created, with the snapshot it exported.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The LSN from which the slot decodes: every transaction that commits at or after it
    /// is streamed; every one before it is visible in the snapshot.
    pub consistent_point: Lsn,
    /// The exported snapshot, valid while this session runs no other command.
    pub snapshot_name: String,
}

const AUTH_HINT: &str = "check the user and the password; the user needs the REPLICATION attribute";
const REPLICATION_ROLE_HINT: &str = "grant it with ALTER ROLE ... REPLICATION (the attribute is not inherited through role membership)";
const HBA_HINT: &str = "allow the user in pg_hba.conf for this database (logical replication matches the database name, not the keyword replication)";

/// Our error for a failure of the replication connection while doing `what` (a verb
/// phrase: "start replication"). The primary is `could not {what} on {endpoint}: {cause}`;
/// a server error keeps its detail and hint unless a hint of ours fits better.
fn wire_error(what: &str, endpoint: &str, e: WireError) -> Error {
    let server = match &e {
        WireError::Server(s) => Some((
            s.code.clone(),
            format!("{} {}", s.message, s.detail.as_deref().unwrap_or("")),
        )),
        _ => None,
    };
    let auth = matches!(e, WireError::Auth(_));
    let mut err = Error::from_wire(what, endpoint, e);
    if auth {
        err.hint = Some(AUTH_HINT.into());
    }
    let Some((code, text)) = server else {
        return err;
    };
    if text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
        || text.contains("REPLICATION attribute")
    {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some(REPLICATION_ROLE_HINT.into());
    } else if text.contains("pg_hba.conf") {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some(HBA_HINT.into());
    } else if code.starts_with("28") {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some(AUTH_HINT.into());
    } else if code == "55006" && text.contains("is active for PID") {
        // The slot is still held, usually by the walsender of a predecessor that
        // died: it lets go within wal_sender_timeout. As in provision's check.
        err.class = ErrorClass::Transient;
        err.hint = Some("another cutover run of this job (or a stale connection) holds the slot; stop it, or wait for wal_sender_timeout to end a dead one".into());
        err.retry_for = Some(std::time::Duration::from_secs(90));
    }
    err
}

impl ReplicationSession {
    /// Open a replication session (`replication=database`) that waits for commands.
    /// `slot`, `publication` and `start` are what [`start`](Self::start) streams.
    pub async fn connect(
        params: &ConnParams,
        slot: &str,
        publication: &str,
        start: Lsn,
        application_name: &str,
    ) -> Result<Self> {
        let endpoint = params.endpoint();
        let limit = crate::pg_conn::connect_timeout(params);
        let what = "open a replication connection";
        // No TLS: the replication connection is plain TCP or a unix socket, whatever the
        // sslmode, as before (ordinary connections refuse the modes that require TLS).
        let open = async {
            let mut conn = wire::connect(params, application_name, true)
                .await
                .map_err(|e| wire_error(what, &endpoint, e))?;
            // Prove the session takes replication commands before handing it out.
            conn.simple_query("IDENTIFY_SYSTEM")
                .await
                .map_err(|e| wire_error(what, &endpoint, e))?;
            Ok::<_, Error>(conn)
        };
        let conn = tokio::time::timeout(limit, open)
            .await
            .map_err(|_| crate::pg_conn::timeout_error(params, limit))??;
        Ok(Self {
            conn,
            endpoint,
            stream_config: wire::StreamConfig::for_host(&params.host),
            slot: slot.to_string(),
            publication: publication.to_string(),
            start,
        })
    }

    /// The server's version as `server_version_num` counts it (150018 for 15.18), from
    /// the `server_version` it reported at startup.
    pub fn server_version_num(&self) -> Option<u32> {
        self.conn
            .parameter("server_version")
            .and_then(wire::parse_server_version)
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput (SNAPSHOT 'export')`.
    /// `name` must already be a valid slot name (`[a-z0-9_]{1,63}`): replication commands
    /// take it unquoted.
    pub async fn create_slot(&mut self, name: &str, temporary: bool) -> Result<CreatedSlot> {
        debug_assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        );
        let sql = format!(
            "CREATE_REPLICATION_SLOT {name}{} LOGICAL pgoutput (SNAPSHOT 'export')",
            if temporary { " TEMPORARY" } else { "" }
        );
        let rows = self.conn.simple_query(&sql).await.map_err(|e| {
            wire_error(
                &format!("create replication slot \"{name}\""),
                &self.endpoint,
                e,
            )
        })?;
        let row = rows.first().ok_or_else(|| {
            Error::transient(format!(
                "CREATE_REPLICATION_SLOT on {} returned no row",
                self.endpoint
            ))
        })?;
        let text = |i: usize| -> Option<String> {
            row.get(i)
                .and_then(|v| v.as_ref())
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let consistent_point = text(1).and_then(|s| s.parse::<Lsn>().ok()).ok_or_else(|| {
            Error::transient("CREATE_REPLICATION_SLOT returned no consistent point")
        })?;
        let snapshot_name = text(2)
            .ok_or_else(|| Error::transient("CREATE_REPLICATION_SLOT returned no snapshot name"))?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name,
        })
    }

    /// Start streaming from the slot with pgoutput protocol 1. The start LSN given to
    /// [`connect`](Self::connect) is what the target has durably applied: it is what the
    /// slot is told until the caller confirms more.
    pub async fn start(self) -> Result<ReplicationStream> {
        self.start_with(StartOptions::default()).await
    }

    /// Start streaming with the given pgoutput options (`streaming` needs PostgreSQL 14+
    /// and protocol 2 or later; the server refuses what it does not support).
    pub async fn start_with(self, opts: StartOptions) -> Result<ReplicationStream> {
        let destream = opts.stream_spool.map(Destreamer::new).transpose()?;
        let command = wire::start_replication_command(
            &self.slot,
            self.start,
            opts.proto_version,
            &self.publication,
            destream.is_some(),
        );
        let inner = self
            .conn
            .start_replication(&command, self.start, self.stream_config)
            .await
            .map_err(|e| wire_error("start replication", &self.endpoint, e))?;
        Ok(ReplicationStream {
            inner,
            endpoint: self.endpoint,
            in_stream: false,
            destream,
        })
    }
}

/// A started replication stream. Dropping it closes the connection.
pub struct ReplicationStream {
    inner: wire::Stream,
    endpoint: String,
    /// Between Stream Start and Stream Stop (protocol 2 streaming).
    in_stream: bool,
    /// With streaming: the spool of in-progress transactions.
    destream: Option<Destreamer>,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("endpoint", &self.endpoint)
            .field("inner", &self.inner)
            .field("in_stream", &self.in_stream)
            .field("destream", &self.destream)
            .finish()
    }
}

/// The event a decoded message is, if any (logical decoding messages carry no rows).
fn event(msg: LogicalMessage) -> Option<StreamEvent> {
    Some(match msg {
        LogicalMessage::Begin(b) => StreamEvent::Begin(b),
        LogicalMessage::Commit(c) => StreamEvent::Commit(c),
        LogicalMessage::Message(_) => return None,
        other => StreamEvent::Message(other),
    })
}

impl ReplicationStream {
    /// The next event; `None` when the server ended the stream cleanly. Cancel-safe (the
    /// only wait is for the next raw event). Logical decoding messages (`M`,
    /// pg_logical_emit_message) carry no row changes and are skipped.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            // A streamed transaction that committed is handed on first, whole. Reading it
            // back does not await, so this stays cancel-safe.
            if let Some(d) = &mut self.destream
                && d.replaying()
            {
                match d.replay_next()? {
                    Some(msg) => match event(msg) {
                        Some(e) => return Ok(Some(e)),
                        None => continue,
                    },
                    None => continue,
                }
            }
            let Some(raw) = self.next_raw().await? else {
                return Ok(None);
            };
            let data = match raw {
                RawEvent::KeepAlive { wal_end } => {
                    return Ok(Some(StreamEvent::KeepAlive { wal_end }));
                }
                RawEvent::XLogData { data, .. } => data,
            };
            let in_stream = match &self.destream {
                Some(d) => d.in_stream(),
                None => self.in_stream,
            };
            let msg = decode::decode_bytes(&data, in_stream).map_err(|e| {
                Error::operator(format!("could not decode the replication stream: {e}"))
                    .hint("this is a bug in cutover or an unsupported server; report it with the server version")
            })?;
            let msg = match &mut self.destream {
                Some(d) => match d.push(&data, msg)? {
                    Pushed::Pass(msg) => msg,
                    Pushed::Held | Pushed::Replay => continue,
                },
                None => {
                    match &msg {
                        LogicalMessage::StreamStart(_) => self.in_stream = true,
                        LogicalMessage::StreamStop => self.in_stream = false,
                        _ => {}
                    }
                    msg
                }
            };
            if let Some(e) = event(msg) {
                return Ok(Some(e));
            }
        }
    }

    /// Whether every event read from the socket so far has been handed out.
    pub fn drained(&self) -> bool {
        self.inner.drained() && self.destream.as_ref().is_none_or(|d| !d.replaying())
    }

    /// Streamed transactions received in part, not committed or aborted yet.
    pub fn streamed_in_progress(&self) -> usize {
        self.destream
            .as_ref()
            .map_or(0, Destreamer::open_transactions)
    }

    /// The next event as the server sent it, undecoded; `None` when the server ended the
    /// stream cleanly (CopyDone). Cancel-safe.
    pub async fn next_raw(&mut self) -> Result<Option<RawEvent>> {
        self.inner
            .recv()
            .await
            .map_err(|e| wire_error("receive the replication stream", &self.endpoint, e))
    }

    /// Tell the server that everything up to `lsn` is durable on the target. Monotonic;
    /// the streaming task sends it in a status update at once.
    pub fn confirm(&mut self, lsn: Lsn) {
        self.inner.confirm(lsn);
    }

    /// The last position the server was told about in a standby status update.
    pub fn confirmed_to_server(&self) -> Lsn {
        self.inner.sent()
    }

    /// The server's WAL end as last seen on the stream.
    pub fn server_wal_end(&self) -> Lsn {
        self.inner.wal_end()
    }

    /// End the stream cleanly (CopyDone), after waiting (up to `grace`) for the last
    /// confirmation to reach the server.
    pub async fn shutdown(self, grace: std::time::Duration) {
        self.inner.shutdown(grace).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg_source::wire::ServerError;

    fn server(code: &str, message: &str) -> WireError {
        WireError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: Some("the detail".into()),
            hint: None,
        })
    }

    #[test]
    fn server_errors_keep_their_text_and_are_classified() {
        let e = wire_error(
            "start replication",
            "h:5432/db",
            server(
                "55000",
                "Can no longer get changes from replication slot \"s\"",
            ),
        );
        assert_eq!(
            e.primary,
            "could not start replication on h:5432/db: can no longer get changes from replication slot \"s\""
        );
        assert_eq!(e.detail.as_deref(), Some("the detail"));
        assert_eq!(e.class, ErrorClass::NeedsOperator);
        for code in ["08006", "57P01", "57P03", "53300", "40001", "40P01"] {
            assert!(
                wire_error("x", "e", server(code, "m")).is_transient(),
                "{code}"
            );
        }
        let e = wire_error(
            "start replication",
            "e",
            server("55006", "replication slot \"s\" is active for PID 7"),
        );
        assert!(e.primary.contains("is active for PID 7"));
        assert!(e.is_transient() && e.retry_for.is_some());
        let e = wire_error(
            "open",
            "e",
            server("28P01", "password authentication failed"),
        );
        assert_eq!(e.class, ErrorClass::NeedsOperator);
        assert_eq!(e.hint.as_deref(), Some(AUTH_HINT));
        let e = wire_error(
            "open",
            "e",
            server("28000", "no pg_hba.conf entry for replication connection"),
        );
        assert_eq!(e.hint.as_deref(), Some(HBA_HINT));
        let e = wire_error(
            "open",
            "e",
            server(
                "42501",
                "must be superuser or replication role to start walsender",
            ),
        );
        assert!(e.hint.as_deref().unwrap().contains("REPLICATION"));
        assert!(wire_error("x", "e", WireError::Closed).is_transient());
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = wire_error("x", "e", WireError::Io(io));
        assert!(e.is_transient());
        assert_eq!(e.primary, "could not x on e: connection refused");
        let e = wire_error("x", "e", WireError::Auth("the server asks for SSPI".into()));
        assert_eq!(e.class, ErrorClass::NeedsOperator);
    }
}
