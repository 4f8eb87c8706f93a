//! How bucket bytes travel between a sender and a receiver, behind one interface: a ring of
//! slots in shared memory (same host) or in this process's memory (same process), or the
//! connection itself (any host). Memory held by a
//! transfer is the ring (or one bucket buffer per side), whatever the model's size.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weightlift_cuda::SharedMemory;

use crate::protocol::{Conn, Message, ProtocolError, RingInfo};
use crate::report::UpdateReport;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Reading a source from disk failed (the error names the file and range).
    #[error(transparent)]
    Disk(#[from] weightlift_cuda::ReadError),
    #[error("shared memory: {0}")]
    Memory(String),
    /// The receiver ended the update early and said why.
    #[error("the receiver failed the update: {}", .0.error.as_deref().unwrap_or("no reason given"))]
    ReceiverFailed(Box<UpdateReport>),
    #[error("the sender aborted the update: {0}")]
    SenderAborted(String),
    #[error("{0}")]
    Unexpected(String),
}

/// Ring slots in this process's memory, for a sender and receiver in one process.
pub struct LocalRing {
    slots: Vec<Mutex<Vec<u8>>>,
}

impl LocalRing {
    pub fn new(slots: u32, slot_bytes: u64) -> LocalRing {
        LocalRing { slots: (0..slots).map(|_| Mutex::new(vec![0u8; slot_bytes as usize])).collect() }
    }
}

/// Where ring slots live: shared memory between processes, or memory of this process.
pub enum RingMemory {
    Shared(SharedMemory),
    Local(Arc<LocalRing>),
}

impl RingMemory {
    fn with_slot_mut<R>(&mut self, slot: u32, slot_bytes: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
        match self {
            RingMemory::Shared(memory) => {
                let start = (u64::from(slot) * slot_bytes) as usize;
                f(&mut memory.as_mut_slice()[start..start + slot_bytes as usize])
            }
            // The protocol hands each slot to one side at a time, so the lock is never contended.
            RingMemory::Local(ring) => f(&mut ring.slots[slot as usize].lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    fn with_slot<R>(&self, slot: u32, slot_bytes: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            RingMemory::Shared(memory) => {
                let start = (u64::from(slot) * slot_bytes) as usize;
                f(&memory.as_slice()[start..start + slot_bytes as usize])
            }
            RingMemory::Local(ring) => f(&ring.slots[slot as usize].lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// The sender's half.
pub enum SendPath {
    Ring {
        memory: RingMemory,
        slot_bytes: u64,
        free: VecDeque<u32>,
    },
    Socket {
        buffer: Vec<u8>,
    },
    /// Buckets copied into the receiver's device slots by this process.
    Device(Box<crate::device_writes::SlotWriter>),
}

impl SendPath {
    pub fn ring(info: &RingInfo) -> Result<SendPath, TransferError> {
        let len = info.slots as u64 * info.slot_bytes;
        let memory = SharedMemory::open(std::path::Path::new(&info.path), len as usize)
            .map_err(|e| TransferError::Memory(e.to_string()))?;
        Ok(SendPath::Ring {
            memory: RingMemory::Shared(memory),
            slot_bytes: info.slot_bytes,
            free: (0..info.slots).collect(),
        })
    }

    pub fn local(ring: Arc<LocalRing>, info: &RingInfo) -> SendPath {
        SendPath::Ring { memory: RingMemory::Local(ring), slot_bytes: info.slot_bytes, free: (0..info.slots).collect() }
    }

    pub fn socket(bucket_bytes: u64) -> SendPath {
        SendPath::Socket { buffer: vec![0u8; bucket_bytes as usize] }
    }

    /// Fills bucket `index` (`bytes` long) with `fill` and hands it to the receiver.
    pub fn send_bucket(
        &mut self,
        conn: &mut Conn,
        index: u32,
        bytes: u64,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), TransferError> {
        match self {
            SendPath::Ring { memory, slot_bytes, free } => {
                while free.is_empty() {
                    let slot = wait_for_free_slot(conn, timeout)?;
                    free.push_back(slot);
                }
                let slot = free.pop_front().expect("a free slot");
                memory.with_slot_mut(slot, *slot_bytes, |buf| fill(&mut buf[..bytes as usize]));
                conn.send(&Message::BucketReady { index, slot, bytes })?;
            }
            SendPath::Socket { buffer } => {
                fill(&mut buffer[..bytes as usize]);
                conn.send(&Message::Data { index, bytes })?;
                conn.send_data(&buffer[..bytes as usize])?;
            }
            SendPath::Device(writer) => {
                let slot = writer.free_slot(conn, timeout)?;
                writer.fill_slot(slot, bytes, fill)?;
                conn.send(&Message::BucketReady { index, slot, bytes })?;
            }
        }
        Ok(())
    }

    /// Calls `f` with each range of host memory buckets are filled in (to page-lock it for
    /// copies down from a GPU); none for device slots, which have their own.
    pub fn each_memory(&self, mut f: impl FnMut(&[u8])) {
        match self {
            SendPath::Ring { memory: RingMemory::Shared(memory), .. } => f(memory.as_slice()),
            SendPath::Ring { memory: RingMemory::Local(ring), .. } => {
                ring.slots.iter().for_each(|slot| f(&slot.lock().unwrap_or_else(|e| e.into_inner())))
            }
            SendPath::Socket { buffer } => f(buffer),
            SendPath::Device(_) => {}
        }
    }

    /// After `End`: waits for the report, taking back ring slots returned meanwhile.
    pub fn await_report(&mut self, conn: &mut Conn, timeout: Duration) -> Result<UpdateReport, TransferError> {
        loop {
            match conn.recv(timeout)? {
                Message::Report { report } => return Ok(report),
                Message::SlotFree { slot } => self.give_back(slot),
                other => return Err(unexpected("report", &other)),
            }
        }
    }

    /// A ring slot the receiver is done with.
    pub fn give_back(&mut self, slot: u32) {
        let free = match self {
            SendPath::Ring { free, .. } => free,
            SendPath::Device(writer) => &mut writer.free,
            SendPath::Socket { .. } => return,
        };
        if !free.contains(&slot) {
            free.push_back(slot);
        }
    }
}

pub(crate) fn wait_for_free_slot(conn: &mut Conn, timeout: Duration) -> Result<u32, TransferError> {
    match conn.recv(timeout)? {
        Message::SlotFree { slot } => Ok(slot),
        Message::Report { report } => Err(TransferError::ReceiverFailed(Box::new(report))),
        other => Err(unexpected("slot_free", &other)),
    }
}

fn unexpected(expected: &str, got: &Message) -> TransferError {
    TransferError::Unexpected(format!("expected {expected}, got {}", got.name()))
}

/// Where a bucket arrived.
pub enum Arrived<'a> {
    Host(&'a [u8]),
    /// In this device slot (the sender copied it there).
    DeviceSlot(u32),
}

/// The receiver's half.
pub enum RecvPath {
    /// `device_slots`: how many device slots the sender copies buckets into instead (none:
    /// they come through the ring).
    Ring {
        memory: RingMemory,
        slot_bytes: u64,
        slots: u32,
        device_slots: u32,
    },
    Socket {
        buffer: Vec<u8>,
    },
}

impl RecvPath {
    /// Creates a ring of `slots` slots for a sender on this host.
    pub fn ring(slots: u32, slot_bytes: u64) -> Result<(RecvPath, RingInfo), TransferError> {
        let memory = SharedMemory::create("weightlift-ring", (u64::from(slots) * slot_bytes) as usize)
            .map_err(|e| TransferError::Memory(e.to_string()))?;
        let info = RingInfo { path: memory.path().display().to_string(), slots, slot_bytes };
        Ok((RecvPath::Ring { memory: RingMemory::Shared(memory), slot_bytes, slots, device_slots: 0 }, info))
    }

    /// A ring in this process's memory for an in-process sender.
    pub fn local(ring: Arc<LocalRing>) -> (RecvPath, RingInfo) {
        let slots = ring.slots.len() as u32;
        let slot_bytes = ring.slots.first().map_or(0, |s| s.lock().unwrap_or_else(|e| e.into_inner()).len() as u64);
        let info = RingInfo { path: "in-process".into(), slots, slot_bytes };
        (RecvPath::Ring { memory: RingMemory::Local(ring), slot_bytes, slots, device_slots: 0 }, info)
    }

    pub fn socket(bucket_bytes: u64) -> RecvPath {
        RecvPath::Socket { buffer: vec![0u8; bucket_bytes as usize] }
    }

    /// Calls `f` with each range of host memory buckets arrive in (to page-lock it for a GPU).
    pub fn each_memory(&self, mut f: impl FnMut(&[u8])) {
        match self {
            RecvPath::Ring { memory: RingMemory::Shared(memory), .. } => f(memory.as_slice()),
            RecvPath::Ring { memory: RingMemory::Local(ring), .. } => {
                ring.slots.iter().for_each(|slot| f(&slot.lock().unwrap_or_else(|e| e.into_inner())))
            }
            RecvPath::Socket { buffer } => f(buffer),
        }
    }

    /// From now on buckets arrive in `count` device slots (the sender mapped them).
    pub fn use_device_slots(&mut self, count: u32) {
        if let RecvPath::Ring { device_slots, .. } = self {
            *device_slots = count;
        }
    }

    /// Once the sender has mapped the ring, its name can go: nothing leaks if either dies.
    pub fn unlink(&self) {
        if let RecvPath::Ring { memory: RingMemory::Shared(memory), .. } = self {
            let _ = memory.unlink();
        }
    }

    /// Receives bucket `index` of `bytes` bytes and hands it to `consume`.
    pub fn recv_bucket<R>(
        &mut self,
        conn: &mut Conn,
        index: u32,
        bytes: u64,
        timeout: Duration,
        consume: impl FnOnce(Arrived<'_>) -> R,
    ) -> Result<R, TransferError> {
        let message = conn.recv(timeout)?;
        match (self, message) {
            (
                RecvPath::Ring { memory, slot_bytes, slots, device_slots },
                Message::BucketReady { index: i, slot, bytes: b },
            ) => {
                let (held, place) = if *device_slots > 0 { (*device_slots, "device slots") } else { (*slots, "slots") };
                if i != index || b != bytes || slot >= held || b > *slot_bytes {
                    return Err(TransferError::Unexpected(format!(
                        "bucket {i} of {b} bytes in slot {slot}; expected bucket {index} of {bytes} bytes in one of {held} {place}"
                    )));
                }
                let result = match *device_slots {
                    0 => memory.with_slot(slot, *slot_bytes, |buf| consume(Arrived::Host(&buf[..bytes as usize]))),
                    _ => consume(Arrived::DeviceSlot(slot)),
                };
                match conn.send(&Message::SlotFree { slot }) {
                    // This bucket landed. A sender that hung up (or died) after sending more
                    // left those readable: the next read takes them and then finds the close,
                    // which names where the sender stopped; failing here would blame this
                    // bucket, and leave the ones it sent after unread.
                    Err(ProtocolError::Io(e)) if peer_gone(&e) => {}
                    sent => sent?,
                }
                Ok(result)
            }
            (RecvPath::Socket { buffer }, Message::Data { index: i, bytes: b }) => {
                if i != index || b != bytes {
                    return Err(TransferError::Unexpected(format!(
                        "data for bucket {i} of {b} bytes; expected bucket {index} of {bytes} bytes"
                    )));
                }
                conn.recv_data(&mut buffer[..bytes as usize], timeout)?;
                Ok(consume(Arrived::Host(&buffer[..bytes as usize])))
            }
            (_, Message::Abort { reason }) => Err(TransferError::SenderAborted(reason)),
            (_, other) => Err(unexpected("a bucket", &other)),
        }
    }
}

/// A write failed because the peer closed its end (what it sent before may still be readable).
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
}
