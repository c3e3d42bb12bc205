//! `cutover teardown JOB.toml`: drop the job's slot and publication on the source, so no
//! WAL stays retained for a job that is over. Idempotent; refuses while a run of the job
//! holds the slot, unless `--force`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use cutover_config::JobSpec;
use cutover_connectors::pg_conn;
use cutover_connectors::pg_source::provision;
use serde::Serialize;

use crate::cli::{Outcome, TeardownArgs};

#[derive(Serialize)]
struct Report {
    job: String,
    slot: String,
    slot_dropped: bool,
    publication: String,
    publication_dropped: bool,
}

pub async fn teardown(args: &TeardownArgs) -> anyhow::Result<Outcome> {
    let spec = JobSpec::load(&args.job)?;
    let params = spec.source.conn.resolve()?;
    let app = format!("cutover/{}/teardown", spec.name);
    let client = pg_conn::connect(&params, &app)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let slot = provision::object_name(&spec.name);
    let publication = slot.clone();

    if let Some(state) = provision::slot_state(&client, &slot)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        && state.active
    {
        let pid = state.active_pid.unwrap_or(0);
        if !args.force {
            anyhow::bail!(
                "replication slot \"{slot}\" is in use by PID {pid}; hint: stop \"cutover run\" for job \"{}\" first, or pass --force to end that connection",
                spec.name
            );
        }
        client
            .query("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
            .await
            .with_context(|| {
                format!("could not end PID {pid} holding replication slot \"{slot}\"")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while provision::slot_state(&client, &slot)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .is_some_and(|s| s.active)
        {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "replication slot \"{slot}\" is still in use after ending PID {pid}; hint: run teardown again"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (slot_dropped, publication_dropped) = provision::drop_objects(&client, &slot, &publication)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = Report {
        job: spec.name.clone(),
        slot,
        slot_dropped,
        publication,
        publication_dropped,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let said = |dropped: bool| {
            if dropped {
                "dropped"
            } else {
                "absent (nothing to drop)"
            }
        };
        println!(
            "replication slot \"{}\": {}",
            report.slot,
            said(report.slot_dropped)
        );
        println!(
            "publication \"{}\": {}",
            report.publication,
            said(report.publication_dropped)
        );
        println!(
            "the target keeps its data and the bookkeeping schema \"cutover\"; drop it with DROP SCHEMA cutover CASCADE when the migration is over"
        );
    }
    Ok(Outcome::Success)
}
