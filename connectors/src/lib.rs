//! Everything in cutover that talks to a system: the PostgreSQL source (provisioning,
//! the initial snapshot, the pgoutput stream) and the PostgreSQL apply.

pub mod catalog;
pub mod error;
pub mod ident;
pub mod lsn;
pub mod pg_apply;
pub mod pg_conn;
pub mod pg_source;

pub use error::{Error, ErrorClass, Result};
pub use ident::{TableName, quote_ident, quote_literal};
pub use lsn::Lsn;
