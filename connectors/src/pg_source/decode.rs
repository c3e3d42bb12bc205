//! Decoder (and encoder) for PostgreSQL's `pgoutput` logical replication messages.
//!
//! # Why this decoder is ours
//!
//! The replication connection hands us the raw payload of every `XLogData` message; what is
//! inside is the `pgoutput` wire format described in the PostgreSQL manual, "Logical
//! Replication Message Formats". Everything cutover applies goes through this code, so we
//! want it small, auditable, and fitted to our needs: zero-copy column values (every row
//! change passes through [`decode_bytes`]), a precise error for every malformed input
//! (message name and byte offset), strict rejection of trailing garbage, and an exact
//! inverse ([`encode`]) so that tests and fixtures can produce real wire bytes. The
//! structs mirror the spec one-to-one and use the spec's field names, so the manual is the
//! documentation for this module.
//!
//! # Protocol versions
//!
//! * Version 1: Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate and
//!   Message (logical decoding message).
//! * Version 2: streaming of in-progress transactions: Stream Start, Stream Stop, Stream
//!   Commit and Stream Abort, plus a leading transaction id on Relation, Type, Insert,
//!   Update, Delete, Truncate and Message when they are sent between Stream Start and Stream
//!   Stop. The wire format does not mark those messages, so the caller tracks the streamed
//!   block and passes `in_stream` (true after Stream Start, false again after Stream Stop).
//! * Version 4's extension of Stream Abort (abort LSN and abort timestamp, sent when
//!   `streaming = parallel`) is accepted: the two trailing fields are optional.
//!
//! Version 3 (two-phase commit: Begin Prepare, Prepare, Commit Prepared, Rollback Prepared,
//! Stream Prepare) is not covered; those messages fail with
//! [`DecodeError::UnknownMessageType`]. Do not request `two_phase` on the slot.
//!
//! # The no-panic rule
//!
//! The input comes from the network, so decoding never panics, whatever the bytes: every
//! read is bounds-checked, there is no `unwrap`, `expect` or panicking indexing, lengths and
//! counts are checked before use, and preallocation is capped by the bytes that remain (a
//! column count of 65535 in a 10-byte buffer does not allocate 65535 entries). Malformed
//! input yields a [`DecodeError`]; so does any byte left over after a complete message,
//! except for the optional trailing fields the spec allows (Stream Abort). The property
//! tests at the bottom of this file check this with arbitrary bytes, every strict prefix of
//! valid messages, and mutated messages.

use std::fmt;

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// `B`: start of a transaction.
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: the transaction originated on another node.
    Origin(Origin),
    /// `R`: the description of a relation, sent before its first change.
    Relation(Relation),
    /// `Y`: the description of a non-builtin data type.
    Type(TypeMsg),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more relations were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(Message),
    /// `S`: start of a block of a streamed in-progress transaction (protocol 2).
    StreamStart(StreamStart),
    /// `E`: end of the current streamed block (protocol 2). Has no fields.
    StreamStop,
    /// `c`: a streamed transaction committed (protocol 2).
    StreamCommit(StreamCommit),
    /// `A`: a streamed (sub)transaction aborted (protocol 2).
    StreamAbort(StreamAbort),
}

/// Begin (`B`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The final LSN of the transaction.
    pub final_lsn: Lsn,
    /// Commit timestamp of the transaction, in microseconds since the PostgreSQL epoch
    /// (2000-01-01 00:00:00 UTC).
    pub commit_timestamp: i64,
    /// Xid of the transaction.
    pub xid: u32,
}

/// Commit (`C`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused (0). Kept as sent.
    pub flags: u8,
    /// The LSN of the commit.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp of the transaction, in microseconds since 2000-01-01.
    pub commit_timestamp: i64,
}

/// Origin (`O`). There can be several in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Name of the origin.
    pub name: String,
}

/// Relation (`R`): the columns of a relation as the publisher sends them. Generated columns
/// are not listed unless the publication publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// OID of the relation.
    pub oid: u32,
    /// Namespace (schema); the empty string stands for `pg_catalog`.
    pub namespace: String,
    /// Relation name.
    pub name: String,
    /// Replica identity setting of the relation (`relreplident` in `pg_class`).
    pub replica_identity: ReplicaIdentity,
    /// The columns, in the order the tuples carry them.
    pub columns: Vec<RelationColumn>,
}

/// Replica identity setting of a relation (`relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The byte `relreplident` uses for this setting.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The setting a `relreplident` byte stands for, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags for the column: 0, or [`RelationColumn::KEY`] when the column is part of the
    /// key (the replica identity).
    pub flags: u8,
    /// Name of the column.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier of the column (`atttypmod`); -1 when there is none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// The flag bit marking a column as part of the key.
    pub const KEY: u8 = 1;

    /// Whether the column is part of the key (replica identity).
    pub fn is_key(&self) -> bool {
        self.flags & Self::KEY != 0
    }
}

/// Type (`Y`): a non-builtin data type a following Relation refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// OID of the data type.
    pub oid: u32,
    /// Namespace (schema); the empty string stands for `pg_catalog`.
    pub namespace: String,
    /// Name of the data type.
    pub name: String,
}

/// Insert (`I`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// OID of the relation, as in its Relation message.
    pub oid: u32,
    /// The new tuple (marked `N` on the wire).
    pub new: TupleData,
}

/// Update (`U`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// OID of the relation, as in its Relation message.
    pub oid: u32,
    /// The old key (`K`, when the update changed a replica identity column) or the whole
    /// old tuple (`O`, with `REPLICA IDENTITY FULL`); absent otherwise.
    pub old: Option<OldTuple>,
    /// The new tuple (marked `N` on the wire). Unchanged TOASTed values come as
    /// [`ColumnValue::UnchangedToast`].
    pub new: TupleData,
}

/// Delete (`D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// OID of the relation, as in its Relation message.
    pub oid: u32,
    /// The old key (`K`) or, with `REPLICA IDENTITY FULL`, the whole old tuple (`O`).
    pub old: OldTuple,
}

/// The old-row part of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity columns; the other columns are [`ColumnValue::Null`].
    Key(TupleData),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// Truncate (`T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// OIDs of the truncated relations.
    pub oids: Vec<u32>,
}

impl Truncate {
    /// Option bit for `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit for `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// Whether the truncate was `CASCADE`.
    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// Whether the truncate was `RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// Message (`M`): a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Xid of the transaction; present only inside a streamed block (protocol 2).
    pub xid: Option<u32>,
    /// Flags: 0, or [`Message::TRANSACTIONAL`].
    pub flags: u8,
    /// The LSN of the logical decoding message.
    pub lsn: Lsn,
    /// The prefix of the logical decoding message.
    pub prefix: String,
    /// The content of the logical decoding message.
    pub content: Bytes,
}

impl Message {
    /// The flag bit of a transactional message.
    pub const TRANSACTIONAL: u8 = 1;

    /// Whether the message is transactional.
    pub fn transactional(&self) -> bool {
        self.flags & Self::TRANSACTIONAL != 0
    }
}

/// Stream Start (`S`, protocol 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// Xid of the transaction.
    pub xid: u32,
    /// Whether this is the first stream segment of the transaction (1 on the wire).
    pub first_segment: bool,
}

/// Stream Commit (`c`, protocol 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// Xid of the transaction.
    pub xid: u32,
    /// Flags; currently unused (0). Kept as sent.
    pub flags: u8,
    /// The LSN of the commit.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp of the transaction, in microseconds since 2000-01-01.
    pub commit_timestamp: i64,
}

/// Stream Abort (`A`, protocol 2; protocol 4 appends the abort LSN and timestamp when
/// streaming in parallel).
///
/// The two optional fields travel together: the decoder sets both or neither, and the
/// encoder writes them only when both are `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Xid of the transaction.
    pub xid: u32,
    /// Xid of the subtransaction (the same as `xid` for the top-level transaction).
    pub subxid: u32,
    /// The LSN of the abort (protocol 4, parallel streaming only).
    pub abort_lsn: Option<Lsn>,
    /// Abort timestamp, in microseconds since 2000-01-01 (protocol 4, parallel streaming
    /// only).
    pub abort_timestamp: Option<i64>,
}

/// TupleData: the column values of one row, in the column order of the Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData {
    /// One value per column.
    pub columns: Vec<ColumnValue>,
}

/// One column value of a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// `n`: the value is NULL.
    Null,
    /// `u`: an unchanged TOASTed value; the actual value is not sent.
    UnchangedToast,
    /// `t`: the value in text format.
    Text(Bytes),
    /// `b`: the value in binary format (`binary = true` on the subscription side).
    Binary(Bytes),
}

/// Why a `pgoutput` message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer has no bytes at all.
    #[error("pgoutput: empty message")]
    Empty,
    /// The first byte is not a message type this decoder knows.
    #[error("pgoutput: unknown message type {}", ByteLit(*.0))]
    UnknownMessageType(u8),
    /// The message ended before a field was complete. `offset` is where that field starts
    /// (for a string without its terminating NUL, where the string starts).
    #[error("pgoutput: truncated {message} message at byte {offset}")]
    Truncated {
        /// The spec's name of the message ("Insert", "Stream Commit", ...).
        message: &'static str,
        /// Offset, in the message, of the incomplete field.
        offset: usize,
    },
    /// Bytes follow a complete message.
    #[error("pgoutput: {count} trailing byte(s) after {message} message at byte {offset}")]
    TrailingBytes {
        /// The spec's name of the message.
        message: &'static str,
        /// Offset of the first extra byte (the length of the complete message).
        offset: usize,
        /// How many bytes are extra.
        count: usize,
    },
    /// A TupleData column kind other than `n`, `u`, `t`, `b`.
    #[error("pgoutput: unknown tuple column kind {}", ByteLit(*.0))]
    UnknownColumnKind(u8),
    /// A Relation's replica identity other than `d`, `n`, `f`, `i`.
    #[error("pgoutput: unknown replica identity {}", ByteLit(*.0))]
    UnknownReplicaIdentity(u8),
    /// Where a tuple part was expected, an unexpected marker (`N`, `K` or `O` expected).
    #[error("pgoutput: unexpected tuple marker {} in {message} message at byte {offset}",
        ByteLit(*.marker))]
    UnexpectedTupleMarker {
        /// The spec's name of the message.
        message: &'static str,
        /// The byte found.
        marker: u8,
        /// Its offset.
        offset: usize,
    },
    /// A negative Int32 length (column value or message content).
    #[error("pgoutput: negative length {length} in {message} message at byte {offset}")]
    NegativeLength {
        /// The spec's name of the message.
        message: &'static str,
        /// The length found.
        length: i32,
        /// Its offset.
        offset: usize,
    },
    /// A Stream Start whose first-segment flag is neither 0 nor 1.
    #[error("pgoutput: invalid first segment flag {0} in Stream Start message")]
    InvalidFirstSegment(u8),
    /// A string that is not valid UTF-8. `field` names it ("relation name", ...).
    #[error("pgoutput: invalid utf-8 in {field}")]
    InvalidUtf8 {
        /// Which string ("origin name", "relation namespace", "relation name",
        /// "column name", "type namespace", "type name", "message prefix").
        field: &'static str,
    },
}

/// Prints a protocol byte as `'x'` when it is a printable ASCII character, `0xNN` otherwise.
struct ByteLit(u8);

impl fmt::Display for ByteLit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_ascii_graphic() && b != b'\'' && b != b'\\' {
            write!(f, "'{}'", char::from(b))
        } else {
            write!(f, "0x{b:02x}")
        }
    }
}

/// Decodes one `pgoutput` message, copying `buf` once so that column values can share it.
/// Prefer [`decode_bytes`] when the payload already is a [`Bytes`].
///
/// `in_stream` must be true between Stream Start and Stream Stop (protocol 2), where
/// Relation, Type, Insert, Update, Delete, Truncate and Message carry a leading xid.
///
/// # Errors
///
/// A [`DecodeError`] when `buf` is not exactly one well-formed message: empty, unknown
/// type, truncated, trailing bytes, unknown tuple column kind or replica identity,
/// misplaced tuple marker, negative length, bad first-segment flag, or invalid UTF-8.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    decode_bytes(&Bytes::copy_from_slice(buf), in_stream)
}

/// Decodes one `pgoutput` message without copying: text and binary column values and
/// message content are slices of `buf` (a reference-count increment each, no allocation).
///
/// `in_stream` as for [`decode`].
///
/// # Errors
///
/// As for [`decode`].
pub fn decode_bytes(buf: &Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let message = message_name(tag).ok_or(DecodeError::UnknownMessageType(tag))?;
    let mut r = Reader {
        buf,
        pos: 1,
        message,
    };
    let xid = |r: &mut Reader<'_>| -> Result<Option<u32>, DecodeError> {
        if in_stream {
            r.u32().map(Some)
        } else {
            Ok(None)
        }
    };
    let decoded = match tag {
        b'B' => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_timestamp: r.i64()?,
            xid: r.u32()?,
        }),
        b'C' => LogicalMessage::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_timestamp: r.i64()?,
        }),
        b'O' => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn()?,
            name: r.string("origin name")?,
        }),
        b'R' => {
            let xid = xid(&mut r)?;
            LogicalMessage::Relation(relation(&mut r, xid)?)
        }
        b'Y' => LogicalMessage::Type(TypeMsg {
            xid: xid(&mut r)?,
            oid: r.u32()?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let xid = xid(&mut r)?;
            let oid = r.u32()?;
            r.marker(|m| m == b'N')?;
            LogicalMessage::Insert(Insert {
                xid,
                oid,
                new: r.tuple_data()?,
            })
        }
        b'U' => {
            let xid = xid(&mut r)?;
            let oid = r.u32()?;
            let old = match r.marker(|m| matches!(m, b'K' | b'O' | b'N'))? {
                b'K' => Some(OldTuple::Key(r.tuple_data()?)),
                b'O' => Some(OldTuple::Full(r.tuple_data()?)),
                _ => None,
            };
            if old.is_some() {
                r.marker(|m| m == b'N')?;
            }
            LogicalMessage::Update(Update {
                xid,
                oid,
                old,
                new: r.tuple_data()?,
            })
        }
        b'D' => {
            let xid = xid(&mut r)?;
            let oid = r.u32()?;
            let old = if r.marker(|m| matches!(m, b'K' | b'O'))? == b'K' {
                OldTuple::Key(r.tuple_data()?)
            } else {
                OldTuple::Full(r.tuple_data()?)
            };
            LogicalMessage::Delete(Delete { xid, oid, old })
        }
        b'T' => {
            let xid = xid(&mut r)?;
            let count = r.u32()?;
            let options = r.u8()?;
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            let mut oids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                oids.push(r.u32()?);
            }
            LogicalMessage::Truncate(Truncate { xid, options, oids })
        }
        b'M' => LogicalMessage::Message(Message {
            xid: xid(&mut r)?,
            flags: r.u8()?,
            lsn: r.lsn()?,
            prefix: r.string("message prefix")?,
            content: r.counted_bytes()?,
        }),
        b'S' => LogicalMessage::StreamStart(StreamStart {
            xid: r.u32()?,
            first_segment: match r.u8()? {
                0 => false,
                1 => true,
                other => return Err(DecodeError::InvalidFirstSegment(other)),
            },
        }),
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_timestamp: r.i64()?,
        }),
        b'A' => {
            let xid = r.u32()?;
            let subxid = r.u32()?;
            // Protocol 4 (parallel streaming) appends the abort LSN and timestamp.
            let (abort_lsn, abort_timestamp) = if r.remaining() == 0 {
                (None, None)
            } else {
                (Some(r.lsn()?), Some(r.i64()?))
            };
            LogicalMessage::StreamAbort(StreamAbort {
                xid,
                subxid,
                abort_lsn,
                abort_timestamp,
            })
        }
        other => return Err(DecodeError::UnknownMessageType(other)),
    };
    r.finish()?;
    Ok(decoded)
}

/// The spec's name of the message a type byte identifies.
fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// The body of a Relation message, after the optional xid.
fn relation(r: &mut Reader<'_>, xid: Option<u32>) -> Result<Relation, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let identity = r.u8()?;
    let replica_identity = ReplicaIdentity::from_byte(identity)
        .ok_or(DecodeError::UnknownReplicaIdentity(identity))?;
    let count = r.u16()?;
    // A column takes at least 10 bytes: flags, an empty name's NUL, type OID, modifier.
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelationColumn {
            flags: r.u8()?,
            name: r.string("column name")?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated_at(&self, offset: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            offset,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The unread bytes (empty when `pos` is at or past the end).
    fn rest(&self) -> &'a [u8] {
        let buf: &'a [u8] = self.buf;
        buf.get(self.pos..).unwrap_or_default()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let chunk = self
            .rest()
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated_at(self.pos))?;
        self.pos = self.pos.saturating_add(N);
        Ok(*chunk)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(u8::from_be_bytes)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.array().map(u64::from_be_bytes).map(Lsn)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated_at(self.pos))?;
        let raw = rest.get(..nul).unwrap_or_default();
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { field })?;
        self.pos = self.pos.saturating_add(nul).saturating_add(1);
        Ok(s.to_owned())
    }

    /// An Int32 length followed by that many bytes, sliced out of the buffer without copying.
    fn counted_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let length = self.i32()?;
        let len = usize::try_from(length).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            length,
            offset: at,
        })?;
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.truncated_at(start))?;
        // In range: checked just above.
        let bytes = self.buf.slice(start..end);
        self.pos = end;
        Ok(bytes)
    }

    /// A one-byte part marker (`N`, `K`, `O`) that `ok` accepts.
    fn marker(&mut self, ok: impl Fn(u8) -> bool) -> Result<u8, DecodeError> {
        let offset = self.pos;
        let marker = self.u8()?;
        if ok(marker) {
            Ok(marker)
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                message: self.message,
                marker,
                offset,
            })
        }
    }

    /// A TupleData part.
    fn tuple_data(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.u16()?;
        // A column takes at least its kind byte.
        let mut columns = Vec::with_capacity(usize::from(count).min(self.remaining()));
        for _ in 0..count {
            let value = match self.u8()? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => ColumnValue::Text(self.counted_bytes()?),
                b'b' => ColumnValue::Binary(self.counted_bytes()?),
                other => return Err(DecodeError::UnknownColumnKind(other)),
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }

    /// Fails when bytes follow the complete message.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                count,
            }),
        }
    }
}

/// Encodes a message as `pgoutput` sends it; the inverse of [`decode`].
///
/// `in_stream` selects the wire format exactly as for [`decode`]: when true, Relation, Type,
/// Insert, Update, Delete, Truncate and Message are written with a leading xid (0, the
/// invalid xid, when their `xid` is `None`); when false, their `xid` is not written. So
/// `decode(&encode(m, s), s) == Ok(m)` for every message whose `xid` fields are `Some`
/// exactly when `s` is true, whose strings contain no NUL, whose Stream Abort optional
/// fields are both set or both unset, and whose counts and lengths fit the wire format.
/// Beyond the wire format's limits (65535 columns, `i32::MAX` relations or content bytes)
/// only the leading items that fit are written; a NUL inside a string ends it early.
/// Never panics.
pub fn encode(msg: &LogicalMessage, in_stream: bool) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    let xid = |w: &mut Writer, xid: Option<u32>| {
        if in_stream {
            w.u32(xid.unwrap_or(0));
        }
    };
    match msg {
        LogicalMessage::Begin(m) => {
            w.u8(b'B');
            w.lsn(m.final_lsn);
            w.i64(m.commit_timestamp);
            w.u32(m.xid);
        }
        LogicalMessage::Commit(m) => {
            w.u8(b'C');
            w.u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.i64(m.commit_timestamp);
        }
        LogicalMessage::Origin(m) => {
            w.u8(b'O');
            w.lsn(m.commit_lsn);
            w.string(&m.name);
        }
        LogicalMessage::Relation(m) => {
            w.u8(b'R');
            xid(&mut w, m.xid);
            w.u32(m.oid);
            w.string(&m.namespace);
            w.string(&m.name);
            w.u8(m.replica_identity.as_byte());
            let count = u16::try_from(m.columns.len()).unwrap_or(u16::MAX);
            w.u16(count);
            for c in m.columns.iter().take(usize::from(count)) {
                w.u8(c.flags);
                w.string(&c.name);
                w.u32(c.type_oid);
                w.i32(c.type_modifier);
            }
        }
        LogicalMessage::Type(m) => {
            w.u8(b'Y');
            xid(&mut w, m.xid);
            w.u32(m.oid);
            w.string(&m.namespace);
            w.string(&m.name);
        }
        LogicalMessage::Insert(m) => {
            w.u8(b'I');
            xid(&mut w, m.xid);
            w.u32(m.oid);
            w.u8(b'N');
            w.tuple_data(&m.new);
        }
        LogicalMessage::Update(m) => {
            w.u8(b'U');
            xid(&mut w, m.xid);
            w.u32(m.oid);
            match &m.old {
                Some(OldTuple::Key(t)) => {
                    w.u8(b'K');
                    w.tuple_data(t);
                }
                Some(OldTuple::Full(t)) => {
                    w.u8(b'O');
                    w.tuple_data(t);
                }
                None => {}
            }
            w.u8(b'N');
            w.tuple_data(&m.new);
        }
        LogicalMessage::Delete(m) => {
            w.u8(b'D');
            xid(&mut w, m.xid);
            w.u32(m.oid);
            let (marker, t) = match &m.old {
                OldTuple::Key(t) => (b'K', t),
                OldTuple::Full(t) => (b'O', t),
            };
            w.u8(marker);
            w.tuple_data(t);
        }
        LogicalMessage::Truncate(m) => {
            w.u8(b'T');
            xid(&mut w, m.xid);
            let count = i32::try_from(m.oids.len()).unwrap_or(i32::MAX);
            w.i32(count);
            w.u8(m.options);
            for &oid in m.oids.iter().take(usize::try_from(count).unwrap_or(0)) {
                w.u32(oid);
            }
        }
        LogicalMessage::Message(m) => {
            w.u8(b'M');
            xid(&mut w, m.xid);
            w.u8(m.flags);
            w.lsn(m.lsn);
            w.string(&m.prefix);
            w.counted_bytes(&m.content);
        }
        LogicalMessage::StreamStart(m) => {
            w.u8(b'S');
            w.u32(m.xid);
            w.u8(u8::from(m.first_segment));
        }
        LogicalMessage::StreamStop => w.u8(b'E'),
        LogicalMessage::StreamCommit(m) => {
            w.u8(b'c');
            w.u32(m.xid);
            w.u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.i64(m.commit_timestamp);
        }
        LogicalMessage::StreamAbort(m) => {
            w.u8(b'A');
            w.u32(m.xid);
            w.u32(m.subxid);
            if let (Some(lsn), Some(ts)) = (m.abort_lsn, m.abort_timestamp) {
                w.lsn(lsn);
                w.i64(ts);
            }
        }
    }
    w.0
}

/// Big-endian writer for [`encode`].
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn lsn(&mut self, v: Lsn) {
        self.0.extend_from_slice(&v.0.to_be_bytes());
    }

    /// A NUL-terminated string; an embedded NUL ends it early.
    fn string(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        self.0
            .extend_from_slice(bytes.get(..end).unwrap_or_default());
        self.0.push(0);
    }

    /// An Int32 length and the bytes (at most `i32::MAX` of them).
    fn counted_bytes(&mut self, b: &[u8]) {
        let len = i32::try_from(b.len()).unwrap_or(i32::MAX);
        self.i32(len);
        let n = usize::try_from(len).unwrap_or(0);
        self.0.extend_from_slice(b.get(..n).unwrap_or_default());
    }

    fn tuple_data(&mut self, t: &TupleData) {
        let count = u16::try_from(t.columns.len()).unwrap_or(u16::MAX);
        self.u16(count);
        for value in t.columns.iter().take(usize::from(count)) {
            match value {
                ColumnValue::Null => self.u8(b'n'),
                ColumnValue::UnchangedToast => self.u8(b'u'),
                ColumnValue::Text(b) => {
                    self.u8(b't');
                    self.counted_bytes(b);
                }
                ColumnValue::Binary(b) => {
                    self.u8(b'b');
                    self.counted_bytes(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// Wire bytes built by hand, field by field in the spec's order (independent of the
    /// encoder under test).
    struct Wire(Vec<u8>);

    impl Wire {
        fn new(tag: u8) -> Self {
            Wire(vec![tag])
        }
        fn byte(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn int16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn int32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn uint32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn int64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn lsn(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn string(self, s: &str) -> Self {
            self.raw(s.as_bytes()).byte(0)
        }
        /// A TupleData `t` column.
        fn text(self, s: &str) -> Self {
            let len = i32::try_from(s.len()).expect("short test string");
            self.byte(b't').int32(len).raw(s.as_bytes())
        }
    }

    fn ok(w: &Wire, in_stream: bool) -> LogicalMessage {
        let msg = decode(&w.0, in_stream).expect("valid message");
        // Every hand-built message is also what the encoder produces.
        assert_eq!(
            encode(&msg, in_stream),
            w.0,
            "encoder disagrees for {msg:?}"
        );
        msg
    }

    fn err(bytes: &[u8], in_stream: bool) -> String {
        decode(bytes, in_stream)
            .expect_err("invalid message")
            .to_string()
    }

    fn text(s: &'static str) -> ColumnValue {
        ColumnValue::Text(Bytes::from_static(s.as_bytes()))
    }

    fn tuple(columns: Vec<ColumnValue>) -> TupleData {
        TupleData { columns }
    }

    // ---- one test per message type, bytes built per the spec ----

    #[test]
    fn begin() {
        #[rustfmt::skip]
        let bytes = [
            b'B',
            0, 0, 0, 0, 0x01, 0x6B, 0x6C, 0x50, // final LSN 0/16B6C50
            0, 0, 0, 0, 0, 0, 0x03, 0xE8,       // commit timestamp 1000 µs
            0, 0, 0x02, 0xD2,                   // xid 722
        ];
        let msg = decode(&bytes, false).unwrap();
        assert_eq!(
            msg,
            LogicalMessage::Begin(Begin {
                final_lsn: Lsn(0x16B6C50),
                commit_timestamp: 1000,
                xid: 722,
            })
        );
        assert_eq!(encode(&msg, false), bytes);
        // Begin has no xid prefix inside a streamed block; in_stream changes nothing.
        assert_eq!(decode(&bytes, true).unwrap(), msg);
    }

    #[test]
    fn commit() {
        let w = Wire::new(b'C')
            .byte(0)
            .lsn(0x16B6C50)
            .lsn(0x16B6C80)
            .int64(-5);
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x16B6C50),
                end_lsn: Lsn(0x16B6C80),
                commit_timestamp: -5,
            })
        );
    }

    #[test]
    fn origin() {
        let w = Wire::new(b'O').lsn(42).string("node_a");
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Origin(Origin {
                commit_lsn: Lsn(42),
                name: "node_a".into(),
            })
        );
    }

    fn relation_wire(w: Wire) -> Wire {
        w.uint32(16384)
            .string("public")
            .string("orders")
            .byte(b'd')
            .int16(2)
            .byte(1)
            .string("id")
            .uint32(23)
            .int32(-1)
            .byte(0)
            .string("note")
            .uint32(1043)
            .int32(36)
    }

    fn relation_expected(xid: Option<u32>) -> LogicalMessage {
        LogicalMessage::Relation(Relation {
            xid,
            oid: 16384,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "note".into(),
                    type_oid: 1043,
                    type_modifier: 36,
                },
            ],
        })
    }

    #[test]
    fn relation() {
        let msg = ok(&relation_wire(Wire::new(b'R')), false);
        assert_eq!(msg, relation_expected(None));
        let LogicalMessage::Relation(rel) = msg else {
            unreachable!()
        };
        assert!(rel.columns[0].is_key());
        assert!(!rel.columns[1].is_key());
    }

    #[test]
    fn relation_streamed_has_xid() {
        let w = relation_wire(Wire::new(b'R').uint32(999));
        assert_eq!(ok(&w, true), relation_expected(Some(999)));
    }

    #[test]
    fn relation_replica_identities_and_pg_catalog_namespace() {
        for (byte, identity) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let w = Wire::new(b'R')
                .uint32(1)
                .string("")
                .string("t")
                .byte(byte)
                .int16(0);
            let LogicalMessage::Relation(rel) = ok(&w, false) else {
                unreachable!()
            };
            assert_eq!(rel.replica_identity, identity);
            assert_eq!(rel.namespace, "");
            assert!(rel.columns.is_empty());
        }
        let w = Wire::new(b'R')
            .uint32(1)
            .string("")
            .string("t")
            .byte(b'x')
            .int16(0);
        assert_eq!(err(&w.0, false), "pgoutput: unknown replica identity 'x'");
    }

    #[test]
    fn type_msg() {
        let w = Wire::new(b'Y')
            .uint32(16400)
            .string("public")
            .string("mood");
        let expected = TypeMsg {
            xid: None,
            oid: 16400,
            namespace: "public".into(),
            name: "mood".into(),
        };
        assert_eq!(ok(&w, false), LogicalMessage::Type(expected.clone()));
        let w = Wire::new(b'Y')
            .uint32(7)
            .uint32(16400)
            .string("public")
            .string("mood");
        let streamed = TypeMsg {
            xid: Some(7),
            ..expected
        };
        assert_eq!(ok(&w, true), LogicalMessage::Type(streamed));
    }

    #[test]
    fn insert_with_text_null_binary_and_toast() {
        let w = Wire::new(b'I')
            .uint32(16384)
            .byte(b'N')
            .int16(5)
            .text("42")
            .byte(b'n')
            .byte(b'b')
            .int32(3)
            .raw(&[0, 1, 0xff])
            .byte(b'u')
            .text("");
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Insert(Insert {
                xid: None,
                oid: 16384,
                new: tuple(vec![
                    text("42"),
                    ColumnValue::Null,
                    ColumnValue::Binary(Bytes::from_static(&[0, 1, 0xff])),
                    ColumnValue::UnchangedToast,
                    text(""),
                ]),
            })
        );
    }

    #[test]
    fn insert_streamed_has_xid() {
        let w = Wire::new(b'I')
            .uint32(555)
            .uint32(16384)
            .byte(b'N')
            .int16(1)
            .text("a");
        assert_eq!(
            ok(&w, true),
            LogicalMessage::Insert(Insert {
                xid: Some(555),
                oid: 16384,
                new: tuple(vec![text("a")]),
            })
        );
    }

    #[test]
    fn update_without_old_tuple_and_unchanged_toast() {
        let w = Wire::new(b'U')
            .uint32(16384)
            .byte(b'N')
            .int16(3)
            .text("1")
            .byte(b'u')
            .byte(b'n');
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Update(Update {
                xid: None,
                oid: 16384,
                old: None,
                new: tuple(vec![
                    text("1"),
                    ColumnValue::UnchangedToast,
                    ColumnValue::Null
                ]),
            })
        );
    }

    #[test]
    fn update_with_old_key() {
        let w = Wire::new(b'U')
            .uint32(16384)
            .byte(b'K')
            .int16(2)
            .text("1")
            .byte(b'n')
            .byte(b'N')
            .int16(2)
            .text("2")
            .text("x");
        let msg = ok(&w, false);
        assert_eq!(
            msg,
            LogicalMessage::Update(Update {
                xid: None,
                oid: 16384,
                old: Some(OldTuple::Key(tuple(vec![text("1"), ColumnValue::Null]))),
                new: tuple(vec![text("2"), text("x")]),
            })
        );
        let LogicalMessage::Update(u) = msg else {
            unreachable!()
        };
        let old = u.old.expect("old key");
        assert_eq!(old.tuple().columns.len(), 2);
    }

    #[test]
    fn update_with_old_full_tuple_streamed() {
        let w = Wire::new(b'U')
            .uint32(31)
            .uint32(16384)
            .byte(b'O')
            .int16(2)
            .text("1")
            .text("old")
            .byte(b'N')
            .int16(2)
            .text("1")
            .text("new");
        assert_eq!(
            ok(&w, true),
            LogicalMessage::Update(Update {
                xid: Some(31),
                oid: 16384,
                old: Some(OldTuple::Full(tuple(vec![text("1"), text("old")]))),
                new: tuple(vec![text("1"), text("new")]),
            })
        );
    }

    #[test]
    fn update_rejects_bad_markers() {
        // Neither K, O nor N after the OID.
        let w = Wire::new(b'U').uint32(1).byte(b'X').int16(0);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: unexpected tuple marker 'X' in Update message at byte 5"
        );
        // K and then O: "either a K part or an O part or neither, but never both".
        let w = Wire::new(b'U')
            .uint32(1)
            .byte(b'K')
            .int16(0)
            .byte(b'O')
            .int16(0);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: unexpected tuple marker 'O' in Update message at byte 8"
        );
    }

    #[test]
    fn delete_with_key() {
        let w = Wire::new(b'D')
            .uint32(16384)
            .byte(b'K')
            .int16(2)
            .text("7")
            .byte(b'n');
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Delete(Delete {
                xid: None,
                oid: 16384,
                old: OldTuple::Key(tuple(vec![text("7"), ColumnValue::Null])),
            })
        );
    }

    #[test]
    fn delete_with_full_old_tuple() {
        let w = Wire::new(b'D')
            .uint32(16384)
            .byte(b'O')
            .int16(2)
            .text("7")
            .text("z");
        assert_eq!(
            ok(&w, false),
            LogicalMessage::Delete(Delete {
                xid: None,
                oid: 16384,
                old: OldTuple::Full(tuple(vec![text("7"), text("z")])),
            })
        );
        let w = Wire::new(b'D').uint32(16384).byte(b'N').int16(0);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: unexpected tuple marker 'N' in Delete message at byte 5"
        );
    }

    #[test]
    fn delete_streamed_has_xid() {
        let w = Wire::new(b'D')
            .uint32(9)
            .uint32(16384)
            .byte(b'K')
            .int16(1)
            .text("7");
        assert_eq!(
            ok(&w, true),
            LogicalMessage::Delete(Delete {
                xid: Some(9),
                oid: 16384,
                old: OldTuple::Key(tuple(vec![text("7")])),
            })
        );
    }

    #[test]
    fn truncate_with_options() {
        let w = Wire::new(b'T').int32(2).byte(3).uint32(16384).uint32(16390);
        let msg = ok(&w, false);
        assert_eq!(
            msg,
            LogicalMessage::Truncate(Truncate {
                xid: None,
                options: Truncate::CASCADE | Truncate::RESTART_IDENTITY,
                oids: vec![16384, 16390],
            })
        );
        let LogicalMessage::Truncate(t) = msg else {
            unreachable!()
        };
        assert!(t.cascade() && t.restart_identity());

        for (options, cascade, restart) in [(0, false, false), (1, true, false), (2, false, true)] {
            let w = Wire::new(b'T')
                .uint32(77)
                .int32(1)
                .byte(options)
                .uint32(16384);
            let LogicalMessage::Truncate(t) = ok(&w, true) else {
                unreachable!()
            };
            assert_eq!(t.xid, Some(77));
            assert_eq!((t.cascade(), t.restart_identity()), (cascade, restart));
        }
    }

    #[test]
    fn message_transactional_and_not() {
        let w = Wire::new(b'M')
            .byte(1)
            .lsn(0x1000)
            .string("cutover")
            .int32(5)
            .raw(b"hello");
        let msg = ok(&w, false);
        assert_eq!(
            msg,
            LogicalMessage::Message(Message {
                xid: None,
                flags: 1,
                lsn: Lsn(0x1000),
                prefix: "cutover".into(),
                content: Bytes::from_static(b"hello"),
            })
        );
        let LogicalMessage::Message(m) = msg else {
            unreachable!()
        };
        assert!(m.transactional());

        let w = Wire::new(b'M').byte(0).lsn(1).string("p").int32(0);
        let LogicalMessage::Message(m) = ok(&w, false) else {
            unreachable!()
        };
        assert!(!m.transactional());
        assert!(m.content.is_empty());

        let w = Wire::new(b'M')
            .uint32(12)
            .byte(1)
            .lsn(1)
            .string("p")
            .int32(1)
            .raw(b"x");
        let LogicalMessage::Message(m) = ok(&w, true) else {
            unreachable!()
        };
        assert_eq!(m.xid, Some(12));
    }

    #[test]
    fn stream_start() {
        let w = Wire::new(b'S').uint32(600).byte(1);
        assert_eq!(
            ok(&w, false),
            LogicalMessage::StreamStart(StreamStart {
                xid: 600,
                first_segment: true,
            })
        );
        let w = Wire::new(b'S').uint32(600).byte(0);
        assert_eq!(
            ok(&w, true),
            LogicalMessage::StreamStart(StreamStart {
                xid: 600,
                first_segment: false,
            })
        );
        let w = Wire::new(b'S').uint32(600).byte(2);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: invalid first segment flag 2 in Stream Start message"
        );
    }

    #[test]
    fn stream_stop() {
        assert_eq!(ok(&Wire::new(b'E'), true), LogicalMessage::StreamStop);
        assert_eq!(
            err(b"E\0", true),
            "pgoutput: 1 trailing byte(s) after Stream Stop message at byte 1"
        );
    }

    #[test]
    fn stream_commit() {
        let w = Wire::new(b'c')
            .uint32(600)
            .byte(0)
            .lsn(0x2000)
            .lsn(0x2100)
            .int64(77);
        assert_eq!(
            ok(&w, false),
            LogicalMessage::StreamCommit(StreamCommit {
                xid: 600,
                flags: 0,
                commit_lsn: Lsn(0x2000),
                end_lsn: Lsn(0x2100),
                commit_timestamp: 77,
            })
        );
    }

    #[test]
    fn stream_abort_protocol_2_and_4() {
        let w = Wire::new(b'A').uint32(600).uint32(601);
        assert_eq!(
            ok(&w, false),
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 600,
                subxid: 601,
                abort_lsn: None,
                abort_timestamp: None,
            })
        );
        let w = Wire::new(b'A')
            .uint32(600)
            .uint32(600)
            .lsn(0x3000)
            .int64(99);
        assert_eq!(
            ok(&w, false),
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 600,
                subxid: 600,
                abort_lsn: Some(Lsn(0x3000)),
                abort_timestamp: Some(99),
            })
        );
        // Half of the optional pair is not accepted.
        let w = Wire::new(b'A').uint32(600).uint32(600).lsn(0x3000);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Stream Abort message at byte 17"
        );
        let w = Wire::new(b'A').uint32(600).uint32(600).raw(&[1, 2, 3]);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Stream Abort message at byte 9"
        );
    }

    // ---- malformed input ----

    #[test]
    fn error_messages() {
        assert_eq!(err(b"", false), "pgoutput: empty message");
        assert_eq!(err(b"z", false), "pgoutput: unknown message type 'z'");
        assert_eq!(err(b"\0", false), "pgoutput: unknown message type 0x00");
        // Protocol 3 (two-phase) messages are not covered.
        assert_eq!(err(b"P", false), "pgoutput: unknown message type 'P'");

        let w = Wire::new(b'I').uint32(1).byte(b'N').int16(1).byte(b'q');
        assert_eq!(err(&w.0, false), "pgoutput: unknown tuple column kind 'q'");

        let w = Wire::new(b'R')
            .uint32(1)
            .string("public")
            .raw(&[0xff, 0xfe, 0])
            .byte(b'd');
        assert_eq!(err(&w.0, false), "pgoutput: invalid utf-8 in relation name");

        // Two columns announced, the first complete (bytes 8..17), the second missing.
        let w = Wire::new(b'I').uint32(1).byte(b'N').int16(2).text("abcd");
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Insert message at byte 17"
        );

        // A string without its NUL.
        let w = Wire::new(b'O').lsn(1).raw(b"name");
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Origin message at byte 9"
        );

        let w = Wire::new(b'I')
            .uint32(1)
            .byte(b'N')
            .int16(1)
            .byte(b't')
            .int32(-1);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: negative length -1 in Insert message at byte 9"
        );

        let w = Wire::new(b'I').uint32(1).byte(b'O').int16(0);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: unexpected tuple marker 'O' in Insert message at byte 5"
        );
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        let w = Wire::new(b'B').lsn(1).int64(2).uint32(3).byte(0);
        assert_eq!(
            decode(&w.0, false),
            Err(DecodeError::TrailingBytes {
                message: "Begin",
                offset: 21,
                count: 1,
            })
        );
        let w = Wire::new(b'I').uint32(1).byte(b'N').int16(0).raw(b"xyz");
        assert_eq!(
            err(&w.0, false),
            "pgoutput: 3 trailing byte(s) after Insert message at byte 8"
        );
    }

    #[test]
    fn huge_declared_counts_fail_without_big_allocations() {
        // 65535 columns announced in a 10-byte Insert.
        let w = Wire::new(b'I')
            .uint32(1)
            .byte(b'N')
            .raw(&[0xff, 0xff])
            .byte(b'n')
            .byte(b'n');
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Insert message at byte 10"
        );
        let w = Wire::new(b'R')
            .uint32(1)
            .string("")
            .string("t")
            .byte(b'd')
            .raw(&[0xff, 0xff]);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Relation message at byte 11"
        );
        let w = Wire::new(b'T').uint32(u32::MAX).byte(0).uint32(1);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Truncate message at byte 10"
        );
        let w = Wire::new(b'M').byte(0).lsn(1).string("p").int32(i32::MAX);
        assert_eq!(
            err(&w.0, false),
            "pgoutput: truncated Message message at byte 16"
        );
    }

    #[test]
    fn decode_bytes_slices_without_copying() {
        let w = Wire::new(b'I')
            .uint32(1)
            .byte(b'N')
            .int16(2)
            .text("hello")
            .text("world");
        let buf = Bytes::from(w.0);
        let LogicalMessage::Insert(insert) = decode_bytes(&buf, false).unwrap() else {
            unreachable!()
        };
        let range = buf.as_ptr_range();
        for value in &insert.new.columns {
            let ColumnValue::Text(b) = value else {
                unreachable!()
            };
            assert!(range.contains(&b.as_ptr()), "value was copied");
        }
        assert_eq!(insert.new.columns, vec![text("hello"), text("world")]);
    }

    #[test]
    fn encoder_never_writes_embedded_nul() {
        let msg = LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(1),
            name: "a\0b".into(),
        });
        assert_eq!(
            decode(&encode(&msg, false), false).unwrap(),
            LogicalMessage::Origin(Origin {
                commit_lsn: Lsn(1),
                name: "a".into(),
            })
        );
    }

    // ---- golden files ----

    fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/pgoutput")
    }

    /// The golden messages: `<name>.bin` holds the wire bytes, `<name>.expected` the
    /// pretty Debug text of the decoded message. Names ending in `.streamed` are decoded
    /// with `in_stream = true`.
    fn golden_fixtures() -> Vec<(&'static str, LogicalMessage)> {
        let row = tuple(vec![
            text("1"),
            ColumnValue::Null,
            ColumnValue::UnchangedToast,
            ColumnValue::Binary(Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef])),
            text("ünïcode ✓"),
        ]);
        let key = tuple(vec![
            text("1"),
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
        ]);
        vec![
            (
                "begin",
                LogicalMessage::Begin(Begin {
                    final_lsn: Lsn(0x16B6C50),
                    commit_timestamp: 798_292_800_000_000,
                    xid: 722,
                }),
            ),
            (
                "commit",
                LogicalMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x16B6C50),
                    end_lsn: Lsn(0x16B6C80),
                    commit_timestamp: 798_292_800_000_000,
                }),
            ),
            (
                "origin",
                LogicalMessage::Origin(Origin {
                    commit_lsn: Lsn(0x1_0000_0000),
                    name: "pg_16385".into(),
                }),
            ),
            ("relation", relation_expected(None)),
            ("relation.streamed", relation_expected(Some(900))),
            (
                "type",
                LogicalMessage::Type(TypeMsg {
                    xid: None,
                    oid: 16400,
                    namespace: "public".into(),
                    name: "mood".into(),
                }),
            ),
            (
                "insert",
                LogicalMessage::Insert(Insert {
                    xid: None,
                    oid: 16384,
                    new: row.clone(),
                }),
            ),
            (
                "insert.streamed",
                LogicalMessage::Insert(Insert {
                    xid: Some(900),
                    oid: 16384,
                    new: row.clone(),
                }),
            ),
            (
                "update",
                LogicalMessage::Update(Update {
                    xid: None,
                    oid: 16384,
                    old: None,
                    new: row.clone(),
                }),
            ),
            (
                "update_key",
                LogicalMessage::Update(Update {
                    xid: None,
                    oid: 16384,
                    old: Some(OldTuple::Key(key.clone())),
                    new: row.clone(),
                }),
            ),
            (
                "update_full.streamed",
                LogicalMessage::Update(Update {
                    xid: Some(900),
                    oid: 16384,
                    old: Some(OldTuple::Full(row.clone())),
                    new: row.clone(),
                }),
            ),
            (
                "delete_key",
                LogicalMessage::Delete(Delete {
                    xid: None,
                    oid: 16384,
                    old: OldTuple::Key(key),
                }),
            ),
            (
                "delete_full",
                LogicalMessage::Delete(Delete {
                    xid: None,
                    oid: 16384,
                    old: OldTuple::Full(row),
                }),
            ),
            (
                "truncate",
                LogicalMessage::Truncate(Truncate {
                    xid: None,
                    options: Truncate::CASCADE | Truncate::RESTART_IDENTITY,
                    oids: vec![16384, 16390],
                }),
            ),
            (
                "message",
                LogicalMessage::Message(Message {
                    xid: None,
                    flags: Message::TRANSACTIONAL,
                    lsn: Lsn(0x16B6C60),
                    prefix: "cutover".into(),
                    content: Bytes::from_static(b"{\"marker\":1}"),
                }),
            ),
            (
                "stream_start",
                LogicalMessage::StreamStart(StreamStart {
                    xid: 900,
                    first_segment: true,
                }),
            ),
            ("stream_stop", LogicalMessage::StreamStop),
            (
                "stream_commit",
                LogicalMessage::StreamCommit(StreamCommit {
                    xid: 900,
                    flags: 0,
                    commit_lsn: Lsn(0x2000000),
                    end_lsn: Lsn(0x2000030),
                    commit_timestamp: 798_292_800_000_000,
                }),
            ),
            (
                "stream_abort",
                LogicalMessage::StreamAbort(StreamAbort {
                    xid: 900,
                    subxid: 901,
                    abort_lsn: None,
                    abort_timestamp: None,
                }),
            ),
            (
                "stream_abort_parallel",
                LogicalMessage::StreamAbort(StreamAbort {
                    xid: 900,
                    subxid: 900,
                    abort_lsn: Some(Lsn(0x2000040)),
                    abort_timestamp: Some(798_292_800_000_000),
                }),
            ),
        ]
    }

    fn is_streamed(name: &str) -> bool {
        name.ends_with(".streamed")
    }

    fn expected_text(msg: &LogicalMessage) -> String {
        format!("{msg:#?}\n")
    }

    /// With `UPDATE_GOLDEN=1`, rewrites the golden files from the encoder (once per test
    /// run, before either golden test reads them).
    fn regenerate_golden_if_requested() {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            if std::env::var_os("UPDATE_GOLDEN").is_none_or(|v| v != "1") {
                return;
            }
            let dir = golden_dir();
            std::fs::create_dir_all(&dir).unwrap();
            for (name, msg) in golden_fixtures() {
                let bin = encode(&msg, is_streamed(name));
                std::fs::write(dir.join(format!("{name}.bin")), bin).unwrap();
                std::fs::write(dir.join(format!("{name}.expected")), expected_text(&msg)).unwrap();
            }
        });
    }

    #[test]
    fn golden_files_decode_to_expected() {
        regenerate_golden_if_requested();
        let dir = golden_dir();
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "bin") {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let bin = std::fs::read(&path).unwrap();
            let expected = std::fs::read_to_string(path.with_extension("expected"))
                .unwrap_or_else(|e| panic!("{name}.expected: {e}"));
            let msg = decode(&bin, is_streamed(&name))
                .unwrap_or_else(|e| panic!("{name}.bin does not decode: {e}"));
            assert_eq!(expected_text(&msg), expected, "{name}");
            assert_eq!(
                encode(&msg, is_streamed(&name)),
                bin,
                "{name} does not re-encode"
            );
            seen += 1;
        }
        assert!(
            seen >= golden_fixtures().len(),
            "only {seen} golden files in {dir:?}"
        );
    }

    #[test]
    fn golden_files_match_encoder() {
        regenerate_golden_if_requested();
        let dir = golden_dir();
        for (name, msg) in golden_fixtures() {
            let bin = std::fs::read(dir.join(format!("{name}.bin")))
                .unwrap_or_else(|e| panic!("{name}.bin: {e} (regenerate with UPDATE_GOLDEN=1)"));
            assert_eq!(
                bin,
                encode(&msg, is_streamed(name)),
                "{name}.bin is stale (regenerate with UPDATE_GOLDEN=1)"
            );
            let expected = std::fs::read_to_string(dir.join(format!("{name}.expected"))).unwrap();
            assert_eq!(expected, expected_text(&msg), "{name}.expected is stale");
        }
    }

    // ---- property tests ----

    fn arb_lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[^\\x00]{0,12}"
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..16).prop_map(Bytes::from)
    }

    fn arb_tuple() -> impl Strategy<Value = TupleData> {
        let value = prop_oneof![
            Just(ColumnValue::Null),
            Just(ColumnValue::UnchangedToast),
            arb_bytes().prop_map(ColumnValue::Text),
            arb_bytes().prop_map(ColumnValue::Binary),
        ];
        vec(value, 0..6).prop_map(|columns| TupleData { columns })
    }

    fn arb_old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            arb_tuple().prop_map(OldTuple::Key),
            arb_tuple().prop_map(OldTuple::Full),
        ]
    }

    /// Any message, with `xid` fields set exactly when `in_stream`.
    fn arb_message(in_stream: bool) -> BoxedStrategy<LogicalMessage> {
        let xid = if in_stream {
            any::<u32>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        };
        let identity = prop_oneof![
            Just(ReplicaIdentity::Default),
            Just(ReplicaIdentity::Nothing),
            Just(ReplicaIdentity::Full),
            Just(ReplicaIdentity::Index),
        ];
        let column = (any::<u8>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelationColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        prop_oneof![
            (arb_lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, ts, xid)| {
                LogicalMessage::Begin(Begin {
                    final_lsn,
                    commit_timestamp: ts,
                    xid,
                })
            }),
            (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, ts)| {
                    LogicalMessage::Commit(Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_timestamp: ts,
                    })
                }
            ),
            (arb_lsn(), arb_name())
                .prop_map(|(commit_lsn, name)| LogicalMessage::Origin(Origin { commit_lsn, name })),
            (
                xid.clone(),
                any::<u32>(),
                arb_name(),
                arb_name(),
                identity,
                vec(column, 0..5)
            )
                .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                    LogicalMessage::Relation(Relation {
                        xid,
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }),
            (xid.clone(), any::<u32>(), arb_name(), arb_name()).prop_map(
                |(xid, oid, namespace, name)| {
                    LogicalMessage::Type(TypeMsg {
                        xid,
                        oid,
                        namespace,
                        name,
                    })
                }
            ),
            (xid.clone(), any::<u32>(), arb_tuple())
                .prop_map(|(xid, oid, new)| LogicalMessage::Insert(Insert { xid, oid, new })),
            (
                xid.clone(),
                any::<u32>(),
                proptest::option::of(arb_old()),
                arb_tuple()
            )
                .prop_map(|(xid, oid, old, new)| LogicalMessage::Update(Update {
                    xid,
                    oid,
                    old,
                    new
                })),
            (xid.clone(), any::<u32>(), arb_old())
                .prop_map(|(xid, oid, old)| LogicalMessage::Delete(Delete { xid, oid, old })),
            (xid.clone(), any::<u8>(), vec(any::<u32>(), 0..5)).prop_map(|(xid, options, oids)| {
                LogicalMessage::Truncate(Truncate { xid, options, oids })
            }),
            (xid, any::<u8>(), arb_lsn(), arb_name(), arb_bytes()).prop_map(
                |(xid, flags, lsn, prefix, content)| {
                    LogicalMessage::Message(Message {
                        xid,
                        flags,
                        lsn,
                        prefix,
                        content,
                    })
                }
            ),
            (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                LogicalMessage::StreamStart(StreamStart { xid, first_segment })
            }),
            Just(LogicalMessage::StreamStop),
            (
                any::<u32>(),
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>()
            )
                .prop_map(|(xid, flags, commit_lsn, end_lsn, ts)| {
                    LogicalMessage::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_timestamp: ts,
                    })
                }),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::option::of((arb_lsn(), any::<i64>()))
            )
                .prop_map(|(xid, subxid, abort)| {
                    LogicalMessage::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort_lsn: abort.map(|(lsn, _)| lsn),
                        abort_timestamp: abort.map(|(_, ts)| ts),
                    })
                }),
        ]
        .boxed()
    }

    /// A mode and a message valid in it.
    fn arb_message_in_mode() -> impl Strategy<Value = (bool, LogicalMessage)> {
        any::<bool>().prop_flat_map(|in_stream| (Just(in_stream), arb_message(in_stream)))
    }

    /// Bytes that start with a known message type more often than chance would.
    fn arb_wire_like() -> impl Strategy<Value = Vec<u8>> {
        let tag = proptest::sample::select(b"BCORYIUDTMSEcA".to_vec());
        let tail = vec(
            prop_oneof![
                any::<u8>(),
                proptest::sample::select(b"NKOnutb\0\xff".to_vec())
            ],
            0..64,
        );
        (tag, tail).prop_map(|(tag, mut tail)| {
            tail.insert(0, tag);
            tail
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in vec(any::<u8>(), 0..256), in_stream: bool) {
            let _ = decode(&buf, in_stream);
        }

        #[test]
        fn wire_like_bytes_never_panic(buf in arb_wire_like(), in_stream: bool) {
            let copied = decode(&buf, in_stream);
            prop_assert_eq!(copied, decode_bytes(&Bytes::from(buf), in_stream));
        }

        #[test]
        fn mutated_messages_never_panic(
            (in_stream, msg) in arb_message_in_mode(),
            at: prop::sample::Index,
            byte: u8,
            decode_as_stream: bool,
        ) {
            let mut buf = encode(&msg, in_stream);
            let i = at.index(buf.len());
            if let Some(b) = buf.get_mut(i) {
                *b = byte;
            }
            let _ = decode(&buf, decode_as_stream);
        }

        #[test]
        fn encode_decode_round_trip((in_stream, msg) in arb_message_in_mode()) {
            let buf = encode(&msg, in_stream);
            prop_assert_eq!(decode(&buf, in_stream), Ok(msg.clone()));
            prop_assert_eq!(decode_bytes(&Bytes::from(buf), in_stream), Ok(msg));
        }

        #[test]
        fn strict_prefixes_are_errors((in_stream, msg) in arb_message_in_mode()) {
            let buf = encode(&msg, in_stream);
            for len in 0..buf.len() {
                let prefix = buf.get(..len).unwrap();
                match decode(prefix, in_stream) {
                    Err(_) => {}
                    // The one exception the spec makes: Stream Abort's protocol 4 fields are
                    // optional, so the protocol 2 form (9 bytes) is a complete message.
                    Ok(LogicalMessage::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort_lsn: None,
                        abort_timestamp: None,
                    })) if len == 9 => {
                        let LogicalMessage::StreamAbort(full) = &msg else {
                            return Err(TestCaseError::fail("not a Stream Abort"));
                        };
                        prop_assert!(full.abort_lsn.is_some());
                        prop_assert_eq!((xid, subxid), (full.xid, full.subxid));
                    }
                    Ok(other) => {
                        return Err(TestCaseError::fail(format!(
                            "prefix of {len} bytes of {msg:?} decoded as {other:?}"
                        )));
                    }
                }
            }
        }

        #[test]
        fn one_extra_byte_is_an_error((in_stream, msg) in arb_message_in_mode(), extra: u8) {
            let mut buf = encode(&msg, in_stream);
            buf.push(extra);
            prop_assert!(decode(&buf, in_stream).is_err());
        }
    }
}
