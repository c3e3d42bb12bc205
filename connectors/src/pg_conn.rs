//! Ordinary (non-replication) connections to the source and the target.
//!
//! Every session we open pins the settings that change how values print, so that text
//! read from one server means the same on another and checksums do not depend on either
//! server's defaults (hard case 22), and sets `search_path` to `pg_catalog` so nothing we
//! run resolves to an object someone planted in `public` (CVE-2020-14349's class).

use std::time::Duration;

use cutover_config::{ConnParams, SslMode};
use tokio_postgres::{Client, NoTls};

use crate::error::{Error, Result, pg_cause};

/// `-c` settings sent at connection start on every session, replication ones included.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c bytea_output=hex -c standard_conforming_strings=on \
     -c client_min_messages=warning -c search_path=pg_catalog";

/// The startup `options` for a session: our pinned settings, then the user's own.
pub fn session_options(params: &ConnParams) -> String {
    match &params.options {
        Some(user) if !user.trim().is_empty() => format!("{SESSION_OPTIONS} {user}"),
        _ => SESSION_OPTIONS.to_string(),
    }
}

/// TLS is not supported yet: the modes that require it are refused.
fn refuse_tls(params: &ConnParams) -> Result<()> {
    if matches!(
        params.sslmode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    ) {
        return Err(Error::operator(format!(
            "sslmode={} is not supported yet for {}",
            sslmode_name(params.sslmode),
            params.endpoint()
        ))
        .hint("connect over a private network or a unix socket with sslmode=disable or prefer"));
    }
    Ok(())
}

/// A tokio-postgres configuration for `params`, tagged with `application_name`.
pub fn pg_config(params: &ConnParams, application_name: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(application_name)
        .options(session_options(params))
        .connect_timeout(params.connect_timeout.unwrap_or(Duration::from_secs(10)))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if let Some(password) = &params.password {
        cfg.password(password.expose());
    }
    cfg.ssl_mode(match params.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    cfg
}

/// Connect and spawn the connection task. Failures name the endpoint and the cause
/// (refused, timeout, authentication) and never the password.
pub async fn connect(params: &ConnParams, application_name: &str) -> Result<Client> {
    refuse_tls(params)?;
    let cfg = pg_config(params, application_name);
    // connect_timeout bounds the TCP connect only; a server that accepts and then says
    // nothing would hang the startup forever, so the whole connect gets the same bound.
    let limit = connect_timeout(params);
    let (client, connection) = match tokio::time::timeout(limit, cfg.connect(NoTls)).await {
        Ok(result) => result.map_err(|e| connect_error(params, &e))?,
        Err(_) => return Err(timeout_error(params, limit)),
    };
    let endpoint = params.endpoint();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(endpoint = %endpoint, error = %pg_cause(&e), "connection closed");
        }
    });
    Ok(client)
}

/// How long one connection attempt may take, startup and authentication included.
pub fn connect_timeout(params: &ConnParams) -> Duration {
    params.connect_timeout.unwrap_or(Duration::from_secs(10))
}

/// The error for a connection attempt that took longer than `limit`.
pub fn timeout_error(params: &ConnParams, limit: Duration) -> Error {
    Error::transient(format!(
        "could not connect to {} as user \"{}\": timed out after {}s",
        params.endpoint(),
        params.user,
        limit.as_secs_f64()
    ))
    .hint("check the host, the port and any firewall between cutover and the server; connect_timeout in the url sets the limit")
}

fn sslmode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// An ordinary session on our own protocol code instead of tokio-postgres, for the
/// copy's relay ([`wire::relay_copy`]): the same settings, the same bound on the whole
/// connect, the same refusal of the sslmodes that need TLS.
pub async fn connect_raw(
    params: &ConnParams,
    application_name: &str,
) -> Result<crate::pg_source::wire::Connection> {
    use crate::pg_source::wire;
    refuse_tls(params)?;
    let endpoint = params.endpoint();
    let what = format!("connect as user \"{}\"", params.user);
    let open = wire::connect(params, application_name, false);
    let limit = connect_timeout(params);
    match tokio::time::timeout(limit, open).await {
        Ok(result) => result.map_err(|e| {
            let auth = matches!(&e, wire::WireError::Auth(_))
                || matches!(&e, wire::WireError::Server(s) if s.code.starts_with("28") || s.code == "3D000");
            let mut e = Error::from_wire(&what, &endpoint, e);
            if auth {
                e.class = crate::error::ErrorClass::NeedsOperator;
            }
            e
        }),
        Err(_) => Err(timeout_error(params, limit)),
    }
}

/// The error for a failed connection attempt, with a hint that fits the cause.
pub fn connect_error(params: &ConnParams, err: &tokio_postgres::Error) -> Error {
    let cause = pg_cause(err);
    let endpoint = params.endpoint();
    let mut e = Error::from_pg("connect", &endpoint, err);
    e.primary = format!(
        "could not connect to {endpoint} as user \"{}\": {cause}",
        params.user
    );
    let hint = if cause.contains("refused") {
        Some("check that the server is running and accepts TCP connections on that host and port")
    } else if cause.contains("timed out") || cause.contains("timeout") {
        Some("check the host, the port and any firewall between cutover and the server")
    } else if cause.contains("password") || cause.contains("authentication") {
        Some("check the user and the password (password_env, PGPASSWORD or ~/.pgpass)")
    } else if cause.contains("does not exist") {
        Some("check the database and user names in the url")
    } else {
        None
    };
    // Authentication and missing databases need an operator; the rest may pass.
    if cause.contains("authentication") || cause.contains("does not exist") {
        e.class = crate::error::ErrorClass::NeedsOperator;
    }
    if let Some(h) = hint {
        e.hint = Some(h.to_string());
    }
    e
}
