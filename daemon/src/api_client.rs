//! `cutover status` and `cutover ready`: a minimal HTTP/1.1 client for the daemon's API.
//!
//! Why hand-written: the client needs one request shape (`GET`, `Connection: close`, an
//! optional bearer token) against one server we also write, and pulling in an HTTP client
//! stack (hyper client, TLS, connection pools) for that would dwarf the feature. The
//! client reads the whole answer, parses the status line and headers, undoes chunked
//! transfer-encoding when present, and hands back the JSON body.
//!
//! Every failure is one line in PostgreSQL's style with a hint, and says which address
//! was tried, because the usual problem is "the daemon is not where you think it is".
//! The token is sent, never printed: messages name the variable it came from.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cutover_config::{JobSpec, Secret};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::{READY_PATH, STATUS_PATH};
use crate::cli::{ApiArgs, DEFAULT_API_ADDR, Outcome, ReadyArgs, StatusArgs, format_duration};
use crate::ready::format_seconds;

/// Environment variable holding the API token when no `--config` names another one.
pub const TOKEN_ENV: &str = "CUTOVER_API_TOKEN";

/// Interval between polls of `cutover ready --wait`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Time allowed to establish a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer accepted (a status document with many thousands of tables fits).
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

const HINT_RUNNING: &str = "is \"cutover run\" running? pass --api or --config";

/// Where the daemon's API is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// The bearer token, if one was found.
    pub token: Option<Secret>,
    /// Where the token is (or would be) read from, for messages: a variable name.
    pub token_source: String,
}

impl Endpoint {
    /// An endpoint at `addr` (`host:port`, `host` alone means port 7432), with an optional
    /// token.
    pub fn new(addr: &str, token: Option<Secret>) -> anyhow::Result<Self> {
        Ok(Self {
            addr: normalize_addr(addr)?,
            token,
            token_source: TOKEN_ENV.to_string(),
        })
    }

    /// Resolves `--api` and `--config` as the contract says: `--api`, else the `[api]
    /// listen` address of the `--config` job file, else 127.0.0.1:7432. The token comes
    /// from the variable named by `[api] token_env` of `--config`, else
    /// `CUTOVER_API_TOKEN`.
    pub fn from_args(args: &ApiArgs) -> anyhow::Result<Self> {
        let spec = args.config.as_deref().map(load_job).transpose()?;
        let addr = match (&args.api, &spec) {
            (Some(addr), _) => normalize_addr(addr)?,
            (None, Some(spec)) => dialable(spec.api.listen).to_string(),
            (None, None) => DEFAULT_API_ADDR.to_string(),
        };
        let (var, token_source) = match (&spec, args.config.as_deref()) {
            (Some(spec), Some(path)) if spec.api.token_env.is_some() => {
                let var = spec.api.token_env.clone().unwrap_or_default();
                let source = format!("{var} (named by [api] token_env in {})", path.display());
                (var, source)
            }
            _ => (TOKEN_ENV.to_string(), TOKEN_ENV.to_string()),
        };
        let token = match std::env::var(&var) {
            Ok(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => None,
        };
        if let Some(token) = &token
            && !token.expose().bytes().all(|b| b.is_ascii_graphic())
        {
            anyhow::bail!(
                "the API token in {token_source} contains spaces or control characters; \
                 hint: set it to the daemon's token exactly, without quotes or a line break"
            );
        }
        Ok(Self {
            addr,
            token,
            token_source,
        })
    }
}

/// Reads the job file named by `--config` (errors name the file, line and a fix).
fn load_job(path: &Path) -> anyhow::Result<JobSpec> {
    Ok(JobSpec::load(path)?)
}

/// A listen address as a client dials it: a wildcard address (`0.0.0.0`, `::`) becomes
/// the loopback address of the same family.
fn dialable(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match listen {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// `http://host:port/` → `host:port`; `host` → `host:7432`.
fn normalize_addr(given: &str) -> anyhow::Result<String> {
    let trimmed = given.trim();
    if trimmed.starts_with("https://") {
        anyhow::bail!(
            "invalid --api address \"{given}\": the cutover API speaks plain HTTP; \
             hint: pass host:port, and put a TLS proxy in front if the API leaves the host"
        );
    }
    let bare = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    let bare = bare.trim_end_matches('/');
    if bare.is_empty() || bare.contains('/') || bare.contains(char::is_whitespace) {
        anyhow::bail!(
            "invalid --api address \"{given}\"; hint: pass host:port, e.g. --api 127.0.0.1:7432"
        );
    }
    if bare.parse::<SocketAddr>().is_ok() {
        return Ok(bare.to_string());
    }
    let has_port = bare
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if has_port {
        return Ok(bare.to_string());
    }
    if bare.contains(':') && !bare.starts_with('[') {
        anyhow::bail!(
            "invalid --api address \"{given}\"; hint: pass host:port, with an IPv6 \
             address in brackets: [::1]:7432"
        );
    }
    let port = DEFAULT_API_ADDR.rsplit_once(':').map_or("7432", |(_, p)| p);
    Ok(format!("{bare}:{port}"))
}

/// What kind of failure a [`ClientError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorKind {
    /// No connection, or the connection broke or stalled: maybe the daemon is
    /// (re)starting. `ready --wait` keeps polling.
    Unreachable,
    /// The daemon refused the token.
    Unauthorized,
    /// Something answered, but not as the cutover API does.
    Protocol,
}

/// A failed API request. Its `Display` is the whole one-line message, hint included.
#[derive(Debug, Clone)]
pub struct ClientError {
    pub kind: ClientErrorKind,
    message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    fn unreachable(message: String) -> Self {
        Self {
            kind: ClientErrorKind::Unreachable,
            message,
        }
    }

    fn protocol(message: String) -> Self {
        Self {
            kind: ClientErrorKind::Protocol,
            message,
        }
    }
}

/// An HTTP answer: status code, headers (names lower-cased) and the decoded body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` over HTTP/1.1 with `Connection: close`, sending the bearer token
/// when given. Any HTTP status is a success here; callers judge it.
pub async fn http_get(
    addr: &str,
    path: &str,
    token: Option<&Secret>,
) -> Result<HttpResponse, ClientError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, "GET", path, token)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::unreachable(format!(
            "the cutover API at {addr} did not answer within {}; hint: {HINT_RUNNING}",
            format_duration(REQUEST_TIMEOUT)
        ))),
    }
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&Secret>,
) -> Result<HttpResponse, ClientError> {
    let cannot_reach = |reason: String| {
        let hint = if reason.contains("lookup") {
            "check the host name in --api or in [api] listen of --config"
        } else {
            HINT_RUNNING
        };
        ClientError::unreachable(format!(
            "cannot reach the cutover API at {addr}: {reason}; hint: {hint}"
        ))
    };
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(cannot_reach(io_reason(&e))),
        Err(_) => {
            return Err(cannot_reach(format!(
                "connection timed out after {}",
                format_duration(CONNECT_TIMEOUT)
            )));
        }
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cutover/{}\r\n\
         Accept: application/json\r\nContent-Length: 0\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(token) = token {
        request.push_str("Authorization: Bearer ");
        request.push_str(token.expose());
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let lost = |e: io::Error| {
        ClientError::unreachable(format!(
            "lost the connection to the cutover API at {addr}: {}; hint: {HINT_RUNNING}",
            io_reason(&e)
        ))
    };
    stream.write_all(request.as_bytes()).await.map_err(lost)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(lost)?;
    if raw.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(ClientError::protocol(format!(
            "the answer from {addr} is larger than {MAX_RESPONSE_BYTES} bytes; \
             hint: is {addr} the cutover API? check --api"
        )));
    }
    parse_response(&raw).map_err(|what| {
        ClientError::protocol(format!(
            "the answer from {addr} is not valid HTTP: {what}; \
             hint: is {addr} the cutover API? check --api"
        ))
    })
}

/// An I/O error as a lower-case reason without the `(os error N)` suffix.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let fixed = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset by peer",
        K::ConnectionAborted => "connection aborted",
        K::TimedOut => "connection timed out",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        K::AddrNotAvailable => "address not available",
        K::UnexpectedEof => "connection closed before the answer was complete",
        _ => "",
    };
    if !fixed.is_empty() {
        return fixed.to_string();
    }
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".to_string(),
    }
}

/// Parses a whole HTTP/1.x response (status line, headers, body up to EOF).
fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "unexpected status line \"{}\"",
            truncate(status_line)
        ));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("unexpected status line \"{}\"", truncate(status_line)))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line \"{}\"", truncate(line)))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[head_end + 4..];
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        decode_chunked(rest)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("invalid Content-Length \"{}\"", truncate(length)))?;
        if rest.len() < length {
            return Err(format!("body ends after {} of {length} bytes", rest.len()));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(response)
}

/// Undoes `Transfer-Encoding: chunked` (extensions and trailers are ignored).
fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("truncated chunk size line")?;
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("invalid chunk size \"{}\"", truncate(size_text)))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            return Err("truncated chunk".to_string());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn truncate(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// Gets `path` and parses its JSON body, accepting the HTTP statuses in `accepted`.
async fn get_json(
    endpoint: &Endpoint,
    path: &str,
    accepted: &[u16],
) -> Result<(u16, Value), ClientError> {
    let addr = &endpoint.addr;
    let response = http_get(addr, path, endpoint.token.as_ref()).await?;
    let parsed: Result<Value, _> = serde_json::from_slice(&response.body);
    if response.status == 401 {
        let hint = if endpoint.token.is_some() {
            format!(
                "the token in {} is not the daemon's; set it to the token the daemon reads \
                 from its [api] token_env variable",
                endpoint.token_source
            )
        } else {
            format!(
                "the daemon requires a token: set {}, or pass --config so the variable \
                 named by [api] token_env is used",
                endpoint.token_source
            )
        };
        let reason = parsed
            .as_ref()
            .ok()
            .and_then(|v| v["error"].as_str())
            .unwrap_or("unauthorized")
            .to_string();
        return Err(ClientError {
            kind: ClientErrorKind::Unauthorized,
            message: format!(
                "the cutover API at {addr} refused the request: {reason}; hint: {hint}"
            ),
        });
    }
    if !accepted.contains(&response.status) {
        let (error, hint) = match &parsed {
            Ok(v) => (
                v["error"].as_str().map(str::to_string),
                v["hint"].as_str().map(str::to_string),
            ),
            Err(_) => (None, None),
        };
        let error = error.map_or_else(String::new, |e| format!(": {e}"));
        let hint = hint.unwrap_or_else(|| format!("is {addr} the cutover API? check --api"));
        return Err(ClientError::protocol(format!(
            "the cutover API at {addr} answered HTTP {} to GET {path}{error}; hint: {hint}",
            response.status
        )));
    }
    match parsed {
        Ok(value) if value.is_object() => Ok((response.status, value)),
        _ => Err(ClientError::protocol(format!(
            "the answer from {addr} to GET {path} is not a JSON object; \
             hint: is {addr} the cutover API? check --api"
        ))),
    }
}

/// `GET /v1/status`: the status document.
/// `POST /v1/verify`: the daemon runs an anchored pass and answers with its report (this
/// waits for the whole pass). `Ok(None)`: the daemon answered but could not verify (the
/// message says why).
pub async fn request_verify(endpoint: &Endpoint) -> Result<Result<Value, String>, ClientError> {
    let addr = &endpoint.addr;
    let response = exchange(
        addr,
        "POST",
        crate::api::VERIFY_PATH,
        endpoint.token.as_ref(),
    )
    .await?;
    let parsed: Value = serde_json::from_slice(&response.body).map_err(|_| {
        ClientError::protocol(format!(
            "the answer from {addr} to POST {} is not JSON; hint: is {addr} the cutover API?",
            crate::api::VERIFY_PATH
        ))
    })?;
    match response.status {
        200 => Ok(Ok(parsed)),
        401 => Err(ClientError {
            kind: ClientErrorKind::Unauthorized,
            message: format!(
                "the cutover API at {addr} refused the request: {}; hint: set {} to the daemon's token",
                parsed["error"].as_str().unwrap_or("unauthorized"),
                endpoint.token_source
            ),
        }),
        _ => Ok(Err(format!(
            "{}; hint: {}",
            parsed["error"]
                .as_str()
                .unwrap_or("the daemon could not verify"),
            parsed["hint"].as_str().unwrap_or("see cutover status")
        ))),
    }
}

pub async fn fetch_status(endpoint: &Endpoint) -> Result<Value, ClientError> {
    get_json(endpoint, STATUS_PATH, &[200])
        .await
        .map(|(_, doc)| doc)
}

/// The answer of `GET /v1/ready`.
#[derive(Debug, Clone)]
pub struct ReadyAnswer {
    /// 200 (ready) or 503 (not ready).
    pub http_status: u16,
    pub ready: bool,
    /// The whole readiness document.
    pub document: Value,
}

/// `GET /v1/ready`: 200 and 503 are both answers.
pub async fn fetch_ready(endpoint: &Endpoint) -> Result<ReadyAnswer, ClientError> {
    let (http_status, document) = get_json(endpoint, READY_PATH, &[200, 503]).await?;
    let Some(ready) = document["ready"].as_bool() else {
        return Err(ClientError::protocol(format!(
            "the answer from {} to GET {READY_PATH} has no \"ready\" field; \
             hint: is {} the cutover API? check --api",
            endpoint.addr, endpoint.addr
        )));
    };
    Ok(ReadyAnswer {
        http_status,
        ready,
        document,
    })
}

/// `cutover status`.
pub async fn status(args: &StatusArgs) -> anyhow::Result<Outcome> {
    let endpoint = Endpoint::from_args(&args.api)?;
    let doc = fetch_status(&endpoint).await?;
    let text = if args.json {
        to_json_line(&doc)?
    } else {
        render_status(&doc)
    };
    print_stdout(&text)?;
    Ok(Outcome::Success)
}

/// `cutover ready`: exit 0 when ready, 1 when not; `--wait` polls until ready or the
/// deadline. A daemon that cannot be reached at the deadline is an error (exit 2).
pub async fn ready(args: &ReadyArgs) -> anyhow::Result<Outcome> {
    let endpoint = Endpoint::from_args(&args.api)?;
    let deadline = args.wait.map(|wait| Instant::now() + wait);
    let answer = loop {
        let attempt = fetch_ready(&endpoint).await;
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match attempt {
            Ok(answer) if answer.ready => break answer,
            Err(e) if e.kind != ClientErrorKind::Unreachable => return Err(e.into()),
            Ok(answer) if remaining.is_none_or(|r| r.is_zero()) => break answer,
            Err(e) if remaining.is_none_or(|r| r.is_zero()) => return Err(e.into()),
            Ok(answer) => {
                tracing::debug!(unmet = %answer.document["unmet"], "not ready yet");
            }
            Err(e) => tracing::debug!("not reachable yet: {e}"),
        }
        let pause = remaining.map_or(POLL_INTERVAL, |r| r.min(POLL_INTERVAL));
        tokio::time::sleep(pause).await;
    };
    let text = if args.json {
        to_json_line(&answer.document)?
    } else {
        render_ready(&answer.document, args.wait)
    };
    print_stdout(&text)?;
    Ok(if answer.ready {
        Outcome::Success
    } else {
        Outcome::Negative
    })
}

fn to_json_line(doc: &Value) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(doc).context("cannot print the JSON document")?;
    text.push('\n');
    Ok(text)
}

fn print_stdout(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The text of `cutover ready` (without `--json`).
pub fn render_ready(doc: &Value, waited: Option<Duration>) -> String {
    let gates: Vec<&str> = doc["checked"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if doc["ready"].as_bool() == Some(true) {
        return if gates.is_empty() {
            "ready\n".to_string()
        } else {
            format!("ready: every gate holds ({})\n", gates.join(", "))
        };
    }
    let unmet = doc["unmet"].as_array().cloned().unwrap_or_default();
    let after = waited.map_or_else(String::new, |w| format!(" after {}", format_duration(w)));
    let of = if gates.is_empty() {
        String::new()
    } else {
        format!(" of {}", gates.len())
    };
    let plural = if unmet.len() == 1 { "gate" } else { "gates" };
    let mut text = format!("not ready{after}: {}{of} {plural} unmet\n", unmet.len());
    let width = unmet
        .iter()
        .filter_map(|g| g["gate"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for gate in &unmet {
        let name = gate["gate"].as_str().unwrap_or("?");
        let detail = gate["detail"].as_str().unwrap_or("");
        text.push_str(&format!("  {name:<width$}  {detail}\n"));
    }
    text
}

/// The text of `cutover status` (without `--json`).
pub fn render_status(doc: &Value) -> String {
    let unknown = || "unknown".to_string();
    let s = |key: &str| doc[key].as_str().map_or_else(unknown, str::to_string);
    let lag = match (doc["lag_bytes"].as_u64(), doc["lag_seconds"].as_f64()) {
        (None, None) => unknown(),
        (bytes, secs) => format!(
            "{} bytes, {}",
            bytes.map_or_else(unknown, |b| b.to_string()),
            secs.map_or_else(unknown, format_seconds)
        ),
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("job", s("job")),
        ("phase", s("phase")),
        ("source LSN", s("source_lsn")),
        ("applied LSN", s("applied_lsn")),
        ("lag", lag),
    ];
    if let (Some(txns), Some(changes)) = (
        doc["applied_transactions"].as_u64(),
        doc["applied_rows"].as_u64(),
    ) {
        rows.push((
            "applied",
            format!("{txns} transactions, {changes} rows since start"),
        ));
    }
    if let Some(bytes) = doc["slot_retained_bytes"].as_u64() {
        rows.push(("slot retains", format!("{} of WAL", format_bytes(bytes))));
    }
    let verification = &doc["last_verification"];
    let verified = if verification.is_object() {
        let at = verification["lsn"]
            .as_str()
            .map_or_else(String::new, |l| format!(" at {l}"));
        let finished = verification["finished_at"].as_str().unwrap_or("?");
        if verification["tables_equal"].as_bool() == Some(true) {
            format!("equal{at}, finished {finished}")
        } else {
            let n = verification["differences"].as_u64().unwrap_or(0);
            format!("{n} differences{at}, finished {finished}")
        }
    } else {
        "never".to_string()
    };
    rows.push(("verified", verified));
    if let Some(error) = doc["error"].as_str() {
        rows.push(("error", error.to_string()));
    }
    if let Some(updated) = doc["updated_at"].as_str().filter(|u| !u.is_empty()) {
        rows.push(("updated", updated.to_string()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (key, value) in &rows {
        text.push_str(&format!("{key:<width$}  {value}\n"));
    }

    let tables = doc["tables"].as_array().cloned().unwrap_or_default();
    if tables.is_empty() {
        text.push_str("\nno tables yet\n");
        return text;
    }
    let mut grid: Vec<[String; 4]> = vec![[
        "SOURCE".into(),
        "TARGET".into(),
        "ROWS COPIED".into(),
        "SNAPSHOT".into(),
    ]];
    for t in &tables {
        let done = t["snapshot_done"].as_bool() == Some(true);
        grid.push([
            t["source"].as_str().unwrap_or("?").to_string(),
            t["target"].as_str().unwrap_or("?").to_string(),
            t["rows_copied"]
                .as_u64()
                .map_or_else(|| "?".into(), |n| n.to_string()),
            if done { "done" } else { "copying" }.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| grid.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    text.push('\n');
    for row in &grid {
        text.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        ));
    }
    let done = tables
        .iter()
        .filter(|t| t["snapshot_done"].as_bool() == Some(true))
        .count();
    text.push_str(&format!("\n{done} of {} tables copied\n", tables.len()));
    text
}

/// `1536` → `1.5 KiB`.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalize() {
        assert_eq!(normalize_addr("127.0.0.1:7432").unwrap(), "127.0.0.1:7432");
        assert_eq!(normalize_addr("http://db1:80/").unwrap(), "db1:80");
        assert_eq!(normalize_addr("db1").unwrap(), "db1:7432");
        assert_eq!(normalize_addr("[::1]:9000").unwrap(), "[::1]:9000");
        assert!(normalize_addr("https://db1:80").is_err());
        assert!(normalize_addr("db1:80/v1").is_err());
        assert!(normalize_addr("").is_err());
    }

    #[test]
    fn wildcard_listen_addresses_dial_loopback() {
        assert_eq!(
            dialable("0.0.0.0:7432".parse().unwrap()).to_string(),
            "127.0.0.1:7432"
        );
        assert_eq!(dialable("[::]:1".parse().unwrap()).to_string(), "[::1]:1");
        assert_eq!(
            dialable("10.1.2.3:5".parse().unwrap()).to_string(),
            "10.1.2.3:5"
        );
    }

    #[test]
    fn responses_parse_with_length_chunked_or_eof() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));

        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: x\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, b"{\"a\":1}");

        let r = parse_response(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nhello").unwrap();
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("SERVER"), Some("x"));

        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
                .is_err()
        );
    }

    #[test]
    fn io_reasons_are_lower_case_without_os_error() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&refused), "connection refused");
        let other = io::Error::other("Something Odd (os error 99)");
        assert_eq!(io_reason(&other), "something Odd");
    }

    #[test]
    fn ready_text_lists_unmet_gates() {
        let doc = serde_json::json!({
            "ready": false,
            "checked": ["streaming", "snapshot", "lag"],
            "unmet": [
                {"gate": "streaming", "detail": "phase is \"snapshot\""},
                {"gate": "lag", "detail": "lag is not known yet"},
            ],
        });
        let text = render_ready(&doc, Some(Duration::from_secs(30)));
        assert_eq!(
            text,
            "not ready after 30s: 2 of 3 gates unmet\n  streaming  phase is \"snapshot\"\n  \
             lag        lag is not known yet\n"
        );
        let ok = serde_json::json!({"ready": true, "unmet": [], "checked": ["lag"]});
        assert_eq!(render_ready(&ok, None), "ready: every gate holds (lag)\n");
    }

    #[test]
    fn status_text_shows_lsns_lag_and_tables() {
        let doc = serde_json::json!({
            "job": "shop", "phase": "snapshot", "source_lsn": "0/16B6C50",
            "applied_lsn": null, "lag_bytes": 1024, "lag_seconds": 1.5,
            "tables": [
                {"source": "public.orders", "target": "v2.orders", "rows_copied": 1200,
                 "snapshot_done": true},
                {"source": "public.items", "target": "v2.items", "rows_copied": 7,
                 "snapshot_done": false},
            ],
            "last_verification": null, "applied_transactions": 3, "applied_rows": 9,
            "slot_retained_bytes": 3145728, "error": null, "updated_at": "",
        });
        let text = render_status(&doc);
        assert!(text.contains("phase         snapshot\n"), "{text}");
        assert!(text.contains("source LSN    0/16B6C50\n"), "{text}");
        assert!(text.contains("applied LSN   unknown\n"), "{text}");
        assert!(text.contains("lag           1024 bytes, 1.5s\n"), "{text}");
        assert!(text.contains("3.0 MiB of WAL"), "{text}");
        assert!(text.contains("verified      never\n"), "{text}");
        assert!(
            text.contains("public.orders  v2.orders         1200  done\n"),
            "{text}"
        );
        assert!(
            text.contains("public.items   v2.items             7  copying\n"),
            "{text}"
        );
        assert!(text.contains("1 of 2 tables copied"), "{text}");
    }

    #[test]
    fn bytes_format_in_binary_units() {
        assert_eq!(format_bytes(10), "10 bytes");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
