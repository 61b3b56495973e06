//! Reading the valuator's input files. A file that starts with the `.npy` magic is read as
//! NumPy (see [`super::npy`]), anything else as CSV without a header row:
//!
//! - embeddings: a 2-D float32 or float64 array, or CSV with one row of numbers per point
//!   (all rows the same length);
//! - labels: a 1-D (or `n × 1`) integer array, or CSV with one integer per line;
//! - datasets: text, one dataset hash (64 hex digits) per line, line `i` naming the dataset
//!   of training row `i`.
//!
//! Every error names the file and, where one is at fault, the row: `line N` (1-based) in
//! text files, `row N (0-based)` in `.npy` files.

use super::knn::Matrix;
use super::npy::{Dtype, Npy};
use super::ValuationError;
use bitcoin::hashes::{sha256, Hash};
use std::path::{Path, PathBuf};
use tribute_channels::DatasetHash;

/// A whole input file, kept with its SHA-256 (the bytes hashed are the bytes parsed).
#[derive(Debug, Clone)]
pub struct InputFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its content.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    pub sha256: [u8; 32],
}

impl InputFile {
    /// Reads `path` whole.
    pub fn read(path: &Path) -> Result<InputFile, ValuationError> {
        let bytes = std::fs::read(path).map_err(|e| input_error(path, e.to_string()))?;
        Ok(InputFile::from_bytes(path, bytes))
    }

    /// An input file from bytes already in memory (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> InputFile {
        let sha256 = sha256::Hash::hash(&bytes).to_byte_array();
        InputFile { path: path.to_owned(), bytes, sha256 }
    }

    fn is_npy(&self) -> bool {
        self.bytes.starts_with(b"\x93NUMPY")
    }

    fn error(&self, detail: impl Into<String>) -> ValuationError {
        input_error(&self.path, detail)
    }

    fn npy(&self) -> Result<Npy<'_>, ValuationError> {
        Npy::parse(&self.bytes).map_err(|e| self.error(e))
    }

    fn text(&self) -> Result<&str, ValuationError> {
        let text = std::str::from_utf8(&self.bytes).map_err(|e| {
            self.error(format!("not a .npy file and not UTF-8 text (byte {})", e.valid_up_to()))
        })?;
        if text.trim().is_empty() {
            return Err(self.error("empty file"));
        }
        Ok(text)
    }
}

fn input_error(path: &Path, detail: impl Into<String>) -> ValuationError {
    ValuationError::Input { path: path.display().to_string(), detail: detail.into() }
}

/// Embeddings as read: `f32` from a float32 `.npy`, `f64` from float64 or CSV.
#[derive(Debug, Clone, PartialEq)]
pub enum Embeddings {
    /// float32
    F32(Matrix<f32>),
    /// float64
    F64(Matrix<f64>),
}

impl Embeddings {
    /// Rows.
    pub fn rows(&self) -> usize {
        match self {
            Embeddings::F32(m) => m.rows(),
            Embeddings::F64(m) => m.rows(),
        }
    }

    /// The same values in `f64` (exact).
    pub fn into_f64(self) -> Matrix<f64> {
        match self {
            Embeddings::F32(m) => m.to_f64(),
            Embeddings::F64(m) => m,
        }
    }
}

/// Reads an embeddings file.
pub fn embeddings(file: &InputFile) -> Result<Embeddings, ValuationError> {
    if file.is_npy() {
        let npy = file.npy()?;
        let &[rows, cols] = npy.shape.as_slice() else {
            return Err(file.error(format!(
                "embeddings must be a 2-D array (points × dimensions); this one has shape {:?}",
                npy.shape
            )));
        };
        let matrix = match npy.dtype {
            Dtype::F32 => npy.f32s().map(|d| Matrix::new(rows, cols, d).map(Embeddings::F32)),
            Dtype::F64 => npy.f64s().map(|d| Matrix::new(rows, cols, d).map(Embeddings::F64)),
            Dtype::Int(_) | Dtype::Uint(_) => None,
        };
        let matrix = matrix.ok_or_else(|| {
            file.error(format!("embeddings must be float32 or float64, not {:?}", npy.dtype))
        })?;
        let matrix = matrix.map_err(|e| file.error(e.to_string()))?;
        if matrix.rows() == 0 {
            return Err(file.error("no rows"));
        }
        return Ok(matrix);
    }
    let mut data = Vec::new();
    let mut cols = 0;
    let mut rows = 0;
    for_each_csv_row(file, |line, fields| {
        if rows == 0 {
            cols = fields.len();
        } else if fields.len() != cols {
            return Err(file.error(format!(
                "line {line}: {} columns, the first row has {cols}",
                fields.len()
            )));
        }
        for (c, f) in fields.iter().enumerate() {
            let v: f64 = f.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                let hint = if rows == 0 { " (CSV files here have no header row)" } else { "" };
                file.error(format!(
                    "line {line}, column {}: {f:?} is not a finite number{hint}",
                    c + 1
                ))
            })?;
            data.push(v);
        }
        rows += 1;
        Ok(())
    })?;
    Matrix::new(rows, cols, data).map(Embeddings::F64).map_err(|e| file.error(e.to_string()))
}

/// Reads a labels file.
pub fn labels(file: &InputFile) -> Result<Vec<i64>, ValuationError> {
    if file.is_npy() {
        let npy = file.npy()?;
        let one_column = matches!(npy.shape.as_slice(), [_] | [_, 1]);
        if !one_column {
            return Err(file.error(format!(
                "labels must be a 1-D array (or one column); this one has shape {:?}",
                npy.shape
            )));
        }
        let labels = npy
            .i64s()
            .ok_or_else(|| file.error(format!("labels must be integers, not {:?}", npy.dtype)))?
            .map_err(|row| file.error(format!("row {row} (0-based): above the largest i64")))?;
        if labels.is_empty() {
            return Err(file.error("no rows"));
        }
        return Ok(labels);
    }
    let mut labels = Vec::new();
    for_each_csv_row(file, |line, fields| {
        if fields.len() != 1 {
            return Err(file.error(format!(
                "line {line}: {} columns; a labels file has one integer per line",
                fields.len()
            )));
        }
        let v: i64 = fields[0].parse().map_err(|_| {
            file.error(format!("line {line}: {:?} is not an integer label", &fields[0]))
        })?;
        labels.push(v);
        Ok(())
    })?;
    Ok(labels)
}

/// Reads a datasets file: one dataset hash (64 hex digits) per line.
pub fn datasets(file: &InputFile) -> Result<Vec<DatasetHash>, ValuationError> {
    if file.is_npy() {
        return Err(file.error("a datasets file is text: one dataset hash (64 hex) per line"));
    }
    let text = file.text()?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let hex = line.trim().to_ascii_lowercase();
        let hash = DatasetHash::from_hex(&hex).map_err(|_| {
            file.error(format!(
                "line {}: {:?} is not a dataset hash (64 hex digits, one per training point)",
                i + 1,
                line.trim()
            ))
        })?;
        out.push(hash);
    }
    Ok(out)
}

/// Calls `f` with each CSV record of a file (fields trimmed) and its 1-based line.
fn for_each_csv_row(
    file: &InputFile,
    mut f: impl FnMut(u64, &csv::StringRecord) -> Result<(), ValuationError>,
) -> Result<(), ValuationError> {
    let text = file.text()?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => f(record.position().map(|p| p.line()).unwrap_or(0), &record)?,
            Err(e) => {
                let line = e.position().map(|p| format!("line {}: ", p.line())).unwrap_or_default();
                return Err(file.error(format!("{line}{e}")));
            }
        }
    }
}
