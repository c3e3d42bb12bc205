//! The `cutover` daemon: CLI, supervisor, HTTP API.

pub mod cluster;
