//! The PostgreSQL source: provisioning (publication and slot), the initial snapshot,
//! and the pgoutput stream.

pub mod decode;
