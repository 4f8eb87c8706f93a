//! How an update's tensors are scheduled on a GPU, decided without one: which tensors go in
//! which wave and in what order, where each tensor's chunk digests lie in its wave, and when
//! its digest is folded. weightlift-cuda packs these lists for its kernels and launches them.

use crate::digest::CHUNK_BYTES;

/// Digest chunks as the schedule counts bytes.
const CHUNK: u64 = CHUNK_BYTES as u64;

/// A schedule that does not add up: the update's waves, or a wave's work, contradict its
/// tensors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("wave {wave} lists {tensors} tensors and {sizes} tensor sizes")]
    SizesMismatch { wave: usize, tensors: usize, sizes: usize },
    #[error("tensor {tensor} is listed twice (wave {wave})")]
    ListedTwice { tensor: usize, wave: usize },
    #[error("wave {wave} lists tensor {tensor}, past the {tensors} tensors of the update")]
    PastTheTensors { wave: usize, tensor: usize, tensors: usize },
    #[error("chunk slot {slot} is past the {chunks} chunks of its wave's tensors")]
    SlotPastChunks { slot: u64, chunks: u64 },
    #[error("{fused} fused and {fallback} fallback chunks do not make the {chunks} chunks of the tensors")]
    ChunksMismatch { fused: u64, fallback: u64, chunks: u64 },
}

/// Chunk digests one wave of an update holds at most (16 MiB of them, for 8 GiB of tensors);
/// two waves' worth (one being copied, one being folded) bound the GPU memory an update needs
/// beyond the tensors.
pub const WAVE_CHUNKS: u64 = 2 << 20;

/// Tensors (indices into `tensor_bytes`) grouped into waves of at most [`WAVE_CHUNKS`] chunks
/// (a larger tensor is a wave of its own), largest first: how digests of memory in place are
/// run (see [`WaveOrder`]).
pub fn waves(tensor_bytes: &[u64]) -> Vec<Vec<usize>> {
    waves_of(tensor_bytes, WAVE_CHUNKS, WaveOrder::LargestFirst)
}

/// In which order an update's tensors go into waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveOrder {
    /// Largest first, for reads at HBM speed. A tensor's digest is one dependent fold over its
    /// chunk digests (~6 ns a chunk) that starts once the tensor is read, and reading a chunk
    /// from this GPU's memory takes ~1 ns: in the models' own order Qwen3-8B's lm_head (1.2 GB)
    /// and Qwen3-30B-A3B's last stacked experts came in the last wave, and their folds ran on
    /// after every byte was read. Largest first, the longest folds have the rest of the update
    /// to run beside, and the last wave holds the smallest tensors (on H200, digests alone:
    /// Qwen3-8B 4.90 -> 4.07 ms, Qwen3-30B-A3B 15.78 -> 14.79 ms; Qwen3-30B-A3B's update
    /// 32.8 -> 31.7 ms). Equal sizes keep their order.
    LargestFirst,
    /// As listed, for reads over NVLink: a chunk takes ~11 ns to arrive there, longer than
    /// its fold, so no fold outlasts the reads whatever the order. Largest first made
    /// Qwen3-30B-A3B's pull from a peer GPU vary from update to update (164.3-169.5 ms, against
    /// 164.7-164.8 ms as listed, on 2 x H200; the cause was not found).
    AsListed,
}

/// Tensors grouped into waves of at most `max_chunks` chunks (a larger tensor is a wave of its
/// own), in `order` (tests use small bounds to get many waves from small models).
pub fn waves_of(tensor_bytes: &[u64], max_chunks: u64, order: WaveOrder) -> Vec<Vec<usize>> {
    let mut tensors: Vec<usize> = (0..tensor_bytes.len()).collect();
    if order == WaveOrder::LargestFirst {
        tensors.sort_by_key(|&t| std::cmp::Reverse(tensor_bytes[t]));
    }
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut chunks = 0u64;
    for t in tensors {
        let c = tensor_bytes[t].div_ceil(CHUNK);
        match waves.last_mut() {
            Some(wave) if chunks + c <= max_chunks => wave.push(t),
            _ => {
                waves.push(vec![t]);
                chunks = 0;
            }
        }
        chunks += c;
    }
    waves
}

/// The waves' tensors in turn (each one's index in the update), checked to list every tensor
/// of the update exactly once. Each wave is given as its tensors and their sizes.
pub fn update_order<'a>(
    waves: impl IntoIterator<Item = (&'a [usize], &'a [u64])>,
) -> Result<Vec<usize>, ScheduleError> {
    let waves: Vec<(&[usize], &[u64])> = waves.into_iter().collect();
    let order: Vec<usize> = waves.iter().flat_map(|w| w.0.iter().copied()).collect();
    let mut listed = vec![false; order.len()];
    for (w, &(tensors, tensor_bytes)) in waves.iter().enumerate() {
        if tensors.len() != tensor_bytes.len() {
            return Err(ScheduleError::SizesMismatch { wave: w, tensors: tensors.len(), sizes: tensor_bytes.len() });
        }
        for &t in tensors {
            match listed.get_mut(t) {
                Some(seen) if !*seen => *seen = true,
                Some(_) => return Err(ScheduleError::ListedTwice { tensor: t, wave: w }),
                None => return Err(ScheduleError::PastTheTensors { wave: w, tensor: t, tensors: order.len() }),
            }
        }
    }
    Ok(order)
}

/// Start of each item's share of a total (plus the total at the end), in units of `unit`.
pub fn prefix(lens: impl Iterator<Item = u64>, unit: u64) -> (Vec<u64>, u64) {
    let mut start = Vec::new();
    let mut total = 0u64;
    for len in lens {
        start.push(total);
        total += len.div_ceil(unit);
    }
    start.push(total);
    (start, total)
}

/// The item whose share `[start[i], start[i + 1])` of a [`prefix`] holds `slot`: the last one
/// starting at or before it, so never an item of no units.
pub fn tensor_of(start: &[u64], slot: u64) -> Result<usize, ScheduleError> {
    let chunks = start.last().copied().unwrap_or(0);
    if slot >= chunks {
        return Err(ScheduleError::SlotPastChunks { slot, chunks });
    }
    // start[0] is 0 <= slot, so the partition point is at least 1.
    Ok(start.partition_point(|&c| c <= slot) - 1)
}

/// A tensor of at least this many chunks (128 MiB) whose chunks are all fused has its digest
/// folded early: its runs go first, then its fold (one dependent chain per tensor, ~6 ns a
/// chunk: 1.8 ms for Qwen3-8B's 1.2 GB lm_head) runs on a second stream while the rest of the
/// wave is copied (see [`fold_groups`]).
pub const EARLY_FOLD_CHUNKS: u64 = 32 << 10;

/// When a tensor's digest is folded, within its wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Copied first, folded beside the rest of the wave.
    First,
    /// Copied next, folded beside the rest of the wave.
    Early,
    /// Folded once the wave is copied.
    Late,
}

impl Fold {
    /// Its part of a split (see [`by_fold`]).
    fn part(self) -> usize {
        match self {
            Fold::First => 0,
            Fold::Early => 1,
            Fold::Late => 2,
        }
    }
}

/// When each tensor of a wave (its chunks; whether some of them are fallback chunks, digested
/// after the copies) is folded. Tensors of [`EARLY_FOLD_CHUNKS`] or more, all fused, are folded
/// early. The largest of them, down to the first that has twice the chunks of the next, go
/// first, so that their folds, the longest, start after their own runs rather than after all
/// the early tensors' (Qwen3-8B's embeddings and lm_head, 304k chunks each, among gate_up
/// projections of 49k). Early tensors of like sizes stay together: a fold beside each launch
/// slowed Qwen3-30B-A3B's digest 16.4 -> 19.8 ms on H200.
pub fn fold_groups(tensor_chunks: &[u64], has_fallback: &[bool]) -> Vec<Fold> {
    let mut fold: Vec<Fold> = tensor_chunks
        .iter()
        .zip(has_fallback)
        .map(|(&chunks, &fallback)| if chunks >= EARLY_FOLD_CHUNKS && !fallback { Fold::Early } else { Fold::Late })
        .collect();
    let mut early: Vec<usize> = (0..fold.len()).filter(|&t| fold[t] == Fold::Early).collect();
    // Largest first; equals in their order.
    early.sort_by_key(|&t| std::cmp::Reverse(tensor_chunks[t]));
    if let Some(last) = early.windows(2).position(|p| tensor_chunks[p[0]] >= 2 * tensor_chunks[p[1]]) {
        for &t in &early[..=last] {
            fold[t] = Fold::First;
        }
    }
    fold
}

/// `items` split by when their tensors are folded: first, early, late (each in the given order).
pub fn by_fold<T>(items: impl Iterator<Item = T>, fold_of: impl Fn(&T) -> Fold) -> [Vec<T>; 3] {
    let mut split: [Vec<T>; 3] = Default::default();
    for item in items {
        split[fold_of(&item).part()].push(item);
    }
    split
}

/// One wave's tensors' chunk slots, side by side in the order listed, and when each tensor's
/// digest is folded (see [`fold_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveFolds {
    /// Each tensor's first chunk slot, then the wave's chunks (a [`prefix`]).
    tensor_start: Vec<u64>,
    chunks: u64,
    fold: Vec<Fold>,
}

impl WaveFolds {
    /// The folds of a wave of tensors of `tensor_bytes`, whose fallback chunks (digested after
    /// the copies) start at `fallback_slots`.
    pub fn new(
        tensor_bytes: &[u64],
        fallback_slots: impl IntoIterator<Item = u64>,
    ) -> Result<WaveFolds, ScheduleError> {
        let (tensor_start, chunks) = prefix(tensor_bytes.iter().copied(), CHUNK);
        let tensor_chunks: Vec<u64> = tensor_start.windows(2).map(|w| w[1] - w[0]).collect();
        let mut has_fallback = vec![false; tensor_chunks.len()];
        for slot in fallback_slots {
            has_fallback[tensor_of(&tensor_start, slot)?] = true;
        }
        let fold = fold_groups(&tensor_chunks, &has_fallback);
        Ok(WaveFolds { tensor_start, chunks, fold })
    }

    /// Each tensor's first chunk slot, then the wave's chunks.
    pub fn tensor_start(&self) -> &[u64] {
        &self.tensor_start
    }

    /// Chunks of the wave's tensors.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// When each tensor is folded, in the order listed.
    pub fn folds(&self) -> &[Fold] {
        &self.fold
    }

    /// `items` split by the fold of the tensor holding each one's chunk slot `slot_of`: first,
    /// early, late (each in the given order).
    pub fn split<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        slot_of: impl Fn(&T) -> u64,
    ) -> Result<[Vec<T>; 3], ScheduleError> {
        let mut split: [Vec<T>; 3] = Default::default();
        for item in items {
            let fold = self.fold[tensor_of(&self.tensor_start, slot_of(&item))?];
            split[fold.part()].push(item);
        }
        Ok(split)
    }

    /// The wave's tensors (indices in it) split by fold: first, early, late.
    pub fn tensors(&self) -> [Vec<u32>; 3] {
        by_fold(0..self.fold.len() as u32, |&t| self.fold[t as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_early_tensors_down_to_a_twofold_gap_are_folded_first() {
        use Fold::*;
        let big = EARLY_FOLD_CHUNKS;
        // Qwen3-8B's engine layout: lm_head (304k chunks) among gate_up projections (49k).
        assert_eq!(fold_groups(&[49_152, 10, 303_872, 49_152], &[false; 4]), [Early, Late, First, Early]);
        // Both giants (embeddings and lm_head) first, together.
        assert_eq!(fold_groups(&[303_872, 303_872, 49_152], &[false; 3]), [First, First, Early]);
        // The first twofold gap, wherever it is.
        assert_eq!(fold_groups(&[8 * big, 5 * big, 2 * big], &[false; 3]), [First, First, Early]);
        // Like sizes (Qwen3-30B-A3B's stacked experts and lm_head): together.
        assert_eq!(fold_groups(&[196_608, 151_936, 98_304], &[false; 3]), [Early, Early, Early]);
        assert_eq!(fold_groups(&[2 * big, 2 * big - 1], &[false; 2]), [Early, Early]);
        assert_eq!(fold_groups(&[2 * big, big], &[false; 2]), [First, Early]);
        // One early tensor needs no second launch; fallback chunks or small tensors fold late.
        assert_eq!(fold_groups(&[4 * big, big - 1], &[false; 2]), [Early, Late]);
        assert_eq!(fold_groups(&[4 * big, big], &[false, true]), [Early, Late]);
        assert_eq!(fold_groups(&[4 * big, 4 * big, 4 * big], &[false; 3]), [Early, Early, Early]);
        assert_eq!(fold_groups(&[], &[]), []);
        // Split in order, by each item's fold.
        let folds = [Late, First, Early, Late, Early];
        assert_eq!(by_fold(0..5, |&t| folds[t]), [vec![1], vec![2, 4], vec![0, 3]]);
    }

    #[test]
    fn waves_take_the_largest_tensors_first_where_reads_are_local() {
        let c = CHUNK;
        // Sizes in chunks 1, 5, 3, 5, 2 with waves of at most 6 chunks: 5 | 5 | 3 2 1.
        let bytes = [c, 5 * c, 3 * c - 7, 5 * c, 2 * c];
        assert_eq!(waves_of(&bytes, 6, WaveOrder::LargestFirst), [vec![1], vec![3], vec![2, 4, 0]]);
        assert_eq!(waves_of(&bytes, 6, WaveOrder::AsListed), [vec![0, 1], vec![2], vec![3], vec![4]]);
        // A tensor larger than a wave is a wave of its own; an empty one still has a place.
        assert_eq!(waves_of(&[9 * c, 0, c], 4, WaveOrder::LargestFirst), [vec![0], vec![2, 1]]);
        assert_eq!(waves_of(&[9 * c, 0, c], 4, WaveOrder::AsListed), [vec![0], vec![1, 2]]);
        assert!(waves_of(&[], 4, WaveOrder::AsListed).is_empty());
        assert_eq!(waves(&[c, 3 * c]), [vec![1, 0]]);
    }

    #[test]
    fn an_update_lists_each_tensor_once() {
        let order = |waves: &[&[usize]]| {
            let sizes: Vec<Vec<u64>> = waves.iter().map(|w| vec![8; w.len()]).collect();
            update_order(waves.iter().zip(&sizes).map(|(w, s)| (*w, s.as_slice())))
        };
        assert_eq!(order(&[&[2, 0], &[1]]).unwrap(), [2, 0, 1]);
        assert!(order(&[]).unwrap().is_empty());
        let twice = order(&[&[0, 1], &[1]]).unwrap_err();
        assert_eq!(twice, ScheduleError::ListedTwice { tensor: 1, wave: 1 });
        assert_eq!(twice.to_string(), "tensor 1 is listed twice (wave 1)");
        let past = order(&[&[0, 3]]).unwrap_err();
        assert_eq!(past, ScheduleError::PastTheTensors { wave: 0, tensor: 3, tensors: 2 });
        assert!(past.to_string().contains("lists tensor 3, past the 2 tensors"), "{past}");
        let sizes = update_order([(&[0usize][..], &[][..])]).unwrap_err();
        assert_eq!(sizes, ScheduleError::SizesMismatch { wave: 0, tensors: 1, sizes: 0 });
        assert!(sizes.to_string().contains("1 tensors and 0 tensor sizes"));
    }

    #[test]
    fn chunk_slots_belong_to_the_tensor_whose_chunks_hold_them() {
        let c = CHUNK;
        // Chunks 2, 0, 1, 0: slots 0-1, none, 2, none.
        let (start, total) = prefix([2 * c - 1, 0, 1, 0].into_iter(), c);
        assert_eq!((start.as_slice(), total), (&[0, 2, 2, 3, 3][..], 3));
        assert_eq!([0, 1, 2].map(|s| tensor_of(&start, s).unwrap()), [0, 0, 2]);
        assert_eq!(tensor_of(&start, 3), Err(ScheduleError::SlotPastChunks { slot: 3, chunks: 3 }));
        assert_eq!(tensor_of(&[0], 0), Err(ScheduleError::SlotPastChunks { slot: 0, chunks: 0 }));
        assert_eq!(tensor_of(&[], 0), Err(ScheduleError::SlotPastChunks { slot: 0, chunks: 0 }));
        // A fallback chunk in the giant makes it fold late; the other giant folds early alone.
        let big = EARLY_FOLD_CHUNKS * c;
        let folds = WaveFolds::new(&[big, 0, big, 5], [EARLY_FOLD_CHUNKS + 3]).unwrap();
        assert_eq!(folds.folds(), [Fold::Early, Fold::Late, Fold::Late, Fold::Late]);
        assert_eq!(
            (folds.tensor_start(), folds.chunks()),
            (&[0, big / c, big / c, 2 * big / c, 2 * big / c + 1][..], 2 * big / c + 1)
        );
        assert_eq!(folds.tensors(), [vec![], vec![0], vec![1, 2, 3]]);
        let runs = [(0, 'a'), (2 * big / c, 'b'), (1, 'c'), (big / c, 'd')];
        assert_eq!(
            folds.split(runs, |r| r.0).unwrap(),
            [vec![], vec![(0, 'a'), (1, 'c')], vec![(2 * big / c, 'b'), (big / c, 'd')]]
        );
        let past = ScheduleError::SlotPastChunks { slot: 2 * big / c + 1, chunks: 2 * big / c + 1 };
        assert_eq!(folds.split([2 * big / c + 1], |&s| s).unwrap_err(), past);
        assert_eq!(
            WaveFolds::new(&[big], [big / c]).unwrap_err(),
            ScheduleError::SlotPastChunks { slot: big / c, chunks: big / c }
        );
    }

    /// Byte lengths: empty, just around whole chunks, anything, and around early-fold sizes.
    fn tensor_bytes() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            Just(0u64),
            (0u64..40, 0u64..5).prop_map(|(k, d)| (k * CHUNK + d).saturating_sub(2)),
            0u64..100_000,
            (0u64..10, 0u64..5)
                .prop_map(|(k, d)| (k * EARLY_FOLD_CHUNKS * CHUNK / 2 + d * CHUNK).saturating_sub(2 * CHUNK)),
        ]
    }

    #[test]
    fn prop_waves_list_every_tensor_once_within_the_bound() {
        use proptest::prelude::*;
        let sizes = proptest::collection::vec(tensor_bytes(), 0..60);
        proptest!(|(sizes in sizes, max_chunks in 0u64..12, largest_first: bool)| {
            let order = if largest_first { WaveOrder::LargestFirst } else { WaveOrder::AsListed };
            let waves = waves_of(&sizes, max_chunks, order);
            let listed: Vec<usize> = waves.iter().flatten().copied().collect();
            let mut seen = listed.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
            for pair in listed.windows(2) {
                let (a, b) = (sizes[pair[0]], sizes[pair[1]]);
                // Largest first, equals in their order; or simply in their order.
                let in_order = if largest_first { a > b || (a == b && pair[0] < pair[1]) } else { pair[0] < pair[1] };
                prop_assert!(in_order, "{:?} of sizes {:?}", listed, sizes);
            }
            let chunks = |wave: &[usize]| wave.iter().map(|&t| sizes[t].div_ceil(CHUNK)).sum::<u64>();
            for wave in &waves {
                prop_assert!(!wave.is_empty());
                // Within the bound, or one oversize tensor alone.
                prop_assert!(chunks(wave) <= max_chunks || wave.len() == 1, "{:?} of sizes {:?}", wave, sizes);
            }
            // Each wave is as full as it can be: the next wave's first tensor did not fit.
            for pair in waves.windows(2) {
                prop_assert!(chunks(&pair[0]) + sizes[pair[1][0]].div_ceil(CHUNK) > max_chunks, "{:?}", waves);
            }
        });
    }

    #[test]
    fn prop_early_folds_go_first_down_to_the_first_twofold_gap() {
        use proptest::prelude::*;
        let chunk_counts = prop_oneof![
            0u64..8,
            (0u64..5).prop_map(|d| EARLY_FOLD_CHUNKS + d - 2),
            (1u64..16, 0u64..5).prop_map(|(k, d)| k * EARLY_FOLD_CHUNKS / 2 + d - 2),
            (1u64..8, 0u64..3).prop_map(|(k, d)| 2 * k * EARLY_FOLD_CHUNKS + d - 1),
        ];
        let tensors = proptest::collection::vec((chunk_counts, proptest::bool::weighted(0.2)), 0..12);
        proptest!(|(tensors in tensors)| {
            let (chunks, fallback): (Vec<u64>, Vec<bool>) = tensors.into_iter().unzip();
            let fold = fold_groups(&chunks, &fallback);
            prop_assert_eq!(fold.len(), chunks.len());
            let parts = by_fold(0..chunks.len(), |&t| fold[t]);
            // The parts partition the tensors, each in order and holding its fold's tensors.
            let mut all: Vec<usize> = parts.concat();
            all.sort_unstable();
            prop_assert_eq!(all, (0..chunks.len()).collect::<Vec<_>>());
            for (part, want) in parts.iter().zip([Fold::First, Fold::Early, Fold::Late]) {
                prop_assert!(part.windows(2).all(|p| p[0] < p[1]));
                prop_assert!(part.iter().all(|&t| fold[t] == want));
            }
            for t in 0..chunks.len() {
                prop_assert_eq!(fold[t] == Fold::Late, chunks[t] < EARLY_FOLD_CHUNKS || fallback[t]);
            }
            let sorted = |part: &[usize]| {
                let mut c: Vec<u64> = part.iter().map(|&t| chunks[t]).collect();
                c.sort_unstable_by(|a, b| b.cmp(a));
                c
            };
            let (first, early) = (sorted(&parts[0]), sorted(&parts[1]));
            let no_gap = |c: &[u64]| c.windows(2).all(|p| p[0] < 2 * p[1]);
            if first.is_empty() {
                prop_assert!(no_gap(&early), "{:?}", chunks);
            } else {
                // The first twofold gap lies between the first and the early tensors.
                prop_assert!(!early.is_empty() && first[first.len() - 1] >= 2 * early[0], "{:?}", chunks);
                prop_assert!(no_gap(&first), "{:?}", chunks);
            }
        });
    }

    #[test]
    fn prop_prefix_sums_and_slots_agree() {
        use proptest::prelude::*;
        let lens = proptest::collection::vec(tensor_bytes(), 0..30);
        proptest!(|(lens in lens, unit in prop_oneof![Just(CHUNK), 1u64..5000])| {
            let (start, total) = prefix(lens.iter().copied(), unit);
            prop_assert_eq!(start.len(), lens.len() + 1);
            prop_assert_eq!(start[0], 0);
            prop_assert_eq!(start[lens.len()], total);
            for (i, len) in lens.iter().enumerate() {
                prop_assert_eq!(start[i + 1] - start[i], len.div_ceil(unit));
            }
            prop_assert_eq!(total, lens.iter().map(|l| l.div_ceil(unit)).sum::<u64>());
            if unit == CHUNK {
                for slot in (0..total).step_by((total / 64).max(1) as usize).chain(total.checked_sub(1)) {
                    let t = tensor_of(&start, slot).unwrap();
                    prop_assert!(start[t] <= slot && slot < start[t + 1], "slot {} in {:?}", slot, start);
                }
                let past = ScheduleError::SlotPastChunks { slot: total, chunks: total };
                prop_assert_eq!(tensor_of(&start, total), Err(past));
            }
        });
    }

    #[test]
    fn prop_a_wave_splits_its_runs_and_tensors_by_their_tensors_folds() {
        use proptest::prelude::*;
        let wave = (
            proptest::collection::vec(tensor_bytes(), 0..10),
            proptest::collection::vec(any::<u64>(), 0..40),
            any::<u64>(),
        );
        proptest!(|((bytes, picks, fallback) in wave)| {
            let (start, chunks) = prefix(bytes.iter().copied(), CHUNK);
            // Runs at slots anywhere in the wave, tagged with their place in the list.
            let runs: Vec<(usize, u64)> =
                if chunks == 0 { vec![] } else { picks.iter().map(|p| p % chunks).enumerate().collect() };
            let fallback_slots: Vec<u64> =
                runs.iter().filter(|r| (fallback >> (r.0 % 64)) & 1 == 1).map(|r| r.1).collect();
            let folds = WaveFolds::new(&bytes, fallback_slots.iter().copied()).unwrap();
            prop_assert_eq!((folds.tensor_start(), folds.chunks()), (start.as_slice(), chunks));
            let tensor_chunks: Vec<u64> = start.windows(2).map(|w| w[1] - w[0]).collect();
            let has_fallback: Vec<bool> =
                (0..bytes.len()).map(|t| fallback_slots.iter().any(|&s| tensor_of(&start, s) == Ok(t))).collect();
            prop_assert_eq!(folds.folds().to_vec(), fold_groups(&tensor_chunks, &has_fallback));
            let parts = folds.split(runs.iter().copied(), |r| r.1).unwrap();
            let mut all: Vec<usize> = parts.iter().flatten().map(|r| r.0).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..runs.len()).collect::<Vec<_>>());
            let tensors = folds.tensors();
            for (k, want) in [Fold::First, Fold::Early, Fold::Late].into_iter().enumerate() {
                prop_assert!(parts[k].windows(2).all(|p| p[0].0 < p[1].0));
                prop_assert!(parts[k].iter().all(|r| folds.folds()[tensor_of(&start, r.1).unwrap()] == want));
                prop_assert!(tensors[k].windows(2).all(|p| p[0] < p[1]));
                prop_assert!(tensors[k].iter().all(|&t| folds.folds()[t as usize] == want));
            }
            prop_assert_eq!(tensors.iter().map(Vec::len).sum::<usize>(), bytes.len());
            // A slot past the wave is an error, not a panic.
            let past = folds.split([chunks], |&s| s).unwrap_err();
            prop_assert_eq!(past, ScheduleError::SlotPastChunks { slot: chunks, chunks });
            let past_fallback = WaveFolds::new(&bytes, [chunks]).unwrap_err();
            prop_assert_eq!(past_fallback, ScheduleError::SlotPastChunks { slot: chunks, chunks });
        });
    }

    #[test]
    fn prop_update_order_is_the_waves_in_turn_and_a_permutation() {
        use proptest::prelude::*;
        let update = (0usize..30).prop_flat_map(|n| {
            (Just((0..n).collect::<Vec<usize>>()).prop_shuffle(), proptest::collection::vec(0..=n, 0..6))
        });
        proptest!(|((tensors, cuts) in update, again: bool, past in 0usize..40, which: proptest::sample::Index)| {
            let n = tensors.len();
            let mut points = cuts.clone();
            points.extend([0, n]);
            points.sort_unstable();
            let mut waves: Vec<Vec<usize>> = points.windows(2).map(|p| tensors[p[0]..p[1]].to_vec()).collect();
            let order_of = |waves: &[Vec<usize>]| {
                let sizes: Vec<Vec<u64>> = waves.iter().map(|w| vec![1; w.len()]).collect();
                update_order(waves.iter().map(Vec::as_slice).zip(sizes.iter().map(Vec::as_slice)))
            };
            let order = order_of(&waves).unwrap();
            prop_assert_eq!(&order, &tensors);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            // One tensor listed again, or one index past the update (n + 1 tensors with it):
            // an error naming it. Index n itself would make a valid update of n + 1.
            let last = waves.len() - 1;
            let (wrong, expected) = if n > 0 && again {
                let t = tensors[which.index(n)];
                (t, ScheduleError::ListedTwice { tensor: t, wave: last })
            } else {
                let t = n + 1 + past;
                (t, ScheduleError::PastTheTensors { wave: last, tensor: t, tensors: n + 1 })
            };
            waves[last].push(wrong);
            let err = order_of(&waves).unwrap_err();
            prop_assert_eq!(err, expected);
        });
    }
}
