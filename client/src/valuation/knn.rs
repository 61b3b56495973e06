//! Exact KNN-Shapley values: the closed-form recursion of Jia et al. 2019 ("Efficient
//! task-specific data valuation for nearest neighbor algorithms", Theorem 1).
//!
//! The utility of a set `S` of training points, for one test point `(t, y)`, is
//!
//! ```text
//! U_t(S) = (1/K) · #{ k ≤ min(K, |S|) : the k-th nearest point of S to t has label y },  U_t(∅) = 0
//! ```
//!
//! (squared Euclidean distance; equal distances are ordered by training row, the lower row
//! nearer), and `U(S)` is its mean over the test points. With training points sorted by
//! distance to `t` (`α_1` nearest … `α_N` farthest) and `a_i = 1[label(α_i) = y]`:
//!
//! ```text
//! s_N = a_N · min(K, N) / (K · N)                 (= a_N / N when N ≥ K, the paper's case)
//! s_i = s_{i+1} + (a_i − a_{i+1}) / K · min(K, i) / i
//! ```
//!
//! is the exact Shapley value of `α_i` for `U_t`; a point's value is its mean over the test
//! points, and by efficiency the values sum to `U(all) − U(∅) = U(all)`.
//!
//! Determinism: a run's result is bit-identical whatever the thread count or schedule.
//! The recursion runs in fixed point (2^-80, `i128`): its constants `1 / max(K, i)` and
//! `min(K, N) / (K · N)` are each rounded once (so an `s_i` is off by at most `N · 2^-81`),
//! and every sum over test points is an exact integer addition, in any order. The per-test-point dataset sums behind the confidence
//! intervals are likewise summed exactly (their squares too, and the variance is taken in
//! 256-bit integers).

use ethnum::I256;
use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most training points (ranks are `u32` in the sort keys).
pub const MAX_TRAIN_POINTS: usize = 1 << 31;
/// Most test points: with `|s_i| ≤ 2/i`, every exact sum below stays inside `i128`.
pub const MAX_TEST_POINTS: usize = 1 << 31;
/// Test points per tile: the distance loop streams the training matrix once per tile.
const TILE_TEST_POINTS: usize = 8;
/// Fixed point of the per-test-point values: 2^-80.
const FIXED_SHIFT: u32 = 80;
/// Fixed point of the per-test-point dataset sums in the variance: 2^-40.
const MOMENT_SHIFT: u32 = 40;

/// Why a valuation cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnnError {
    /// The inputs do not fit together or are out of range; the message says which.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> KnnError {
    KnnError::Invalid(msg.into())
}

/// A floating-point element of an embedding matrix (`f32` or `f64`).
pub trait Element:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
{
    /// Whether the value is neither NaN nor infinite.
    fn is_finite(self) -> bool;
    /// Orders training rows by `(dist[row], row)` into `order`. `dist` holds squared
    /// distances (finite or `+inf`, never NaN, never negative).
    fn rank(dist: &[Self], order: &mut Vec<u32>, scratch: &mut RankScratch);
}

/// Buffers reused between test points by [`Element::rank`].
#[derive(Default)]
pub struct RankScratch {
    keys: Vec<u64>,
    tmp: Vec<u64>,
    pairs: Vec<(u64, u32)>,
}

impl Element for f32 {
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }

    /// Keys `bits(dist) << 32 | row`, stably radix-sorted on the upper 32 bits: the keys
    /// start in row order, so equal distances stay in row order. The bits of a
    /// non-negative `f32` order like its value.
    fn rank(dist: &[f32], order: &mut Vec<u32>, s: &mut RankScratch) {
        s.keys.clear();
        s.keys.extend(
            dist.iter().enumerate().map(|(row, d)| (u64::from(d.to_bits()) << 32) | row as u64),
        );
        radix_sort_upper32(&mut s.keys, &mut s.tmp);
        order.clear();
        order.extend(s.keys.iter().map(|k| *k as u32));
    }
}

impl Element for f64 {
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }

    fn rank(dist: &[f64], order: &mut Vec<u32>, s: &mut RankScratch) {
        s.pairs.clear();
        s.pairs.extend(dist.iter().enumerate().map(|(row, d)| (d.to_bits(), row as u32)));
        s.pairs.sort_unstable();
        order.clear();
        order.extend(s.pairs.iter().map(|p| p.1));
    }
}

/// Stable LSD radix sort of `keys` by bits 32..64, 11 bits per pass; a pass whose digit
/// is the same in every key is skipped (distances of one scale share their exponent).
fn radix_sort_upper32(keys: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    const BITS: u32 = 11;
    const BUCKETS: usize = 1 << BITS;
    let mut counts = [[0usize; BUCKETS]; 3];
    for k in keys.iter() {
        for (p, c) in counts.iter_mut().enumerate() {
            c[((k >> (32 + BITS * p as u32)) as usize) & (BUCKETS - 1)] += 1;
        }
    }
    tmp.clear();
    tmp.resize(keys.len(), 0);
    for (p, c) in counts.iter().enumerate() {
        if c.contains(&keys.len()) {
            continue;
        }
        let mut offsets = [0usize; BUCKETS];
        let mut sum = 0;
        for (o, n) in offsets.iter_mut().zip(c.iter()) {
            *o = sum;
            sum += n;
        }
        let shift = 32 + BITS * p as u32;
        for &k in keys.iter() {
            let b = ((k >> shift) as usize) & (BUCKETS - 1);
            tmp[offsets[b]] = k;
            offsets[b] += 1;
        }
        std::mem::swap(keys, tmp);
    }
}

/// Squared Euclidean distance, in eight independent lanes so that the compiler vectorises
/// it without reordering any floating-point sum; the lanes are then added in a fixed order.
#[inline]
pub fn squared_distance<T: Element>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::default(); 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            let d = *x - *y;
            *acc = *acc + d * d;
        }
    }
    let mut tail = T::default();
    for (x, y) in ra.iter().zip(rb) {
        let d = *x - *y;
        tail = tail + d * d;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// A dense row-major matrix: one embedding per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T> {
    rows: usize,
    cols: usize,
    data: Vec<T>,
}

impl<T: Element> Matrix<T> {
    /// A `rows × cols` matrix over `data` (row-major). Refuses a shape that does not match
    /// the data, zero columns, and any NaN or infinite element (naming its row).
    pub fn new(rows: usize, cols: usize, data: Vec<T>) -> Result<Self, KnnError> {
        if cols == 0 {
            return Err(invalid("embeddings have no columns"));
        }
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(invalid(format!(
                "{} values do not make {rows} rows of {cols} columns",
                data.len()
            )));
        }
        if let Some(p) = data.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "row {} (0-based), column {}: not a finite number",
                p / cols,
                p % cols
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the embedding dimension).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }
}

impl Matrix<f32> {
    /// The same matrix in `f64` (exact).
    pub fn to_f64(&self) -> Matrix<f64> {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|v| f64::from(*v)).collect(),
        }
    }
}

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct KnnOptions {
    /// K of the K-nearest-neighbour utility (≥ 1; K > N is allowed).
    pub k: usize,
    /// Worker threads (≥ 1). The result does not depend on it.
    pub threads: usize,
}

/// The training side: embeddings, labels, and the group (dataset) of each row.
#[derive(Debug, Clone, Copy)]
pub struct TrainSet<'a, T> {
    /// One embedding per training point.
    pub embeddings: &'a Matrix<T>,
    /// One label per training point.
    pub labels: &'a [i64],
    /// The group (dataset index, `< groups`) of each training point.
    pub group_of: &'a [u32],
    /// How many groups.
    pub groups: usize,
}

/// The test side (the benchmark).
#[derive(Debug, Clone, Copy)]
pub struct TestSet<'a, T> {
    /// One embedding per test point.
    pub embeddings: &'a Matrix<T>,
    /// One label per test point.
    pub labels: &'a [i64],
}

/// One group's score: the sum of its points' values, with a 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupScore {
    /// Σ of the group's points' values = the mean over test points of the per-test-point
    /// group sum. This is the dataset's score.
    pub value: f64,
    /// Sample standard deviation of the per-test-point group sums.
    pub sd: f64,
    /// `value − 1.96 · sd / √m`.
    pub ci_low: f64,
    /// `value + 1.96 · sd / √m`.
    pub ci_high: f64,
    /// `m`, the test points.
    pub samples: u64,
}

/// CPU time per phase, summed over threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Distances.
    pub distance: Duration,
    /// Ordering training points by distance.
    pub rank: Duration,
    /// The recursion and the accumulation.
    pub recursion: Duration,
}

/// The result of [`knn_shapley`].
#[derive(Debug, Clone, PartialEq)]
pub struct KnnShapley {
    /// K.
    pub k: usize,
    /// Test points (`m`).
    pub test_points: usize,
    /// The Shapley value of each training point (row order): the mean over test points.
    pub values: Vec<f64>,
    /// `U(all)`: the full training set's K-nearest-neighbour utility (the model's score).
    pub full_score: f64,
    /// Per group (index order).
    pub groups: Vec<GroupScore>,
    /// Where the time went.
    pub phases: PhaseTimes,
}

/// The recursion's constants in fixed point (2^-80), each rounded once:
/// `by_rank[r] = 1 / max(K, r + 1)` and `last = min(K, N) / (K · N)`.
struct Steps {
    by_rank: Vec<i128>,
    last: i128,
}

impl Steps {
    fn new(k: usize, n: usize) -> Steps {
        let one = 1u128 << FIXED_SHIFT;
        let div = |num: u128, den: u128| ((num + den / 2) / den) as i128;
        Steps {
            by_rank: (1..=n).map(|i| div(one, k.max(i) as u128)).collect(),
            last: div(k.min(n) as u128 * one, k as u128 * n as u128),
        }
    }
}

/// What one worker accumulates; merged by exact addition.
struct Partial {
    value_fixed: Vec<i128>,
    group_s1: Vec<i128>,
    group_s2: Vec<i128>,
    group_sum: Vec<i128>,
    correct: u64,
    phases: PhaseTimes,
}

/// Exact KNN-Shapley values of every training point, per-group sums with 95% intervals
/// over the test points, and `U(all)`. `progress` is called with the number of test
/// points finished since its last call (from worker threads).
pub fn knn_shapley<T: Element>(
    train: TrainSet<'_, T>,
    test: TestSet<'_, T>,
    options: KnnOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<KnnShapley, KnnError> {
    let n = train.embeddings.rows();
    let m = test.embeddings.rows();
    let k = options.k;
    if k == 0 {
        return Err(invalid("K must be at least 1"));
    }
    if n == 0 {
        return Err(invalid("no training points"));
    }
    if n > MAX_TRAIN_POINTS {
        return Err(invalid(format!("{n} training points; at most {MAX_TRAIN_POINTS}")));
    }
    if m < 2 {
        return Err(invalid(format!(
            "{m} test point(s): at least 2 are needed for a confidence interval"
        )));
    }
    if m > MAX_TEST_POINTS {
        return Err(invalid(format!("{m} test points; at most {MAX_TEST_POINTS}")));
    }
    if train.embeddings.cols() != test.embeddings.cols() {
        return Err(invalid(format!(
            "training embeddings have {} columns, test embeddings {}",
            train.embeddings.cols(),
            test.embeddings.cols()
        )));
    }
    if train.labels.len() != n {
        return Err(invalid(format!(
            "{} training labels for {n} training points",
            train.labels.len()
        )));
    }
    if train.group_of.len() != n {
        return Err(invalid(format!(
            "{} dataset rows for {n} training points",
            train.group_of.len()
        )));
    }
    if let Some(row) = train.group_of.iter().position(|g| *g as usize >= train.groups) {
        return Err(invalid(format!("training row {row}: group out of range")));
    }
    if test.labels.len() != m {
        return Err(invalid(format!("{} test labels for {m} test points", test.labels.len())));
    }

    let threads = options.threads.clamp(1, m.div_ceil(TILE_TEST_POINTS));
    let tiles = m.div_ceil(TILE_TEST_POINTS);
    let next_tile = AtomicUsize::new(0);
    let steps = Steps::new(k, n);
    let merged: Mutex<Option<Partial>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let part = worker(&train, &test, k, &steps, &next_tile, tiles, progress);
                // A poisoned lock means another worker panicked; the scope re-raises it.
                if let Ok(mut slot) = merged.lock() {
                    *slot = Some(match slot.take() {
                        None => part,
                        Some(acc) => merge(acc, part),
                    });
                }
            });
        }
    });
    let total = merged.into_inner().ok().flatten().ok_or_else(|| invalid("no worker finished"))?;

    let m_f = m as f64;
    let scale = (1u128 << FIXED_SHIFT) as f64;
    let values: Vec<f64> = total.value_fixed.iter().map(|v| *v as f64 / scale / m_f).collect();
    let mut group_fixed = vec![0i128; train.groups];
    for (v, g) in total.value_fixed.iter().zip(train.group_of) {
        group_fixed[*g as usize] += *v;
    }
    debug_assert_eq!(group_fixed, total.group_sum);
    let moment_scale = (1u64 << MOMENT_SHIFT) as f64;
    let m_i = I256::from(m as u64);
    let groups = (0..train.groups)
        .map(|g| {
            let value = group_fixed[g] as f64 / scale / m_f;
            // m (m−1) · var = m · Σ V² − (Σ V)², exact in 256 bits, never negative.
            let s1 = I256::from(total.group_s1[g]);
            let s2 = I256::from(total.group_s2[g]);
            let num = (m_i * s2 - s1 * s1).max(I256::ZERO);
            let var = num.as_f64() / (m_f * (m_f - 1.0));
            let sd = var.sqrt() / moment_scale;
            let half = 1.96 * sd / m_f.sqrt();
            GroupScore { value, sd, ci_low: value - half, ci_high: value + half, samples: m as u64 }
        })
        .collect();
    let full_score = total.correct as f64 / (k as f64 * m_f);
    Ok(KnnShapley { k, test_points: m, values, full_score, groups, phases: total.phases })
}

fn merge(mut a: Partial, b: Partial) -> Partial {
    for (x, y) in a.value_fixed.iter_mut().zip(&b.value_fixed) {
        *x += *y;
    }
    for (x, y) in a.group_s1.iter_mut().zip(&b.group_s1) {
        *x += *y;
    }
    for (x, y) in a.group_s2.iter_mut().zip(&b.group_s2) {
        *x += *y;
    }
    for (x, y) in a.group_sum.iter_mut().zip(&b.group_sum) {
        *x += *y;
    }
    a.correct += b.correct;
    a.phases.distance += b.phases.distance;
    a.phases.rank += b.phases.rank;
    a.phases.recursion += b.phases.recursion;
    a
}

fn worker<T: Element>(
    train: &TrainSet<'_, T>,
    test: &TestSet<'_, T>,
    k: usize,
    steps: &Steps,
    next_tile: &AtomicUsize,
    tiles: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Partial {
    let n = train.embeddings.rows();
    let m = test.embeddings.rows();
    let groups = train.groups;
    let mut part = Partial {
        value_fixed: vec![0; n],
        group_s1: vec![0; groups],
        group_s2: vec![0; groups],
        group_sum: vec![0; groups],
        correct: 0,
        phases: PhaseTimes::default(),
    };
    let mut dist = vec![T::default(); TILE_TEST_POINTS * n];
    let mut order: Vec<u32> = Vec::with_capacity(n);
    let mut scratch = RankScratch::default();
    let mut group_now = vec![0i128; groups];
    loop {
        let tile = next_tile.fetch_add(1, Ordering::Relaxed);
        if tile >= tiles {
            break;
        }
        let first = tile * TILE_TEST_POINTS;
        let count = TILE_TEST_POINTS.min(m - first);
        let started = Instant::now();
        // One pass over the training matrix per tile: each training row is compared with
        // the tile's test points while it is in L1.
        for i in 0..n {
            let x = train.embeddings.row(i);
            for b in 0..count {
                dist[b * n + i] = squared_distance(x, test.embeddings.row(first + b));
            }
        }
        part.phases.distance += started.elapsed();
        for b in 0..count {
            let y = test.labels[first + b];
            let started = Instant::now();
            T::rank(&dist[b * n..(b + 1) * n], &mut order, &mut scratch);
            let ranked = Instant::now();
            part.phases.rank += ranked - started;

            let hit = |r: usize| train.labels[order[r] as usize] == y;
            part.correct += (0..k.min(n)).filter(|&r| hit(r)).count() as u64;
            group_now.iter_mut().for_each(|g| *g = 0);
            let mut add = |row: u32, s: i128| {
                part.value_fixed[row as usize] += s;
                group_now[train.group_of[row as usize] as usize] += s;
            };
            let mut next_hit = hit(n - 1);
            let mut s = if next_hit { steps.last } else { 0 };
            add(order[n - 1], s);
            for r in (0..n - 1).rev() {
                // Rank i = r + 1 (1-based): s_i = s_{i+1} + (a_i − a_{i+1}) / max(K, i).
                let this_hit = hit(r);
                if this_hit != next_hit {
                    s += if this_hit { steps.by_rank[r] } else { -steps.by_rank[r] };
                }
                add(order[r], s);
                next_hit = this_hit;
            }
            for (g, now) in group_now.iter().enumerate() {
                part.group_sum[g] += *now;
                // Round to 2^-40 (half up) for the second moment.
                let v = (*now + (1i128 << (FIXED_SHIFT - MOMENT_SHIFT - 1)))
                    >> (FIXED_SHIFT - MOMENT_SHIFT);
                part.group_s1[g] += v;
                part.group_s2[g] += v * v;
            }
            part.phases.recursion += ranked.elapsed();
        }
        progress(count);
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_order_is_distance_then_row() {
        let dist = [3.0f32, 1.0, 3.0, 0.0, 1.0, 1e30, 0.5];
        let mut order = Vec::new();
        f32::rank(&dist, &mut order, &mut RankScratch::default());
        assert_eq!(order, vec![3, 6, 1, 4, 0, 2, 5]);
        let dist64: Vec<f64> = dist.iter().map(|d| f64::from(*d)).collect();
        let mut order64 = Vec::new();
        f64::rank(&dist64, &mut order64, &mut RankScratch::default());
        assert_eq!(order64, order);
    }

    #[test]
    fn radix_sort_matches_a_comparison_sort_on_spread_distances() {
        // Distances spanning many exponents exercise every pass.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let dist: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let e = (x % 60) as i32 - 30;
                ((x >> 20) % 7) as f32 * 2f32.powi(e)
            })
            .collect();
        let mut order = Vec::new();
        f32::rank(&dist, &mut order, &mut RankScratch::default());
        let mut want: Vec<u32> = (0..dist.len() as u32).collect();
        want.sort_by(|a, b| dist[*a as usize].total_cmp(&dist[*b as usize]).then(a.cmp(b)));
        assert_eq!(order, want);
    }

    #[test]
    fn squared_distance_matches_the_plain_sum_on_integers() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..19).map(|i| (i * i % 7) as f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert_eq!(squared_distance(&a, &b), want);
    }

    #[test]
    fn a_non_finite_element_is_refused_with_its_row() {
        let e = Matrix::new(2, 2, vec![0.0f32, 1.0, f32::NAN, 2.0]).expect_err("NaN");
        assert_eq!(e.to_string(), "row 1 (0-based), column 0: not a finite number");
        assert!(Matrix::new(2, 2, vec![0.0f64; 3]).is_err());
    }
}
