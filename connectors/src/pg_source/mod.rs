//! The PostgreSQL source: provisioning (publication and slot), the replication stream,
//! and the pgoutput decoder.

pub mod client;
pub mod decode;
pub mod provision;
pub mod spool;
pub mod wire;
