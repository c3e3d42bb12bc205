//! A pool of hashing threads fed by bounded channels.
//!
//! blake3 over a chunk is pure CPU work; running it on the async runtime would stall the tasks
//! that keep both `COPY` streams flowing, and `spawn_blocking` gives no bound on queued work. The
//! [`HashPool`] owns `N` plain threads. The producer (the task that reads a side and frames its
//! rows into chunk buffers, see [`crate::canonical`] and [`crate::copy_text`]) submits one byte
//! buffer per chunk; digests come back **in submission order**.
//!
//! Memory is bounded: at most `max_in_flight` chunks are queued or being hashed, the job and
//! result channels both have that capacity (so a worker never blocks on sending a result and the
//! pool cannot deadlock with its single producer/consumer), and finished buffers are handed back
//! through [`HashPool::buffer`] so steady state allocates nothing.

use std::collections::BTreeMap;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::canonical::domain_hasher;

/// Why the pool cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum HashPoolError {
    /// A worker thread could not be started.
    #[error("could not start hashing thread")]
    Spawn(#[source] std::io::Error),
    /// A worker thread exited (it panicked); its chunk has no digest.
    #[error("hashing thread exited unexpectedly")]
    WorkerGone,
}

struct Job {
    sequence: u64,
    bytes: Vec<u8>,
}

struct Done {
    sequence: u64,
    digest: [u8; 32],
    bytes: Vec<u8>,
}

/// Threads that hash chunk buffers under one table domain.
///
/// The digest of a chunk is `blake3(domain prefix ‖ bytes)`; for rows framed with
/// [`crate::chunk::encode_chunk_row`] that equals [`crate::chunk::chunk_digest`], the value the
/// in-line comparison computes.
pub struct HashPool {
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    max_in_flight: usize,
    submitted: u64,
    received: u64,
    emitted: u64,
    ready: BTreeMap<u64, [u8; 32]>,
    spare: Vec<Vec<u8>>,
}

impl HashPool {
    /// Start `threads` hashing threads (at least one) with at most `max_in_flight` chunks queued
    /// or in progress (at least `threads`).
    pub fn new(
        table_domain: &[u8],
        threads: usize,
        max_in_flight: usize,
    ) -> Result<Self, HashPoolError> {
        let threads = threads.max(1);
        let max_in_flight = max_in_flight.max(threads);
        let (job_tx, job_rx) = bounded::<Job>(max_in_flight);
        let (done_tx, done_rx) = bounded::<Done>(max_in_flight);
        let prefix = domain_hasher(table_domain);
        let mut workers = Vec::with_capacity(threads);
        for index in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let prefix = prefix.clone();
            let handle = std::thread::Builder::new()
                .name(format!("verify-hash-{index}"))
                .spawn(move || {
                    for Job { sequence, bytes } in job_rx {
                        let mut hasher = prefix.clone();
                        hasher.update(&bytes);
                        let digest = *hasher.finalize().as_bytes();
                        let done = Done {
                            sequence,
                            digest,
                            bytes,
                        };
                        if done_tx.send(done).is_err() {
                            break;
                        }
                    }
                })
                .map_err(HashPoolError::Spawn)?;
            workers.push(handle);
        }
        Ok(Self {
            jobs: Some(job_tx),
            results: done_rx,
            workers,
            max_in_flight,
            submitted: 0,
            received: 0,
            emitted: 0,
            ready: BTreeMap::new(),
            spare: Vec::new(),
        })
    }

    /// An empty buffer to frame the next chunk into (recycled from finished chunks when possible).
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Queue one chunk. Blocks (collecting finished digests) while `max_in_flight` chunks are
    /// outstanding.
    pub fn submit(&mut self, bytes: Vec<u8>) -> Result<(), HashPoolError> {
        while self.submitted - self.received >= self.max_in_flight as u64 {
            self.receive_one()?;
        }
        let job = Job {
            sequence: self.submitted,
            bytes,
        };
        self.jobs
            .as_ref()
            .ok_or(HashPoolError::WorkerGone)?
            .send(job)
            .map_err(|_| HashPoolError::WorkerGone)?;
        self.submitted += 1;
        Ok(())
    }

    /// The next digest in submission order if it is already finished.
    pub fn try_next_digest(&mut self) -> Result<Option<[u8; 32]>, HashPoolError> {
        while let Ok(done) = self.results.try_recv() {
            self.accept(done);
        }
        Ok(self.pop_ready())
    }

    /// The next digest in submission order, waiting for it; `None` when every submitted chunk's
    /// digest has been returned.
    pub fn next_digest(&mut self) -> Result<Option<[u8; 32]>, HashPoolError> {
        if self.emitted == self.submitted {
            return Ok(None);
        }
        loop {
            if let Some(digest) = self.pop_ready() {
                return Ok(Some(digest));
            }
            self.receive_one()?;
        }
    }

    /// Wait for all outstanding chunks and return their digests in order.
    pub fn finish(&mut self) -> Result<Vec<[u8; 32]>, HashPoolError> {
        let mut digests = Vec::with_capacity((self.submitted - self.emitted) as usize);
        while let Some(digest) = self.next_digest()? {
            digests.push(digest);
        }
        Ok(digests)
    }

    fn receive_one(&mut self) -> Result<(), HashPoolError> {
        let done = self.results.recv().map_err(|_| HashPoolError::WorkerGone)?;
        self.accept(done);
        Ok(())
    }

    fn accept(&mut self, done: Done) {
        self.received += 1;
        self.ready.insert(done.sequence, done.digest);
        if self.spare.len() < self.max_in_flight {
            self.spare.push(done.bytes);
        }
    }

    fn pop_ready(&mut self) -> Option<[u8; 32]> {
        let digest = self.ready.remove(&self.emitted)?;
        self.emitted += 1;
        Some(digest)
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        // Closing the job channel ends the workers' loops; drain results so none blocks on send.
        self.jobs = None;
        while self.results.recv().is_ok() {}
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{Row, chunk_digest, encode_chunk_row};

    fn reference(domain: &[u8], bytes: &[u8]) -> [u8; 32] {
        let mut hasher = domain_hasher(domain);
        hasher.update(bytes);
        *hasher.finalize().as_bytes()
    }

    #[test]
    fn digests_come_back_in_order() {
        let mut pool = HashPool::new(b"t", 4, 3).expect("pool");
        let chunks: Vec<Vec<u8>> = (0..200u32)
            .map(|i| vec![(i % 251) as u8; (i as usize * 97) % 5000])
            .collect();
        let mut digests = Vec::new();
        for chunk in &chunks {
            let mut buffer = pool.buffer();
            buffer.extend_from_slice(chunk);
            pool.submit(buffer).expect("submit");
            while let Some(digest) = pool.try_next_digest().expect("try_next") {
                digests.push(digest);
            }
        }
        digests.extend(pool.finish().expect("finish"));
        let expected: Vec<[u8; 32]> = chunks.iter().map(|c| reference(b"t", c)).collect();
        assert_eq!(digests, expected);
        assert_eq!(pool.next_digest().expect("next"), None);
    }

    #[test]
    fn in_flight_and_spares_stay_bounded() {
        let mut pool = HashPool::new(b"t", 2, 4).expect("pool");
        for i in 0..100u8 {
            let mut buffer = pool.buffer();
            buffer.push(i);
            pool.submit(buffer).expect("submit");
            assert!(pool.submitted - pool.received <= 4);
            assert!(pool.spare.len() <= 4);
        }
        assert_eq!(pool.finish().expect("finish").len(), 100);
    }

    #[test]
    fn matches_inline_chunk_digest() {
        let rows: Vec<Row> = (0..5000)
            .map(|i: u32| {
                let id = Some(i.to_string().into_bytes());
                Row::new(vec![id.clone()], vec![id, None, Some(Vec::new())])
            })
            .collect();
        let mut pool = HashPool::new(b"d", 1, 1).expect("pool");
        let mut buffer = pool.buffer();
        for row in &rows {
            encode_chunk_row(&mut buffer, row);
        }
        let expected = chunk_digest(b"d", &rows);
        assert_eq!(reference(b"d", &buffer), expected);
        pool.submit(buffer).expect("submit");
        assert_eq!(pool.finish().expect("finish"), vec![expected]);
    }

    #[test]
    fn drop_with_outstanding_work_does_not_hang() {
        let mut pool = HashPool::new(b"t", 2, 2).expect("pool");
        for _ in 0..2 {
            let buffer = pool.buffer();
            pool.submit(buffer).expect("submit");
        }
        drop(pool);
    }
}
