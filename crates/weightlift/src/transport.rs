//! How bucket bytes travel between a sender and a receiver, behind one interface: a ring of
//! slots in shared memory (same host) or in this process's memory (same process), or the
//! connection itself (any host). Memory held by a
//! transfer is the ring, or over a socket [`SOCKET_BUFFERS`] bucket buffers per side (one
//! packed or consumed while the other is on the wire), whatever the model's size.

use std::collections::VecDeque;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// A thread moving bucket bytes panicked (a bug); the update is broken off.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Bucket buffers per side over a socket: bucket k+1 is packed (sender) or read (receiver)
/// while bucket k is on the wire (or consumed), so each side holds at most two buckets.
pub const SOCKET_BUFFERS: usize = 2;

/// Why [`RecvPath::recv_buckets`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RecvBucketsError<E> {
    /// Bucket `index` did not arrive (the sender's `Abort` is [`TransferError::SenderAborted`]).
    #[error("bucket {index}: {error}")]
    Transfer { index: u32, error: TransferError },
    /// Consuming bucket `index` failed.
    #[error("consuming bucket {index}: {error}")]
    Consume { index: u32, error: E },
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
    /// Over the connection: one buffer packed while the other is written.
    Socket {
        buffers: [Vec<u8>; SOCKET_BUFFERS],
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
        SendPath::Socket { buffers: std::array::from_fn(|_| vec![0u8; bucket_bytes as usize]) }
    }

    /// Sends buckets `0..sizes.len()` (bucket k is `sizes[k]` bytes), each filled in order by
    /// `fill` on this thread; `before(k)` runs just before bucket k goes, once those before it
    /// went. Over a socket, bucket k+1 is filled while a thread of its own writes bucket k;
    /// the first error stops both (the writer's first: it is the earlier bucket). Elsewhere
    /// one bucket at a time, as [`SendPath::send_bucket`] (a failed fill is reported after
    /// its bucket went).
    pub fn send_buckets<E>(
        &mut self,
        conn: &mut Conn,
        sizes: &[u64],
        timeout: Duration,
        mut before: impl FnMut(u32, &Conn) -> Result<(), E> + Send,
        mut fill: impl FnMut(u32, &mut [u8]) -> Result<Vec<(u32, u64)>, E>,
    ) -> Result<(), E>
    where
        E: From<TransferError> + Send,
    {
        match self {
            SendPath::Socket { buffers } if sizes.len() > 1 => send_pipelined(buffers, conn, sizes, before, fill),
            path => {
                for (k, &bytes) in sizes.iter().enumerate() {
                    let k = k as u32;
                    before(k, conn)?;
                    let mut filled = Ok(());
                    path.send_bucket(conn, k, bytes, timeout, |payload| match fill(k, payload) {
                        Ok(digests) => digests,
                        Err(e) => {
                            filled = Err(e);
                            Vec::new()
                        }
                    })?;
                    filled?;
                }
                Ok(())
            }
        }
    }

    /// Fills bucket `index` (`bytes` long) with `fill` and hands it to the receiver, with the
    /// digests `fill` returns (those of the destinations it completes, for a streaming
    /// receiver; none otherwise).
    pub fn send_bucket(
        &mut self,
        conn: &mut Conn,
        index: u32,
        bytes: u64,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]) -> Vec<(u32, u64)>,
    ) -> Result<(), TransferError> {
        match self {
            SendPath::Ring { memory, slot_bytes, free } => {
                while free.is_empty() {
                    let slot = wait_for_free_slot(conn, timeout)?;
                    free.push_back(slot);
                }
                let slot = free.pop_front().expect("a free slot");
                let digests = memory.with_slot_mut(slot, *slot_bytes, |buf| fill(&mut buf[..bytes as usize]));
                conn.send(&Message::BucketReady { index, slot, bytes, digests })?;
            }
            SendPath::Socket { buffers } => {
                let payload = &mut buffers[0][..bytes as usize];
                let digests = fill(payload);
                write_bucket(conn, index, payload, digests)?;
            }
            SendPath::Device(writer) => {
                let slot = writer.free_slot(conn, timeout)?;
                let mut digests = Vec::new();
                writer.fill_slot(slot, bytes, |payload| digests = fill(payload))?;
                conn.send(&Message::BucketReady { index, slot, bytes, digests })?;
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
            SendPath::Socket { buffers } => buffers.iter().for_each(|buffer| f(buffer)),
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

/// Over a socket: bucket k goes on this thread's writer while the caller's thread fills k+1.
/// The buffers travel between the two over channels; either side stopping (done, failed or
/// panicked) hangs up its ends, which stops the other at its next hand-over.
fn send_pipelined<E>(
    buffers: &mut [Vec<u8>; SOCKET_BUFFERS],
    conn: &mut Conn,
    sizes: &[u64],
    mut before: impl FnMut(u32, &Conn) -> Result<(), E> + Send,
    mut fill: impl FnMut(u32, &mut [u8]) -> Result<Vec<(u32, u64)>, E>,
) -> Result<(), E>
where
    E: From<TransferError> + Send,
{
    std::thread::scope(|scope| {
        // Made inside the scope, so that a panicking fill drops them, and the writer ends,
        // before the scope waits for it. Whole buffers travel (with the length filled), so
        // each comes back whole.
        let (to_write, filled) = sync_channel::<(u32, &mut [u8], usize, Vec<(u32, u64)>)>(SOCKET_BUFFERS);
        let (to_fill, free) = sync_channel::<&mut [u8]>(SOCKET_BUFFERS);
        for buffer in buffers.iter_mut() {
            to_fill.send(buffer.as_mut_slice()).expect("the channel holds every buffer");
        }
        let writer = scope.spawn(move || -> Result<f64, E> {
            let mut writing = 0.0;
            for (k, buffer, bytes, digests) in filled {
                before(k, conn)?;
                let started = Instant::now();
                write_bucket(conn, k, &buffer[..bytes], digests)?;
                writing += started.elapsed().as_secs_f64();
                // Fails once the filler is done; what it queued still goes.
                let _ = to_fill.send(buffer);
            }
            Ok(writing)
        });
        let (mut filling, mut waiting) = (0.0, 0.0);
        let mut packed = || -> Result<(), E> {
            for (k, &bytes) in sizes.iter().enumerate() {
                // Either fails only once the writer stopped: its result says why.
                let started = Instant::now();
                let Ok(buffer) = free.recv() else { return Ok(()) };
                let got = Instant::now();
                let digests = fill(k as u32, &mut buffer[..bytes as usize])?;
                (waiting, filling) = (waiting + (got - started).as_secs_f64(), filling + got.elapsed().as_secs_f64());
                if to_write.send((k as u32, buffer, bytes as usize, digests)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        let packed = packed();
        // The writer sends what is queued, then finds the channel closed.
        drop((to_write, free));
        let written = writer.join().unwrap_or_else(|_| Err(TransferError::Panicked("socket writer").into()));
        if let Ok(writing) = &written {
            // Which side bounds a socket update: filling (packing, digests) or the socket.
            tracing::info!(
                fill_s = filling,
                wait_for_buffer_s = waiting,
                write_s = writing,
                "buckets sent over the socket"
            );
        }
        written.map(|_| ()).and(packed)
    })
}

/// Bucket `index` as a `Data` message (with its digests, if any) and its frame.
fn write_bucket(conn: &mut Conn, index: u32, payload: &[u8], digests: Vec<(u32, u64)>) -> Result<(), TransferError> {
    conn.send(&Message::Data { index, bytes: payload.len() as u64, digests })?;
    conn.send_data(payload)?;
    Ok(())
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
    Ring { memory: RingMemory, slot_bytes: u64, slots: u32, device_slots: u32 },
    /// Over the connection: one buffer read into while the other is consumed.
    Socket { buffers: [Vec<u8>; SOCKET_BUFFERS] },
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
        RecvPath::Socket { buffers: std::array::from_fn(|_| vec![0u8; bucket_bytes as usize]) }
    }

    /// Calls `f` with each range of host memory buckets arrive in (to page-lock it for a GPU).
    pub fn each_memory(&self, mut f: impl FnMut(&[u8])) {
        match self {
            RecvPath::Ring { memory: RingMemory::Shared(memory), .. } => f(memory.as_slice()),
            RecvPath::Ring { memory: RingMemory::Local(ring), .. } => {
                ring.slots.iter().for_each(|slot| f(&slot.lock().unwrap_or_else(|e| e.into_inner())))
            }
            RecvPath::Socket { buffers } => buffers.iter().for_each(|buffer| f(buffer)),
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

    /// Receives bucket `index` of `bytes` bytes and hands it to `consume`, with the digests
    /// the sender sent beside it (none unless this is a streaming receiver).
    pub fn recv_bucket<R>(
        &mut self,
        conn: &mut Conn,
        index: u32,
        bytes: u64,
        timeout: Duration,
        consume: impl FnOnce(Arrived<'_>, &[(u32, u64)]) -> R,
    ) -> Result<R, TransferError> {
        let message = conn.recv(timeout)?;
        match (self, message) {
            (
                RecvPath::Ring { memory, slot_bytes, slots, device_slots },
                Message::BucketReady { index: i, slot, bytes: b, digests },
            ) => {
                let (held, place) = if *device_slots > 0 { (*device_slots, "device slots") } else { (*slots, "slots") };
                if i != index || b != bytes || slot >= held || b > *slot_bytes {
                    return Err(TransferError::Unexpected(format!(
                        "bucket {i} of {b} bytes in slot {slot}; expected bucket {index} of {bytes} bytes in one of {held} {place}"
                    )));
                }
                let result = match *device_slots {
                    0 => memory
                        .with_slot(slot, *slot_bytes, |buf| consume(Arrived::Host(&buf[..bytes as usize]), &digests)),
                    _ => consume(Arrived::DeviceSlot(slot), &digests),
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
            (RecvPath::Socket { buffers }, message) => {
                let payload = &mut buffers[0][..bytes as usize];
                let digests = read_bucket(conn, message, index, payload, timeout)?;
                Ok(consume(Arrived::Host(payload), &digests))
            }
            (_, Message::Abort { reason }) => Err(TransferError::SenderAborted(reason)),
            (_, other) => Err(unexpected("a bucket", &other)),
        }
    }

    /// Receives buckets `0..sizes.len()` (bucket k is `sizes[k]` bytes) and hands each, in
    /// order, to `consume` on this thread. Over a socket, a thread of its own reads bucket k+1
    /// while bucket k is consumed; it stops at the first bucket that does not arrive (an
    /// `Abort` in its place included) and reads nothing after the last, so what follows (the
    /// `End`) is the caller's to read. Elsewhere one bucket at a time, as
    /// [`RecvPath::recv_bucket`].
    pub fn recv_buckets<E>(
        &mut self,
        conn: &mut Conn,
        sizes: &[u64],
        timeout: Duration,
        mut consume: impl FnMut(u32, Arrived<'_>, &[(u32, u64)]) -> Result<(), E>,
    ) -> Result<(), RecvBucketsError<E>> {
        match self {
            RecvPath::Socket { buffers } if sizes.len() > 1 => recv_pipelined(buffers, conn, sizes, timeout, consume),
            path => {
                for (k, &bytes) in sizes.iter().enumerate() {
                    let index = k as u32;
                    path.recv_bucket(conn, index, bytes, timeout, |arrived, digests| consume(index, arrived, digests))
                        .map_err(|error| RecvBucketsError::Transfer { index, error })?
                        .map_err(|error| RecvBucketsError::Consume { index, error })?;
                }
                Ok(())
            }
        }
    }
}

/// Over a socket: a thread of its own reads bucket k+1 while the caller's consumes bucket k.
/// The buffers travel between the two over channels, and either side stopping hangs up its
/// ends; a consumer that fails also stops reading the socket, so a reader waiting on a quiet
/// sender does not hold the update's report back until its timeout.
fn recv_pipelined<E>(
    buffers: &mut [Vec<u8>; SOCKET_BUFFERS],
    conn: &mut Conn,
    sizes: &[u64],
    timeout: Duration,
    mut consume: impl FnMut(u32, Arrived<'_>, &[(u32, u64)]) -> Result<(), E>,
) -> Result<(), RecvBucketsError<E>> {
    // Without a second handle the reader still stops, after the read it is in.
    let stopper = conn.try_clone_stream().ok();
    std::thread::scope(|scope| {
        type Read<'b> = Result<(&'b mut [u8], Vec<(u32, u64)>), TransferError>;
        let (to_consume, arrived) = sync_channel::<Read<'_>>(SOCKET_BUFFERS);
        let (to_fill, free) = sync_channel::<&mut [u8]>(SOCKET_BUFFERS);
        for buffer in buffers.iter_mut() {
            to_fill.send(buffer.as_mut_slice()).expect("the channel holds every buffer");
        }
        let reader = scope.spawn(move || {
            let mut reading = 0.0;
            for (k, &bytes) in sizes.iter().enumerate() {
                let Ok(buffer) = free.recv() else { return reading };
                let started = Instant::now();
                let read = conn
                    .recv(timeout)
                    .map_err(TransferError::from)
                    .and_then(|message| read_bucket(conn, message, k as u32, &mut buffer[..bytes as usize], timeout));
                reading += started.elapsed().as_secs_f64();
                let failed = read.is_err();
                if to_consume.send(read.map(|digests| (buffer, digests))).is_err() || failed {
                    return reading;
                }
            }
            reading
        });
        let (mut consuming, mut waiting) = (0.0, 0.0);
        let mut consumed = || -> Result<(), RecvBucketsError<E>> {
            for (k, &bytes) in sizes.iter().enumerate() {
                let index = k as u32;
                let started = Instant::now();
                let next = arrived.recv();
                waiting += started.elapsed().as_secs_f64();
                let (buffer, digests) = match next {
                    Ok(Ok(read)) => read,
                    Ok(Err(error)) => return Err(RecvBucketsError::Transfer { index, error }),
                    // The reader ends early only after sending its error: it panicked.
                    Err(_) => {
                        return Err(RecvBucketsError::Transfer {
                            index,
                            error: TransferError::Panicked("socket reader"),
                        })
                    }
                };
                let started = Instant::now();
                let done = consume(index, Arrived::Host(&buffer[..bytes as usize]), &digests);
                consuming += started.elapsed().as_secs_f64();
                if let Err(error) = done {
                    if let Some(stream) = &stopper {
                        stream.stop_reading();
                    }
                    return Err(RecvBucketsError::Consume { index, error });
                }
                // Fails only once the reader is done.
                let _ = to_fill.send(buffer);
            }
            Ok(())
        };
        let consumed = consumed();
        drop((to_fill, arrived));
        // A panic was reported where it showed (a bucket that never came).
        if let Ok(reading) = reader.join() {
            // Which side bounds a socket update: the socket (reading) or what is done with
            // each bucket (consuming).
            tracing::info!(
                read_s = reading,
                wait_for_bucket_s = waiting,
                consume_s = consuming,
                "buckets received over the socket"
            );
        }
        consumed
    })
}

/// Reads bucket `index` into `payload` (its length), `message` being the one read in its
/// place: the `Data` that announces it, or the sender's `Abort`; the digests sent with it.
fn read_bucket(
    conn: &mut Conn,
    message: Message,
    index: u32,
    payload: &mut [u8],
    timeout: Duration,
) -> Result<Vec<(u32, u64)>, TransferError> {
    let bytes = payload.len() as u64;
    match message {
        Message::Data { index: i, bytes: b, digests } if i == index && b == bytes => {
            conn.recv_data(payload, timeout)?;
            Ok(digests)
        }
        Message::Data { index: i, bytes: b, .. } => Err(TransferError::Unexpected(format!(
            "data for bucket {i} of {b} bytes; expected bucket {index} of {bytes} bytes"
        ))),
        Message::Abort { reason } => Err(TransferError::SenderAborted(reason)),
        other => Err(unexpected("a bucket", &other)),
    }
}

/// A write failed because the peer closed its end (what it sent before may still be readable).
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
}
