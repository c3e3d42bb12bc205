//! `cutover run JOB.toml`: the job in the foreground, with its HTTP API, until SIGINT or
//! SIGTERM.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use cutover_config::{JobSpec, Secret};
use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::cli::Outcome;
use crate::job::{self, JobContext};
use crate::ready::ReadyConfig;
use crate::status::{JobStatus, StatusHandle};

/// Run the job in `path` until a signal stops it. A clean stop is exit 0; a job that
/// failed (or could not start) is an error.
pub async fn run_job(path: &Path) -> anyhow::Result<Outcome> {
    let spec = JobSpec::load(path)?;
    let source = spec.source.conn.resolve()?;
    let target = spec.target.conn.resolve()?;
    let prometheus = crate::metrics::install();
    let status = StatusHandle::new(JobStatus::new(&spec.name));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing the transaction in flight");
        let _ = stop_tx.send(true);
    });

    let token = match &spec.api.token_env {
        Some(var) => Some(Secret::new(std::env::var(var).with_context(|| {
            format!("environment variable {var} (named by [api] token_env) is not set; hint: export it, or remove token_env")
        })?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(spec.api.listen).await.with_context(|| {
        format!(
            "could not listen on {} for the HTTP API; hint: is another \"cutover run\" using it? set [api] listen",
            spec.api.listen
        )
    })?;
    let (barrier_tx, barrier_rx) = tokio::sync::mpsc::channel(4);
    let spec = Arc::new(spec);
    let ctx = JobContext {
        spec: spec.clone(),
        source,
        target,
        status: status.clone(),
        shutdown: stop_rx.clone(),
        barriers: Arc::new(tokio::sync::Mutex::new(barrier_rx)),
    };
    let verifier = crate::verifier::spawn(ctx.clone(), barrier_tx);
    let state = ApiState {
        status: status.clone(),
        ready_config: ReadyConfig::from(&spec.ready),
        prometheus,
        token,
        verifier: Some(verifier),
    };
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(api::serve(listener, state, async move {
        let _ = api_stop.wait_for(|s| *s).await;
    }));

    let progress = crate::progress::spawn(status);
    let result = job::run(ctx).await;
    if let Some(p) = progress {
        p.abort();
    }
    api.abort();
    match result {
        Ok(()) => Ok(Outcome::Success),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the job runs until killed; that is still safe.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
