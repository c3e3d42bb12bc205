//! The `cutover` daemon: CLI, supervisor, HTTP API.

pub mod anchor;
pub mod api;
pub mod api_client;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod demo;
pub mod job;
pub mod metrics;
pub mod progress;
pub mod ready;
pub mod run;
pub mod status;
pub mod teardown;
pub mod verifier;
pub mod verify;
