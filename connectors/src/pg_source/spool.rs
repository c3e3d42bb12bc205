//! De-streaming of pgoutput protocol 2: in-progress transactions spooled to disk, handed on
//! whole at their commit.
//!
//! With `streaming 'on'` the server no longer keeps a large transaction in its own memory
//! and `pg_replslot` spill files until it commits: once the transaction passes
//! `logical_decoding_work_mem`, it sends its changes in blocks (Stream Start ... Stream
//! Stop), interleaved with other transactions, and ends it with Stream Commit or Stream
//! Abort. The apply must still see whole transactions in commit order, each once, so every
//! streamed block is appended to a file per top-level transaction here, and at Stream
//! Commit the file is read back as Begin, the changes, Commit, exactly the shape a
//! protocol 1 stream has. Everything downstream is unchanged.
//!
//! Aborted subtransactions: Stream Abort names a subtransaction, and its changes (and those
//! of the subtransactions it contains, which all come after its first change) are cut off
//! the end of the file. This is PostgreSQL's own rule (`subxact_info_add` in the apply
//! worker): once a subtransaction has written a change, every later change of the
//! transaction belongs to it or to a subtransaction nested in it, until it ends. Relation
//! and Type messages cut off with it are appended again, since the server will not repeat
//! a description it has already sent.
//!
//! Memory stays bounded: one buffered writer per open streamed transaction, and the read
//! back goes message by message. A restart begins with an empty spool directory: the
//! server streams every transaction that was not confirmed again from its beginning.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::pg_source::decode::{self, Begin, Commit, LogicalMessage};

/// The largest message read back from a spool file: the server's own limit for one
/// message (1 GiB) and some room for the message's header.
const MAX_SPOOLED_MESSAGE: u32 = (1 << 30) + (1 << 16);

/// What [`Destreamer::push`] makes of one message.
#[derive(Debug)]
pub enum Pushed {
    /// Not part of a streamed transaction: hand it on as it is.
    Pass(LogicalMessage),
    /// Spooled, or a stream boundary: nothing to hand on.
    Held,
    /// A streamed transaction committed: read it back with [`Destreamer::replay_next`].
    Replay,
}

/// The spool of one streamed top-level transaction.
struct Spooled {
    path: PathBuf,
    writer: BufWriter<File>,
    /// Bytes written so far (the offset of the next message).
    len: u64,
    /// Subtransactions in the order their first change was spooled, with its offset.
    subxacts: Vec<(u32, u64)>,
    /// The position of each subtransaction in `subxacts`: one lookup per change, however
    /// many savepoints the transaction has (an ORM may take one per row).
    subxact_index: HashMap<u32, usize>,
    /// The last Relation or Type description spooled, per OID, with its offset, so that
    /// one cut off with an aborted subtransaction can be written again.
    descriptions: HashMap<(u8, u32), (u64, Bytes)>,
}

/// A committed streamed transaction being read back.
struct Replaying {
    path: PathBuf,
    reader: BufReader<File>,
    xid: u32,
    commit: Commit,
    begun: bool,
}

/// Turns a protocol 2 stream back into whole transactions in commit order.
pub struct Destreamer {
    dir: PathBuf,
    open: HashMap<u32, Spooled>,
    /// The top-level xid of the block being received (between Stream Start and Stop).
    current: Option<u32>,
    replay: Option<Replaying>,
}

impl std::fmt::Debug for Destreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destreamer")
            .field("dir", &self.dir)
            .field("open", &self.open.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::operator(format!(
        "could not {what} the spool file \"{}\": {e}",
        path.display()
    ))
    .hint("streamed transactions are spooled under data_dir; check its free space and permissions")
}

fn protocol_error(primary: String) -> Error {
    Error::operator(primary).hint(
        "this is a bug in cutover or an unsupported server; report it with the server version",
    )
}

/// The xid a change carries inside a streamed block (the subtransaction's own xid).
fn change_xid(msg: &LogicalMessage) -> Option<u32> {
    match msg {
        LogicalMessage::Relation(r) => r.xid,
        LogicalMessage::Type(t) => t.xid,
        LogicalMessage::Insert(i) => i.xid,
        LogicalMessage::Update(u) => u.xid,
        LogicalMessage::Delete(d) => d.xid,
        LogicalMessage::Truncate(t) => t.xid,
        LogicalMessage::Message(m) => m.xid,
        _ => None,
    }
}

impl Destreamer {
    /// A de-streamer spooling under `dir`, which is created, and emptied of the files an
    /// earlier run left behind.
    pub fn new(dir: PathBuf) -> Result<Self> {
        fs::create_dir_all(&dir).map_err(|e| io_error("create the directory of", &dir, e))?;
        let entries = fs::read_dir(&dir).map_err(|e| io_error("list", &dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "spool") {
                fs::remove_file(&path).map_err(|e| io_error("remove", &path, e))?;
            }
        }
        Ok(Self {
            dir,
            open: HashMap::new(),
            current: None,
            replay: None,
        })
    }

    /// Whether the next message arrives inside a streamed block (its changes then carry
    /// an xid, see [`decode::decode_bytes`]).
    pub fn in_stream(&self) -> bool {
        self.current.is_some()
    }

    /// Streamed transactions received in part and not ended yet.
    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }

    /// Take one decoded message, with the bytes it was decoded from.
    pub fn push(&mut self, raw: &Bytes, msg: LogicalMessage) -> Result<Pushed> {
        if self.replay.is_some() {
            return Err(protocol_error(
                "a message arrived while a streamed transaction was being read back".into(),
            ));
        }
        match msg {
            LogicalMessage::StreamStart(s) => {
                if let Some(other) = self.current {
                    return Err(protocol_error(format!(
                        "stream start for transaction {} inside the block of transaction {other}",
                        s.xid
                    )));
                }
                if s.first_segment || !self.open.contains_key(&s.xid) {
                    // A first block starts the file afresh. A later block of a transaction
                    // we have no file for means the stream began in its middle, which the
                    // server never does after a reconnect; refuse rather than apply half.
                    if !s.first_segment {
                        return Err(protocol_error(format!(
                            "streamed transaction {} continues, but its first block was not received",
                            s.xid
                        )));
                    }
                    self.discard(s.xid);
                    let path = self.dir.join(format!("{}.spool", s.xid));
                    let file = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&path)
                        .map_err(|e| io_error("create", &path, e))?;
                    self.open.insert(
                        s.xid,
                        Spooled {
                            path,
                            writer: BufWriter::with_capacity(256 * 1024, file),
                            len: 0,
                            subxacts: Vec::new(),
                            subxact_index: HashMap::new(),
                            descriptions: HashMap::new(),
                        },
                    );
                }
                self.current = Some(s.xid);
                Ok(Pushed::Held)
            }
            LogicalMessage::StreamStop => {
                if self.current.take().is_none() {
                    return Err(protocol_error(
                        "stream stop outside a streamed block".into(),
                    ));
                }
                Ok(Pushed::Held)
            }
            LogicalMessage::StreamAbort(a) => {
                self.outside_block("stream abort")?;
                if a.xid == a.subxid {
                    self.discard(a.xid);
                } else if let Some(spooled) = self.open.get_mut(&a.xid) {
                    spooled.abort_subxact(a.subxid)?;
                }
                Ok(Pushed::Held)
            }
            LogicalMessage::StreamCommit(c) => {
                self.outside_block("stream commit")?;
                let Some(spooled) = self.open.remove(&c.xid) else {
                    // Nothing of it was received (every block came before where the
                    // stream started): an empty transaction to hand on.
                    return Err(protocol_error(format!(
                        "stream commit for transaction {}, of which no block was received",
                        c.xid
                    )));
                };
                let path = spooled.path.clone();
                let mut file = spooled
                    .writer
                    .into_inner()
                    .map_err(|e| io_error("write", &path, e.into_error()))?;
                file.seek(SeekFrom::Start(0))
                    .map_err(|e| io_error("read", &path, e))?;
                self.replay = Some(Replaying {
                    path,
                    reader: BufReader::with_capacity(256 * 1024, file),
                    xid: c.xid,
                    commit: Commit {
                        flags: c.flags,
                        commit_lsn: c.commit_lsn,
                        end_lsn: c.end_lsn,
                        commit_timestamp: c.commit_timestamp,
                    },
                    begun: false,
                });
                Ok(Pushed::Replay)
            }
            msg => {
                let Some(top) = self.current else {
                    return Ok(Pushed::Pass(msg));
                };
                let spooled = self.open.get_mut(&top).ok_or_else(|| {
                    protocol_error(format!("no spool for streamed transaction {top}"))
                })?;
                let sub = change_xid(&msg).unwrap_or(top);
                spooled.append(raw, &msg, top, sub)?;
                Ok(Pushed::Held)
            }
        }
    }

    fn outside_block(&self, what: &str) -> Result<()> {
        match self.current {
            Some(xid) => Err(protocol_error(format!(
                "{what} inside the streamed block of transaction {xid}"
            ))),
            None => Ok(()),
        }
    }

    /// The next message of the transaction being read back: Begin, its changes, then
    /// Commit; `None` once it has all been handed on (the file is then removed).
    pub fn replay_next(&mut self) -> Result<Option<LogicalMessage>> {
        let Some(r) = &mut self.replay else {
            return Ok(None);
        };
        if !r.begun {
            // The Begin is made up from the commit: a transaction's final LSN is its
            // commit LSN.
            r.begun = true;
            return Ok(Some(LogicalMessage::Begin(Begin {
                final_lsn: r.commit.commit_lsn,
                commit_timestamp: r.commit.commit_timestamp,
                xid: r.xid,
            })));
        }
        let mut len = [0u8; 4];
        match r.reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let done = self.replay.take().expect("replay present");
                let _ = fs::remove_file(&done.path);
                return Ok(Some(LogicalMessage::Commit(done.commit)));
            }
            Err(e) => return Err(io_error("read", &r.path, e)),
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_SPOOLED_MESSAGE {
            return Err(protocol_error(format!(
                "spool file \"{}\" is corrupt: a message of {len} bytes",
                r.path.display()
            )));
        }
        let mut buf = vec![0u8; len as usize];
        r.reader
            .read_exact(&mut buf)
            .map_err(|e| io_error("read", &r.path, e))?;
        let msg = decode::decode_bytes(&Bytes::from(buf), true).map_err(|e| {
            protocol_error(format!(
                "could not decode a spooled change of a streamed transaction: {e}"
            ))
        })?;
        Ok(Some(msg))
    }

    /// Whether a committed streamed transaction is being read back.
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    fn discard(&mut self, xid: u32) {
        if let Some(s) = self.open.remove(&xid) {
            drop(s.writer);
            let _ = fs::remove_file(&s.path);
        }
    }
}

impl Drop for Destreamer {
    fn drop(&mut self) {
        for (_, s) in self.open.drain() {
            drop(s.writer);
            let _ = fs::remove_file(&s.path);
        }
        if let Some(r) = self.replay.take() {
            let _ = fs::remove_file(&r.path);
        }
    }
}

impl Spooled {
    fn append(&mut self, raw: &Bytes, msg: &LogicalMessage, top: u32, sub: u32) -> Result<()> {
        let at = self.len;
        if sub != top && !self.subxact_index.contains_key(&sub) {
            self.subxact_index.insert(sub, self.subxacts.len());
            self.subxacts.push((sub, at));
        }
        match msg {
            LogicalMessage::Relation(r) => {
                self.descriptions.insert((b'R', r.oid), (at, raw.clone()));
            }
            LogicalMessage::Type(t) => {
                self.descriptions.insert((b'Y', t.oid), (at, raw.clone()));
            }
            _ => {}
        }
        self.write(raw)
    }

    fn write(&mut self, raw: &Bytes) -> Result<()> {
        let len = u32::try_from(raw.len())
            .ok()
            .filter(|l| *l <= MAX_SPOOLED_MESSAGE)
            .ok_or_else(|| protocol_error(format!("a message of {} bytes", raw.len())))?;
        self.writer
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.writer.write_all(raw))
            .map_err(|e| io_error("write", &self.path, e))?;
        self.len += 4 + u64::from(len);
        Ok(())
    }

    /// Cut off the changes of `subxid` and of the subtransactions that started after it.
    fn abort_subxact(&mut self, subxid: u32) -> Result<()> {
        let Some(&i) = self.subxact_index.get(&subxid) else {
            // It wrote nothing that reached us.
            return Ok(());
        };
        let cut = self.subxacts[i].1;
        for (x, _) in self.subxacts.drain(i..) {
            self.subxact_index.remove(&x);
        }
        self.writer
            .flush()
            .map_err(|e| io_error("write", &self.path, e))?;
        let file = self.writer.get_mut();
        file.set_len(cut)
            .and_then(|()| file.seek(SeekFrom::Start(cut)).map(|_| ()))
            .map_err(|e| io_error("truncate", &self.path, e))?;
        self.len = cut;
        let mut lost: Vec<((u8, u32), u64, Bytes)> = self
            .descriptions
            .iter()
            .filter(|(_, (at, _))| *at >= cut)
            .map(|(key, (at, raw))| (*key, *at, raw.clone()))
            .collect();
        lost.sort_by_key(|(_, at, _)| *at);
        for (key, _, raw) in lost {
            let at = self.len;
            self.write(&raw)?;
            self.descriptions.insert(key, (at, raw));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::pg_source::decode::{
        ColumnValue, Insert, Relation, RelationColumn, ReplicaIdentity, StreamAbort, StreamCommit,
        StreamStart, TupleData,
    };

    struct Feed {
        d: Destreamer,
        _dir: tempfile::TempDir,
    }

    impl Feed {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = Destreamer::new(dir.path().join("spool")).unwrap();
            Self { d, _dir: dir }
        }

        /// Push a message as the server would send it; the pass-through ones come back.
        fn push(&mut self, msg: LogicalMessage) -> Result<Option<LogicalMessage>> {
            let in_stream = self.d.in_stream()
                && !matches!(
                    msg,
                    LogicalMessage::StreamStop | LogicalMessage::StreamStart(_)
                );
            let raw = Bytes::from(decode::encode(&msg, in_stream));
            let decoded = decode::decode_bytes(&raw, in_stream).unwrap();
            match self.d.push(&raw, decoded)? {
                Pushed::Pass(m) => Ok(Some(m)),
                Pushed::Held => Ok(None),
                Pushed::Replay => Ok(None),
            }
        }

        fn replayed(&mut self) -> Vec<String> {
            let mut out = Vec::new();
            while let Some(m) = self.d.replay_next().unwrap() {
                out.push(describe(&m));
            }
            assert!(!self.d.replaying());
            out
        }

        fn spool_files(&self) -> usize {
            fs::read_dir(&self.d.dir).unwrap().count()
        }
    }

    fn describe(m: &LogicalMessage) -> String {
        match m {
            LogicalMessage::Begin(b) => format!("begin {} {}", b.xid, b.final_lsn),
            LogicalMessage::Commit(c) => format!("commit {} {}", c.commit_lsn, c.end_lsn),
            LogicalMessage::Relation(r) => format!("relation {}", r.oid),
            LogicalMessage::Insert(i) => match &i.new.columns[0] {
                ColumnValue::Text(t) => format!("insert {}", String::from_utf8_lossy(t)),
                other => format!("insert {other:?}"),
            },
            other => format!("{other:?}"),
        }
    }

    fn start(xid: u32, first: bool) -> LogicalMessage {
        LogicalMessage::StreamStart(StreamStart {
            xid,
            first_segment: first,
        })
    }

    fn insert(xid: u32, value: &str) -> LogicalMessage {
        LogicalMessage::Insert(Insert {
            xid: Some(xid),
            oid: 16384,
            new: TupleData {
                columns: vec![ColumnValue::Text(Bytes::from(value.to_string()))],
            },
        })
    }

    fn relation(xid: u32, oid: u32) -> LogicalMessage {
        LogicalMessage::Relation(Relation {
            xid: Some(xid),
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![RelationColumn {
                flags: RelationColumn::KEY,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
        })
    }

    fn commit(xid: u32, lsn: u64) -> LogicalMessage {
        LogicalMessage::StreamCommit(StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_timestamp: 1,
        })
    }

    fn abort(xid: u32, subxid: u32) -> LogicalMessage {
        LogicalMessage::StreamAbort(StreamAbort {
            xid,
            subxid,
            abort_lsn: None,
            abort_timestamp: None,
        })
    }

    #[test]
    fn blocks_are_handed_on_whole_at_commit_and_others_pass_between() {
        let mut f = Feed::new();
        assert!(f.push(start(100, true)).unwrap().is_none());
        f.push(insert(100, "a")).unwrap();
        f.push(insert(100, "b")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        // A small transaction committed meanwhile goes straight through.
        let begin = LogicalMessage::Begin(Begin {
            final_lsn: Lsn(50),
            commit_timestamp: 0,
            xid: 200,
        });
        assert_eq!(describe(&f.push(begin).unwrap().unwrap()), "begin 200 0/32");
        f.push(start(100, false)).unwrap();
        f.push(insert(100, "c")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        assert_eq!(f.d.open_transactions(), 1);
        f.push(commit(100, 0x1000)).unwrap();
        assert_eq!(
            f.replayed(),
            [
                "begin 100 0/1000",
                "insert a",
                "insert b",
                "insert c",
                "commit 0/1000 0/1008"
            ]
        );
        assert_eq!(f.spool_files(), 0, "the spool file is removed once read");
        assert_eq!(f.d.open_transactions(), 0);
    }

    #[test]
    fn an_aborted_subtransaction_and_those_nested_in_it_are_cut_off() {
        let mut f = Feed::new();
        f.push(start(100, true)).unwrap();
        f.push(insert(100, "a")).unwrap();
        f.push(relation(101, 7)).unwrap();
        f.push(insert(101, "b")).unwrap();
        f.push(insert(102, "c")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        f.push(abort(100, 101)).unwrap();
        f.push(start(100, false)).unwrap();
        f.push(insert(100, "d")).unwrap();
        f.push(insert(103, "e")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        // A subtransaction we never saw a change of: nothing to cut.
        f.push(abort(100, 999)).unwrap();
        f.push(commit(100, 0x2000)).unwrap();
        assert_eq!(
            f.replayed(),
            [
                "begin 100 0/2000",
                "insert a",
                // The description sent inside the aborted subtransaction is kept: the
                // server will not send it again.
                "relation 7",
                "insert d",
                "insert e",
                "commit 0/2000 0/2008"
            ]
        );
    }

    #[test]
    fn an_aborted_transaction_leaves_nothing() {
        let mut f = Feed::new();
        f.push(start(100, true)).unwrap();
        f.push(insert(100, "a")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        assert_eq!(f.spool_files(), 1);
        f.push(abort(100, 100)).unwrap();
        assert_eq!(f.spool_files(), 0);
        assert_eq!(f.d.open_transactions(), 0);
        assert!(!f.d.replaying());
        // A first block again (after a reconnect the server streams from the start).
        f.push(start(100, true)).unwrap();
        f.push(insert(100, "z")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        f.push(commit(100, 0x10)).unwrap();
        assert_eq!(f.replayed().len(), 3);
    }

    #[test]
    fn a_restart_begins_with_an_empty_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        fs::create_dir_all(&spool).unwrap();
        fs::write(spool.join("77.spool"), b"left behind").unwrap();
        fs::write(spool.join("keep.txt"), b"not ours").unwrap();
        let d = Destreamer::new(spool.clone()).unwrap();
        assert!(!spool.join("77.spool").exists());
        assert!(spool.join("keep.txt").exists());
        drop(d);
    }

    #[test]
    fn out_of_place_stream_messages_are_errors() {
        let mut f = Feed::new();
        assert!(f.push(LogicalMessage::StreamStop).is_err());
        let mut f = Feed::new();
        assert!(
            f.push(start(5, false)).is_err(),
            "a later block without the first"
        );
        let mut f = Feed::new();
        assert!(
            f.push(commit(5, 1)).is_err(),
            "a commit of nothing received"
        );
        let mut f = Feed::new();
        f.push(start(5, true)).unwrap();
        assert!(f.push(start(6, true)).is_err(), "nested blocks");
        let mut f = Feed::new();
        f.push(start(5, true)).unwrap();
        assert!(f.push(commit(5, 1)).is_err(), "commit inside a block");
    }

    #[test]
    fn a_corrupt_spool_file_is_an_error_not_a_panic() {
        let mut f = Feed::new();
        f.push(start(100, true)).unwrap();
        f.push(insert(100, "a")).unwrap();
        f.push(LogicalMessage::StreamStop).unwrap();
        let path = f.d.open[&100].path.clone();
        f.d.open.get_mut(&100).unwrap().writer.flush().unwrap();
        fs::write(&path, [9u8, 0, 0, 0, b'I', 1]).unwrap();
        f.push(commit(100, 0x10)).unwrap();
        assert!(f.d.replay_next().is_ok(), "begin");
        assert!(f.d.replay_next().is_err());
    }
}
