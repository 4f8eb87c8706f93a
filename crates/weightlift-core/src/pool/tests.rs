use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

/// A device in host memory: address ranges, physical allocations with real bytes, mappings
/// that reads and writes go through, copies that run only when waited for (so a pool that
/// unmaps or reads too early is caught), a capacity, counters, and failures on demand.
#[derive(Default)]
struct Fake {
    capacity: u64,
    used: u64,
    next_va: u64,
    next_id: u64,
    reserved: BTreeMap<u64, u64>,
    physical: BTreeMap<u64, Vec<u8>>,
    /// va -> (bytes, physical id)
    mapped: BTreeMap<u64, (u64, u64)>,
    /// Mappings the device may access (by base address), and the grant calls made.
    granted: std::collections::BTreeSet<u64>,
    grants: usize,
    staging_allocations: usize,
    /// Pinned host staging by id.
    staging_store: BTreeMap<u64, Vec<u8>>,
    /// Copies queued and not yet run, and how many ran before them.
    pending: Vec<FakeCopy>,
    copies_run: usize,
    creates: usize,
    /// Fail the create call this many creates from now (1: the next).
    fail_create_in: Option<usize>,
    fail_map_in: Option<usize>,
    /// Fail the copy run this many copies from now.
    fail_copy_in: Option<usize>,
    /// The largest address range a reservation may have (a small address space).
    reserve_limit: Option<u64>,
    /// Where the fake leaves (bytes used, ranges reserved, mappings) when dropped.
    left_behind: Option<Arc<Mutex<(u64, usize, usize)>>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(report) = &self.left_behind {
            *report.lock().unwrap() = (self.used, self.reserved.len(), self.mapped.len());
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum FakeCopy {
    ToHost { from: u64, staging: u64, at: u64, bytes: u64 },
    ToDevice { staging: u64, at: u64, to: u64, bytes: u64 },
}

impl FakeCopy {
    fn device_range(self) -> (u64, u64) {
        match self {
            FakeCopy::ToHost { from, bytes, .. } => (from, bytes),
            FakeCopy::ToDevice { to, bytes, .. } => (to, bytes),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fake device: {0}")]
struct FakeError(String);

const G: u64 = 4096;

impl Fake {
    fn with_capacity(capacity: u64) -> Fake {
        let mut fake = Fake::default();
        (fake.capacity, fake.next_va) = (capacity, 1 << 40);
        fake
    }

    /// The mapping holding [va, va + len), as (physical id, offset).
    fn find(&self, va: u64, len: u64) -> Result<(u64, u64), FakeError> {
        let (&base, &(bytes, id)) =
            self.mapped.range(..=va).next_back().ok_or_else(|| FakeError(format!("{va:#x} is not mapped")))?;
        if va + len > base + bytes {
            return Err(FakeError(format!("[{va:#x}, +{len}) is not mapped")));
        }
        if !self.granted.contains(&base) {
            return Err(FakeError(format!("{va:#x} is mapped without access")));
        }
        Ok((id, va - base))
    }

    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), FakeError> {
        let (id, at) = self.find(va, data.len() as u64)?;
        self.physical.get_mut(&id).unwrap()[at as usize..at as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, va: u64, len: u64) -> Result<Vec<u8>, FakeError> {
        let (id, at) = self.find(va, len)?;
        Ok(self.physical[&id][at as usize..(at + len) as usize].to_vec())
    }

    /// Runs queued copies until `count` have run in all.
    fn run_copies(&mut self, count: usize) -> Result<(), FakeError> {
        while self.copies_run < count {
            let copy = self.pending.remove(0);
            self.copies_run += 1;
            if countdown(&mut self.fail_copy_in) {
                self.pending.clear();
                return Err(FakeError("injected copy failure".into()));
            }
            match copy {
                FakeCopy::ToHost { from, staging, at, bytes } => {
                    let data = self.read(from, bytes)?;
                    self.staging_store.get_mut(&staging).expect("live staging")[at as usize..(at + bytes) as usize]
                        .copy_from_slice(&data);
                }
                FakeCopy::ToDevice { staging, at, to, bytes } => {
                    let data = self.staging_store[&staging][at as usize..(at + bytes) as usize].to_vec();
                    self.write(to, &data)?;
                }
            }
        }
        Ok(())
    }
}

fn countdown(slot: &mut Option<usize>) -> bool {
    match slot {
        Some(1) => {
            *slot = None;
            true
        }
        Some(n) => {
            *n -= 1;
            false
        }
        None => false,
    }
}

impl Backend for Fake {
    type Error = FakeError;
    type Physical = u64;
    type Staging = u64;
    type Mark = usize;

    fn granularity(&self) -> u64 {
        G
    }

    fn reserve(&mut self, bytes: u64) -> Result<u64, FakeError> {
        assert_eq!(bytes % G, 0, "reservations are whole granules");
        if self.reserve_limit.is_some_and(|limit| bytes > limit) {
            return Err(FakeError(format!("no {bytes} bytes of address space")));
        }
        let va = self.next_va;
        self.next_va += bytes + G;
        self.reserved.insert(va, bytes);
        Ok(va)
    }

    fn free_range(&mut self, va: u64, bytes: u64) {
        assert_eq!(self.reserved.remove(&va), Some(bytes), "freed a range not reserved");
        assert!(self.mapped.range(va..va + bytes).next().is_none(), "freed a range still mapped");
    }

    fn create(&mut self, bytes: u64) -> Result<u64, FakeError> {
        if countdown(&mut self.fail_create_in) {
            return Err(FakeError("injected create failure".into()));
        }
        if self.used + bytes > self.capacity {
            return Err(FakeError(format!("out of memory: {bytes} wanted, {} free", self.capacity - self.used)));
        }
        self.used += bytes;
        self.creates += 1;
        self.next_id += 1;
        // Fresh physical memory holds garbage, not zeros: a missing restore must show.
        self.physical.insert(self.next_id, vec![0xEE; bytes as usize]);
        Ok(self.next_id)
    }

    fn release(&mut self, physical: u64) {
        let bytes = self.physical.remove(&physical).expect("released twice").len() as u64;
        assert!(!self.mapped.values().any(|&(_, id)| id == physical), "released while mapped");
        self.used -= bytes;
    }

    fn map(&mut self, va: u64, bytes: u64, physical: &u64) -> Result<(), FakeError> {
        if countdown(&mut self.fail_map_in) {
            return Err(FakeError("injected map failure".into()));
        }
        let (&base, &size) = self.reserved.range(..=va).next_back().expect("mapped outside any reservation");
        assert!(va + bytes <= base + size, "mapping past its reservation");
        assert!(self.mapped.insert(va, (bytes, *physical)).is_none(), "mapped twice");
        Ok(())
    }

    fn grant(&mut self, va: u64, bytes: u64) -> Result<(), FakeError> {
        let mut at = va;
        while at < va + bytes {
            let &(len, _) = self.mapped.get(&at).expect("grants cover whole mappings, side by side");
            self.granted.insert(at);
            at += len;
        }
        assert_eq!(at, va + bytes, "a grant ends where a mapping ends");
        let (&base, &size) = self.reserved.range(..=va).next_back().expect("granted outside any reservation");
        assert!(va + bytes <= base + size, "a grant spans two reservations");
        self.grants += 1;
        Ok(())
    }

    fn unmap(&mut self, va: u64, bytes: u64) {
        self.granted.remove(&va);
        assert!(
            !self.pending.iter().any(|c| {
                let (start, len) = c.device_range();
                start < va + bytes && va < start + len
            }),
            "unmapped a range a queued copy still uses"
        );
        assert_eq!(self.mapped.remove(&va).map(|m| m.0), Some(bytes), "unmapped what was not mapped");
    }

    fn free_bytes(&mut self) -> Result<u64, FakeError> {
        Ok(self.capacity - self.used)
    }

    fn staging(&mut self, bytes: u64) -> Result<u64, FakeError> {
        self.staging_allocations += 1;
        self.next_id += 1;
        self.staging_store.insert(self.next_id, vec![0; bytes as usize]);
        Ok(self.next_id)
    }

    fn to_host(&mut self, from: u64, staging: &mut u64, at: u64, bytes: u64) -> Result<(), FakeError> {
        assert!(at + bytes <= self.staging_store[staging].len() as u64, "copy past the staging");
        self.pending.push(FakeCopy::ToHost { from, staging: *staging, at, bytes });
        Ok(())
    }

    fn to_device(&mut self, staging: &u64, at: u64, to: u64, bytes: u64) -> Result<(), FakeError> {
        assert!(at + bytes <= self.staging_store[staging].len() as u64, "copy past the staging");
        self.pending.push(FakeCopy::ToDevice { staging: *staging, at, to, bytes });
        Ok(())
    }

    fn mark(&mut self) -> Result<usize, FakeError> {
        Ok(self.copies_run + self.pending.len())
    }

    fn wait_for(&mut self, mark: &usize) -> Result<(), FakeError> {
        self.run_copies(*mark)
    }

    fn wait(&mut self) -> Result<(), FakeError> {
        self.run_copies(self.copies_run + self.pending.len())
    }
}

type Pool = TaggedPool<Fake>;

fn pool(capacity: u64, chunk: u64) -> Pool {
    TaggedPool::new(Fake::with_capacity(capacity), chunk)
}

fn stats(pool: &Pool, tag: &str) -> TagStats {
    pool.stats().into_iter().find(|s| s.tag == tag).unwrap()
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8).collect()
}

/// Writes through the pool's backend (the fake exposes its memory for the tests).
fn write(pool: &mut Pool, va: u64, data: &[u8]) {
    let fake = &mut pool.backend;
    fake.write(va, data).unwrap();
}

fn read(pool: &Pool, va: u64, len: u64) -> Result<Vec<u8>, FakeError> {
    pool.backend().read(va, len)
}

#[test]
fn small_allocations_share_a_chunk_and_an_empty_chunk_is_given_back() {
    let mut pool = pool(1 << 20, 4 * G);
    let a = pool.alloc("weights", 100).unwrap();
    let b = pool.alloc("weights", 1000).unwrap();
    let c = pool.alloc("weights", 512).unwrap();
    assert!([a, b, c].iter().all(|x| x % ALIGNMENT == 0));
    assert_eq!((b - a, c - b), (512, 1024), "first fit, aligned to 512");
    assert_eq!(stats(&pool, "weights").chunks, 1);
    assert_eq!(pool.backend().creates, 1);
    pool.free(b).unwrap();
    // The hole is reused.
    assert_eq!(pool.alloc("weights", 700).unwrap(), b);
    for x in [a, b, c] {
        pool.free(x).unwrap();
    }
    assert_eq!(stats(&pool, "weights").chunks, 0);
    assert_eq!((pool.backend().used, pool.backend().reserved.len()), (0, 0));
    assert!(matches!(pool.free(a), Err(PoolError::UnknownAddress(x)) if x == a));
}

#[test]
fn tags_never_share_chunks_and_large_allocations_get_their_own() {
    let mut pool = pool(1 << 20, 4 * G);
    let w = pool.alloc("weights", 100).unwrap();
    let kv = pool.alloc("kv_cache", 100).unwrap();
    assert_ne!(w / (4 * G), kv / (4 * G));
    let big = pool.alloc("weights", 10 * G + 1).unwrap();
    let s = stats(&pool, "weights");
    assert_eq!((s.chunks, s.mapped_bytes), (2, 4 * G + 11 * G));
    assert_eq!(pool.tag_of(big), Some("weights"));
    assert_eq!(pool.tag_containing(big + 10 * G), Some("weights"), "a byte inside");
    assert_eq!(pool.tag_of(big + 10 * G), None, "not an allocation's start");
    assert_eq!(pool.tag_containing(big + 11 * G), None, "past the end");
    assert_eq!(pool.tags(), ["kv_cache", "weights"]);
    assert_eq!(pool.tag_of(kv), Some("kv_cache"));
}

#[test]
fn pause_releases_the_memory_and_resume_restores_every_byte_at_the_same_addresses() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let sizes = [100u64, 5000, 4 * G + 7, 512];
    let addresses: Vec<u64> = sizes.iter().map(|&n| pool.alloc("weights", n).unwrap()).collect();
    for (i, (&va, &n)) in addresses.iter().zip(&sizes).enumerate() {
        write(&mut pool, va, &pattern(i as u64, n));
    }
    let other = pool.alloc("kv_cache", 64).unwrap();
    let used_before = pool.backend().used;
    for cycle in 0..10 {
        pool.pause("weights").unwrap();
        let s = stats(&pool, "weights");
        assert!(s.paused && s.mapped_bytes == 0, "cycle {cycle}: {s:?}");
        assert_eq!(pool.backend().used, used_before - s.paused_bytes, "the memory really is released");
        assert_eq!(s.backed_up_bytes, sizes.iter().map(|&n| n.div_ceil(ALIGNMENT) * ALIGNMENT).sum::<u64>());
        assert!(read(&pool, addresses[0], 1).is_err(), "nothing is mapped while paused");
        assert!(matches!(pool.alloc("weights", 1), Err(PoolError::Paused(_))));
        // Another tag goes on as before.
        assert!(read(&pool, other, 64).is_ok());
        pool.resume("weights").unwrap();
        for (i, (&va, &n)) in addresses.iter().zip(&sizes).enumerate() {
            assert_eq!(read(&pool, va, n).unwrap(), pattern(i as u64, n), "cycle {cycle}, allocation {i}");
        }
        assert_eq!(pool.backend().used, used_before, "cycle {cycle}: no leak");
    }
    assert_eq!(pool.backend().staging_allocations, 1, "the staging is allocated once, reused every cycle");
    assert_eq!(stats(&pool, "weights").backed_up_bytes, 0);
}

#[test]
fn a_resume_maps_one_physical_allocation_and_grants_access_once_per_run_of_adjacent_chunks() {
    let mut pool = pool(1 << 20, 4 * G);
    let chunks: Vec<u64> = (0..5).map(|_| pool.alloc("kv_cache", 4 * G).unwrap()).collect();
    assert!(chunks.windows(2).all(|w| w[1] == w[0] + 4 * G), "side by side in one window");
    assert_eq!(stats(&pool, "kv_cache").physical_allocations, 5, "one per chunk as they are made");
    pool.free(chunks[2]).unwrap(); // a hole: two runs
    pool.pause("kv_cache").unwrap();
    assert_eq!(stats(&pool, "kv_cache").physical_allocations, 0);
    let (grants, creates) = (pool.backend().grants, pool.backend().creates);
    pool.resume("kv_cache").unwrap();
    assert_eq!((pool.backend().grants - grants, pool.backend().creates - creates), (2, 2));
    let s = stats(&pool, "kv_cache");
    assert_eq!((s.chunks, s.physical_allocations, s.mapped_bytes), (4, 2, 16 * G));
    assert_eq!(pool.backend().mapped.len(), 2, "one mapping per run");
    for &va in [chunks[0], chunks[1], chunks[3], chunks[4]].iter() {
        write(&mut pool, va, &[1; 64]);
    }
    // The hole is reused by the next chunk, at the same place, with memory of its own.
    assert_eq!(pool.alloc("kv_cache", 4 * G).unwrap(), chunks[2]);
    assert_eq!(stats(&pool, "kv_cache").physical_allocations, 3);
    // The next cycle makes one run of all five.
    pool.pause("kv_cache").unwrap();
    pool.resume("kv_cache").unwrap();
    assert_eq!(stats(&pool, "kv_cache").physical_allocations, 1);
    assert_eq!(pool.backend().used, 20 * G);
}

#[test]
fn a_chunk_emptied_while_sharing_physical_memory_goes_with_its_neighbours_or_at_the_next_pause() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let addresses: Vec<u64> = (0..3).map(|_| pool.alloc("weights", 4 * G).unwrap()).collect();
    write(&mut pool, addresses[2], &pattern(4, 100));
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(stats(&pool, "weights").physical_allocations, 1);
    // The middle chunk empties: its memory is part of the run's, so it stays, reusable.
    pool.free(addresses[1]).unwrap();
    let s = stats(&pool, "weights");
    assert_eq!((s.chunks, s.mapped_bytes, pool.backend().used), (3, 12 * G, 12 * G));
    assert_eq!(pool.alloc("weights", 100).unwrap(), addresses[1], "the emptied chunk is reused");
    pool.free(addresses[1]).unwrap();
    // The next pause gives it back; the resume maps the two chunks left, as two runs.
    pool.pause("weights").unwrap();
    assert_eq!(pool.backend().used, 0);
    pool.resume("weights").unwrap();
    let s = stats(&pool, "weights");
    assert_eq!((s.chunks, s.physical_allocations, pool.backend().used), (2, 2, 8 * G));
    assert_eq!(read(&pool, addresses[2], 100).unwrap(), pattern(4, 100));
    // Chunks that share memory go together once all are empty.
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    let neighbour = pool.alloc("weights", 4 * G).unwrap();
    assert_eq!(neighbour, addresses[1], "the hole again");
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(stats(&pool, "weights").physical_allocations, 1);
    for va in [addresses[0], neighbour] {
        pool.free(va).unwrap();
    }
    assert_eq!((stats(&pool, "weights").chunks, pool.backend().used), (3, 12 * G), "one still in use");
    pool.free(addresses[2]).unwrap();
    assert_eq!((pool.backend().used, pool.backend().reserved.len()), (0, 0));
}

#[test]
fn without_room_for_a_wide_window_each_chunk_gets_its_own_addresses() {
    let mut fake = Fake::with_capacity(1 << 20);
    fake.reserve_limit = Some(8 * G);
    let mut pool = TaggedPool::new(fake, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let a = pool.alloc("weights", 4 * G).unwrap();
    let b = pool.alloc("weights", 4 * G).unwrap();
    write(&mut pool, b, &pattern(1, 100));
    assert_eq!(pool.backend().reserved.len(), 2);
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(read(&pool, b, 100).unwrap(), pattern(1, 100));
    assert!(matches!(pool.alloc("weights", 9 * G), Err(PoolError::Device { action: "reserving addresses", .. })));
    pool.free(a).unwrap();
    pool.free(b).unwrap();
    assert!(pool.backend().reserved.is_empty());
}

#[test]
fn without_a_backup_the_addresses_come_back_but_not_the_bytes() {
    let mut pool = pool(1 << 20, 4 * G);
    let va = pool.alloc("kv_cache", 1000).unwrap();
    write(&mut pool, va, &pattern(1, 1000));
    pool.pause("kv_cache").unwrap();
    pool.resume("kv_cache").unwrap();
    assert_eq!(read(&pool, va, 1000).unwrap(), vec![0xEE; 1000], "fresh memory, at the old address");
    assert_eq!(pool.backend().staging_allocations, 0);
}

#[test]
fn a_resume_that_does_not_fit_fails_cleanly_and_succeeds_once_memory_is_freed() {
    let mut pool = pool(16 * G, 8 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let w = pool.alloc("weights", 1000).unwrap();
    write(&mut pool, w, &pattern(3, 1000));
    pool.pause("weights").unwrap();
    // Something else takes the memory while the weights are paused.
    let squatter = pool.alloc("trainer", 12 * G).unwrap();
    match pool.resume("weights") {
        Err(PoolError::NotEnoughMemory { tag, needed, free }) => {
            assert_eq!((tag.as_str(), needed, free), ("weights", 8 * G, 4 * G));
        }
        other => panic!("expected NotEnoughMemory, got {other:?}"),
    }
    assert_eq!(pool.is_paused("weights"), Some(true));
    assert!(read(&pool, w, 1).is_err());
    pool.free(squatter).unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(read(&pool, w, 1000).unwrap(), pattern(3, 1000));
}

#[test]
fn a_resume_that_fails_midway_is_rolled_back_and_can_be_retried() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    // Five chunks side by side, two of them freed: three runs, three physical allocations.
    let mut addresses: Vec<u64> = (0..5).map(|i| pool.alloc("weights", 4 * G - 100 + i).unwrap()).collect();
    for hole in [addresses.remove(3), addresses.remove(1)] {
        pool.free(hole).unwrap();
    }
    for (i, &va) in addresses.iter().enumerate() {
        write(&mut pool, va, &pattern(i as u64, 1000));
    }
    assert_eq!(stats(&pool, "weights").chunks, 3);
    pool.pause("weights").unwrap();
    let used = pool.backend().used;
    for (create, map, copy) in
        [(Some(2), None, None), (None, Some(3), None), (Some(1), None, None), (None, None, Some(2))]
    {
        pool.backend.fail_create_in = create;
        pool.backend.fail_map_in = map;
        pool.backend.fail_copy_in = copy;
        let err = pool.resume("weights").unwrap_err().to_string();
        assert!(err.contains("`weights`") && err.contains("injected"), "{err}");
        assert_eq!(pool.is_paused("weights"), Some(true));
        assert_eq!(pool.backend().used, used, "nothing kept from the failed resume");
        assert!(pool.backend().mapped.is_empty(), "no mapping kept");
    }
    pool.resume("weights").unwrap();
    for (i, &va) in addresses.iter().enumerate() {
        assert_eq!(read(&pool, va, 1000).unwrap(), pattern(i as u64, 1000));
    }
}

#[test]
fn a_backup_copy_that_fails_leaves_the_tag_active_with_every_byte() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let heard = Arc::new(Mutex::new(Vec::new()));
    let log = heard.clone();
    pool.add_hook(Box::new(move |_, t| log.lock().unwrap().push(t)));
    let addresses: Vec<u64> = (0..3).map(|i| pool.alloc("weights", 4 * G - 100 + i).unwrap()).collect();
    for (i, &va) in addresses.iter().enumerate() {
        write(&mut pool, va, &pattern(i as u64, 1000));
    }
    let used = pool.backend().used;
    // The third chunk's copy fails after the first two chunks were unmapped.
    pool.backend.fail_copy_in = Some(3);
    let err = pool.pause("weights").unwrap_err().to_string();
    assert!(err.contains("`weights`") && err.contains("copying to host"), "{err}");
    assert_eq!(pool.is_paused("weights"), Some(false));
    assert_eq!(pool.backend().used, used, "nothing released");
    for (i, &va) in addresses.iter().enumerate() {
        assert_eq!(read(&pool, va, 1000).unwrap(), pattern(i as u64, 1000), "allocation {i}");
    }
    assert_eq!(*heard.lock().unwrap(), [Transition::Pausing, Transition::Resumed], "hooks hear the way back");
    // And the next pause works.
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(read(&pool, addresses[2], 1000).unwrap(), pattern(2, 1000));
}

#[test]
fn the_staging_can_be_given_back_between_cycles() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let va = pool.alloc("weights", 1000).unwrap();
    write(&mut pool, va, &pattern(5, 1000));
    pool.alloc("kv_cache", 10).unwrap();
    assert_eq!(pool.prepare_staging("kv_cache").unwrap(), 0, "no backup, no staging");
    assert_eq!(pool.prepare_staging("weights").unwrap(), 1024, "ahead of the first pause");
    assert_eq!(pool.backend().staging_allocations, 1);
    pool.pause("weights").unwrap();
    assert_eq!(pool.backend().staging_allocations, 1, "the first pause found it ready");
    assert!(matches!(pool.release_staging("weights"), Err(PoolError::Paused(_))), "it holds the backup");
    pool.resume("weights").unwrap();
    assert_eq!(stats(&pool, "weights").staging_bytes, 1024);
    assert_eq!(pool.release_staging("weights").unwrap(), 1024);
    assert_eq!(stats(&pool, "weights").staging_bytes, 0);
    pool.pause("weights").unwrap();
    pool.resume("weights").unwrap();
    assert_eq!(read(&pool, va, 1000).unwrap(), pattern(5, 1000));
    assert_eq!(pool.backend().staging_allocations, 2, "allocated again after being given back");
}

#[test]
fn freeing_while_paused_gives_the_chunk_back_and_the_rest_is_restored() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    let lone = pool.alloc("weights", 5 * G).unwrap(); // a chunk of its own
    let a = pool.alloc("weights", 100).unwrap();
    let b = pool.alloc("weights", 100).unwrap();
    write(&mut pool, a, &pattern(1, 100));
    write(&mut pool, b, &pattern(2, 100));
    pool.pause("weights").unwrap();
    pool.free(lone).unwrap();
    pool.free(a).unwrap();
    let s = stats(&pool, "weights");
    assert_eq!((s.chunks, s.backed_up_bytes), (1, 512));
    pool.resume("weights").unwrap();
    assert_eq!(read(&pool, b, 100).unwrap(), pattern(2, 100));
    pool.free(b).unwrap();
    assert_eq!((pool.backend().used, pool.backend().reserved.len()), (0, 0));
}

#[test]
fn keeping_the_physical_memory_maps_the_same_pages_again() {
    let mut pool = pool(1 << 20, 4 * G);
    pool.configure("nccl", TagOptions { cpu_backup: true, keep_physical: true });
    let va = pool.alloc("nccl", 100).unwrap();
    write(&mut pool, va, &pattern(9, 100));
    let page = pool.backend().mapped.values().next().unwrap().1;
    let used = pool.backend().used;
    pool.pause("nccl").unwrap();
    assert_eq!(pool.backend().used, used, "kept, not released");
    assert_eq!(stats(&pool, "nccl").paused_bytes, 0);
    pool.resume("nccl").unwrap();
    assert_eq!(pool.backend().mapped.values().next().unwrap().1, page, "the very same physical allocation");
    assert_eq!(read(&pool, va, 100).unwrap(), pattern(9, 100));
    assert_eq!(pool.backend().staging_allocations, 0, "nothing to back up");
}

#[test]
fn dropping_the_pool_gives_everything_back() {
    let left_behind = Arc::new(Mutex::new((u64::MAX, usize::MAX, usize::MAX)));
    let mut fake = Fake::with_capacity(1 << 20);
    fake.left_behind = Some(left_behind.clone());
    let mut pool = TaggedPool::new(fake, 4 * G);
    pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
    pool.alloc("weights", 100).unwrap();
    pool.alloc("kv_cache", 5 * G).unwrap();
    pool.alloc("nccl", 10).unwrap();
    pool.pause("weights").unwrap();
    drop(pool);
    assert_eq!(*left_behind.lock().unwrap(), (0, 0, 0));
}

#[test]
fn hooks_hear_every_pause_before_and_every_resume_after() {
    let mut pool = pool(1 << 20, 4 * G);
    let heard = Arc::new(Mutex::new(Vec::new()));
    let log = heard.clone();
    pool.add_hook(Box::new(move |tag, t| log.lock().unwrap().push((tag.to_string(), t))));
    pool.alloc("kv_cache", 10).unwrap();
    pool.pause("kv_cache").unwrap();
    pool.pause("kv_cache").unwrap(); // already paused: nothing happens
    pool.resume("kv_cache").unwrap();
    pool.resume("kv_cache").unwrap();
    let want = vec![("kv_cache".to_string(), Transition::Pausing), ("kv_cache".to_string(), Transition::Resumed)];
    assert_eq!(*heard.lock().unwrap(), want);
    assert!(matches!(pool.pause("nope"), Err(PoolError::UnknownTag(t)) if t == "nope"));
    assert!(matches!(pool.resume("nope"), Err(PoolError::UnknownTag(_))));
}

#[test]
fn running_out_of_memory_names_the_tag_and_the_sizes() {
    let mut pool = pool(8 * G, 4 * G);
    pool.alloc("weights", 4 * G).unwrap();
    pool.alloc("weights", 4 * G).unwrap();
    let err = pool.alloc("kv_cache", 1).unwrap_err();
    assert!(
        matches!(&err, PoolError::NotEnoughMemory { tag, needed, free } if tag == "kv_cache" && *needed == 4 * G && *free == 0)
    );
    assert_eq!(pool.backend().reserved.len(), 1, "one window for the weights; the failed chunk's was given back");
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { tag: usize, bytes: u64 },
    Free { pick: usize },
    Pause { tag: usize },
    Resume { tag: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, 1u64..20_000).prop_map(|(tag, bytes)| Op::Alloc { tag, bytes }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (0usize..3).prop_map(|tag| Op::Pause { tag }),
        1 => (0usize..3).prop_map(|tag| Op::Resume { tag }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random allocations, frees, pauses and resumes over three tags (one backed up, one not,
    /// one keeping its pages): live allocations never overlap; every backed-up or kept
    /// allocation reads back what was written after its tag resumes; what a tag releases is
    /// really free; and freeing everything gives every byte and address range back.
    #[test]
    fn the_pool_keeps_its_books_under_any_sequence(ops in proptest::collection::vec(op(), 1..60)) {
        const TAGS: [&str; 3] = ["weights", "kv_cache", "nccl"];
        let mut pool = pool(96 * G, 4 * G);
        pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
        pool.configure("nccl", TagOptions { cpu_backup: false, keep_physical: true });
        let mut live: Vec<(u64, u64, usize, u64)> = Vec::new(); // (address, bytes, tag, seed)
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Alloc { tag, bytes } => match pool.alloc(TAGS[tag], bytes) {
                    Ok(va) => {
                        write(&mut pool, va, &pattern(step as u64, bytes));
                        live.push((va, bytes, tag, step as u64));
                    }
                    Err(PoolError::Paused(_)) => prop_assert_eq!(pool.is_paused(TAGS[tag]), Some(true)),
                    Err(PoolError::NotEnoughMemory { .. }) => {}
                    Err(e) => prop_assert!(false, "alloc: {e}"),
                },
                Op::Free { pick } if !live.is_empty() => {
                    let (va, ..) = live.swap_remove(pick % live.len());
                    pool.free(va).unwrap();
                }
                Op::Free { .. } => {}
                Op::Pause { tag } => {
                    if pool.is_paused(TAGS[tag]).is_some() {
                        pool.pause(TAGS[tag]).unwrap();
                    }
                }
                Op::Resume { tag } => match pool.resume(TAGS[tag]) {
                    Ok(()) | Err(PoolError::UnknownTag(_)) | Err(PoolError::NotEnoughMemory { .. }) => {}
                    Err(e) => prop_assert!(false, "resume: {e}"),
                },
            }
            let mut spans: Vec<(u64, u64)> = live.iter().map(|&(va, n, ..)| (va, n)).collect();
            spans.sort();
            prop_assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "overlapping allocations");
            // Device memory in use is exactly what the tags hold physically: all of their
            // chunks but what paused tags released.
            let held: u64 = pool.stats().iter().map(|s| s.reserved_bytes - s.paused_bytes).sum();
            prop_assert_eq!(pool.backend().used, held);
            // One mapping per physical allocation; at most one allocation per chunk, at least
            // one while a tag holds chunks, none while it is paused unless it keeps its pages.
            let mut mappings = 0;
            for s in pool.stats() {
                prop_assert_eq!(s.mapped_bytes, if s.paused { 0 } else { s.reserved_bytes }, "{:?}", s);
                prop_assert!(s.physical_allocations <= s.chunks, "{:?}", s);
                let kept = !s.paused || s.options.keep_physical;
                prop_assert_eq!(kept && s.chunks > 0, s.physical_allocations > 0, "{:?}", s);
                mappings += if s.paused { 0 } else { s.physical_allocations };
            }
            prop_assert_eq!(pool.backend().mapped.len(), mappings);
        }
        for tag in TAGS {
            let _ = pool.resume(tag);
        }
        for &(va, n, tag, seed) in &live {
            if pool.is_paused(TAGS[tag]) == Some(false) && TAGS[tag] != "kv_cache" {
                prop_assert_eq!(read(&pool, va, n).unwrap(), pattern(seed, n), "`{}` lost its bytes", TAGS[tag]);
            }
        }
        for &(va, ..) in &live {
            pool.free(va).unwrap();
        }
        prop_assert_eq!(pool.backend().used, 0);
        prop_assert!(pool.backend().reserved.is_empty() && pool.backend().mapped.is_empty());
    }
}
