//! The replication connection: the only module that touches `pgwire-replication`.
//!
//! Upstream tokio-postgres cannot speak the replication protocol (CopyBoth), so the
//! replication session comes from the `pgwire-replication` crate: it handles the startup,
//! authentication, `START_REPLICATION`, keepalives and standby status updates on its own
//! worker task, so keepalives are answered even while we are busy applying a long
//! transaction (hard case 8). Everything it hands us is turned into our own
//! [`StreamEvent`]s here, so replacing it means rewriting this file only.
//!
//! The crate requests pgoutput protocol version 1, so the server sends each transaction
//! once it has committed, and spills large transactions on its side
//! (`logical_decoding_work_mem`). Our apply consumes a transaction as it arrives, so
//! memory stays bounded on our side too.

use cutover_config::ConnParams;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

use crate::error::{Error, ErrorClass, Result};
use crate::lsn::Lsn;
use crate::pg_conn::session_options;
use crate::pg_source::decode::{self, Begin, Commit, LogicalMessage};

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

/// A replication session that has not started streaming: replication commands such as
/// `CREATE_REPLICATION_SLOT` run on it.
pub struct ReplicationSession {
    client: ReplicationClient,
    endpoint: String,
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

fn to_lsn(l: pgwire_replication::Lsn) -> Lsn {
    Lsn(l.as_u64())
}

fn wire_error(what: &str, endpoint: &str, e: pgwire_replication::PgWireError) -> Error {
    let class = if e.is_transient() || e.is_io() {
        ErrorClass::Transient
    } else {
        ErrorClass::NeedsOperator
    };
    let text = e.to_string();
    let mut err = Error::operator(format!(
        "could not {what} on {endpoint}: {}",
        lowercase_first(&text)
    ));
    err.class = class;
    if e.is_auth() {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some(
            "check the user and the password; the user needs the REPLICATION attribute".into(),
        );
    } else if text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
        || text.contains("REPLICATION attribute")
    {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some("grant it with ALTER ROLE ... REPLICATION (the attribute is not inherited through role membership)".into());
    } else if text.contains("pg_hba.conf") {
        err.class = ErrorClass::NeedsOperator;
        err.hint = Some("allow the user in pg_hba.conf for this database (logical replication matches the database name, not the keyword replication)".into());
    }
    err
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn config(
    params: &ConnParams,
    slot: &str,
    publication: &str,
    start: Lsn,
    application_name: &str,
) -> ReplicationConfig {
    let password = params
        .password
        .as_ref()
        .map(|p| p.expose().to_string())
        .unwrap_or_default();
    ReplicationConfig::new(
        params.host.clone(),
        params.user.clone(),
        password,
        params.dbname.clone(),
        slot.to_string(),
        publication.to_string(),
    )
    .with_port(params.port)
    .with_tls(TlsConfig::disabled())
    .with_start_lsn(pgwire_replication::Lsn::from_u64(start.0))
    .with_options(session_options(params))
    .with_application_name(application_name.to_string())
    .with_status_interval(std::time::Duration::from_millis(250))
    .with_wakeup_interval(std::time::Duration::from_secs(5))
    .with_buffer_size(8192)
}

impl ReplicationSession {
    /// Open a replication session (`replication=database`) that waits for commands.
    pub async fn connect(
        params: &ConnParams,
        slot: &str,
        publication: &str,
        start: Lsn,
        application_name: &str,
    ) -> Result<Self> {
        let endpoint = params.endpoint();
        let cfg = config(params, slot, publication, start, application_name);
        let limit = crate::pg_conn::connect_timeout(params);
        let open = async {
            let mut client = ReplicationClient::connect_gated(cfg)
                .await
                .map_err(|e| wire_error("open a replication connection", &endpoint, e))?;
            // Prove the session is up (and authenticated) before handing it out.
            client
                .identify_system()
                .await
                .map_err(|e| wire_error("open a replication connection", &endpoint, e))?;
            Ok::<_, Error>(client)
        };
        let client = tokio::time::timeout(limit, open)
            .await
            .map_err(|_| crate::pg_conn::timeout_error(params, limit))??;
        Ok(Self { client, endpoint })
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
        let rows = self.client.simple_query(&sql).await.map_err(|e| {
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

    /// Start streaming from the slot. `confirmed` is what the target has durably applied:
    /// it is what the slot is told until the caller confirms more.
    pub async fn start(mut self) -> Result<ReplicationStream> {
        self.client
            .start()
            .await
            .map_err(|e| wire_error("start replication", &self.endpoint, e))?;
        self.client
            .wait_started()
            .await
            .map_err(|e| wire_error("start replication", &self.endpoint, e))?;
        Ok(ReplicationStream {
            client: self.client,
            endpoint: self.endpoint,
            in_stream: false,
            last_confirm: Lsn::ZERO,
        })
    }
}

/// A started replication stream.
pub struct ReplicationStream {
    client: ReplicationClient,
    endpoint: String,
    in_stream: bool,
    last_confirm: Lsn,
}

impl ReplicationStream {
    /// The next event; `None` when the server ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            let event = self
                .client
                .recv()
                .await
                .map_err(|e| wire_error("receive the replication stream", &self.endpoint, e))?;
            let Some(event) = event else { return Ok(None) };
            let out = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => StreamEvent::Begin(Begin {
                    final_lsn: to_lsn(final_lsn),
                    commit_timestamp: commit_time_micros,
                    xid,
                }),
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => StreamEvent::Commit(Commit {
                    flags: 0,
                    commit_lsn: to_lsn(lsn),
                    end_lsn: to_lsn(end_lsn),
                    commit_timestamp: commit_time_micros,
                }),
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = decode::decode_bytes(&data, self.in_stream).map_err(|e| {
                        Error::operator(format!("could not decode the replication stream: {e}"))
                            .hint("this is a bug in cutover or an unsupported server; report it with the server version")
                    })?;
                    match &msg {
                        LogicalMessage::StreamStart(_) => self.in_stream = true,
                        LogicalMessage::StreamStop => self.in_stream = false,
                        _ => {}
                    }
                    StreamEvent::Message(msg)
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => StreamEvent::KeepAlive {
                    wal_end: to_lsn(wal_end),
                },
                // Logical decoding messages (pg_logical_emit_message) carry no row changes.
                ReplicationEvent::Message { .. } => continue,
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            };
            return Ok(Some(out));
        }
    }

    /// Tell the server that everything up to `lsn` is durable on the target. Monotonic;
    /// sent on the session's next status update (within 250 ms, or at once when the
    /// server asks).
    pub fn confirm(&mut self, lsn: Lsn) {
        self.last_confirm = self.last_confirm.max(lsn);
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
    }

    /// The last position the server was told about in a standby status update.
    pub fn confirmed_to_server(&self) -> Lsn {
        to_lsn(self.client.metrics().last_applied_lsn())
    }

    /// The server's WAL end as last seen on the stream.
    pub fn server_wal_end(&self) -> Lsn {
        to_lsn(self.client.metrics().last_wal_end())
    }

    /// End the stream cleanly (CopyDone), after waiting (up to `grace`) for the last
    /// confirmation to reach the server.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        let want = self.pending_confirm();
        let deadline = tokio::time::Instant::now() + grace;
        while self.confirmed_to_server() < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.client.shutdown().await;
    }

    fn pending_confirm(&self) -> Lsn {
        self.last_confirm
    }
}
