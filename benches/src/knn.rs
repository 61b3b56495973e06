//! `--knn`: the KNN-Shapley valuator (`tribute provider evaluate knn-shapley`) on synthetic
//! embeddings: N training × m test points of `dim` float32 dimensions, written as `.npy`
//! in memory and run through the same path as the CLI (parse, hash, value, record), once
//! per thread count. Method and figures: docs/PERFORMANCE.md, "KNN-Shapley valuator".

use crate::BenchError;
use std::path::Path;
use std::time::Instant;
use tribute_client::valuation::input::InputFile;
use tribute_client::valuation::npy;
use tribute_client::valuation::{evaluate, EvaluationParams, Inputs};

/// Sizes and K.
pub struct KnnBench {
    /// Training points.
    pub train: usize,
    /// Test points.
    pub test: usize,
    /// Dimensions.
    pub dim: usize,
    /// K.
    pub k: usize,
    /// Datasets (training point i is in dataset i mod datasets).
    pub datasets: usize,
    /// Thread counts to run with, in order.
    pub threads: Vec<usize>,
}

/// xorshift64*: a fixed, seeded stream (no dependency, same data every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const CLASSES: u64 = 10;

/// Points around one centre per class (noise of the centres' scale) and labels, 10% of
/// them flipped: neighbours mostly agree, as in embeddings of a real labelled set.
fn points(rng: &mut Rng, centres: &[Vec<f32>], n: usize) -> (Vec<u8>, Vec<u8>) {
    let dim = centres[0].len();
    let mut data = Vec::with_capacity(n * dim * 4);
    let mut labels = Vec::with_capacity(n * 8);
    for _ in 0..n {
        let class = rng.next() % CLASSES;
        for c in &centres[class as usize] {
            data.extend_from_slice(&(c + 0.8 * rng.unit()).to_le_bytes());
        }
        let label = if rng.next() % 10 == 0 { rng.next() % CLASSES } else { class };
        labels.extend_from_slice(&(label as i64).to_le_bytes());
    }
    (npy::write(&[n, dim], "<f4", &data), npy::write(&[n], "<i8", &labels))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user + system) of this whole process, ended threads included.
fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After `(comm)`: state is field 3, utime 14, stime 15 (1-based over the line).
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// Runs the bench and prints one line per thread count.
pub fn run(b: &KnnBench) -> Result<(), BenchError> {
    let mut rng = Rng(0x7269_6275_7465_6b6e);
    let centres: Vec<Vec<f32>> =
        (0..CLASSES).map(|_| (0..b.dim).map(|_| rng.unit()).collect()).collect();
    let generated = Instant::now();
    let (train, train_labels) = points(&mut rng, &centres, b.train);
    let (test, test_labels) = points(&mut rng, &centres, b.test);
    let datasets: String =
        (0..b.train).map(|i| format!("{:064x}\n", i % b.datasets.max(1) + 1)).collect();
    let inputs = Inputs {
        train_embeddings: InputFile::from_bytes(Path::new("train.npy"), train),
        train_labels: InputFile::from_bytes(Path::new("train_labels.npy"), train_labels),
        train_datasets: InputFile::from_bytes(
            Path::new("train_datasets.txt"),
            datasets.into_bytes(),
        ),
        test_embeddings: InputFile::from_bytes(Path::new("test.npy"), test),
        test_labels: InputFile::from_bytes(Path::new("test_labels.npy"), test_labels),
    };
    println!(
        "knn-shapley: {} training × {} test points, {} dims (float32), K = {}, {} datasets; \
         inputs generated in {:.1} s ({:.0} MiB of .npy); load {}",
        b.train,
        b.test,
        b.dim,
        b.k,
        b.datasets,
        generated.elapsed().as_secs_f64(),
        (inputs.train_embeddings.bytes.len() + inputs.test_embeddings.bytes.len()) as f64
            / (1 << 20) as f64,
        crate::load_average()
    );
    let mut first: Option<tribute_client::valuation::EvaluationRecord> = None;
    for &threads in &b.threads {
        let params = EvaluationParams {
            model_id: "bench".into(),
            attribution_version: 1,
            benchmark_id: "synthetic".into(),
            k: b.k,
            threads,
        };
        let load = crate::load_average();
        let machine = crate::cpu::snapshot();
        let cpu_before = process_cpu_secs();
        let started = Instant::now();
        let e = evaluate(&inputs, &params, &|_| {}).map_err(|e| BenchError::msg(e.to_string()))?;
        let secs = started.elapsed().as_secs_f64();
        let cpu_secs = process_cpu_secs() - cpu_before;
        let busy = machine.until(&crate::cpu::snapshot()).machine_busy;
        let r = &e.result;
        let sum: f64 = r.values.iter().sum();
        if (sum - r.full_score).abs() > 1e-9 {
            return Err(BenchError::msg(format!("Σ values {sum} ≠ U(all) {}", r.full_score)));
        }
        // Bit-identical records whatever the thread count.
        match &first {
            None => first = Some(e.record.clone()),
            Some(f) if *f != e.record => {
                return Err(BenchError::msg(format!("{threads} threads changed the record")))
            }
            Some(_) => {}
        }
        let pairs = (b.train as f64) * (b.test as f64);
        println!(
            "  {threads} thread(s): {secs:.2} s wall, {:.0} test points/s, {:.2e} (train, test) \
             pairs/s; process CPU {cpu_secs:.2} s ({:.2e} pairs per CPU-second); thread time in \
             distances {:.2} s, ordering {:.2} s, recursion {:.2} s; U(all) {:.4}; peak RSS \
             {:.0} MiB; machine busy {:.0}%; load before {load}",
            b.test as f64 / secs,
            pairs / secs,
            pairs / cpu_secs,
            r.phases.distance.as_secs_f64(),
            r.phases.rank.as_secs_f64(),
            r.phases.recursion.as_secs_f64(),
            r.full_score,
            peak_rss_mib(),
            busy * 100.0
        );
    }
    Ok(())
}
