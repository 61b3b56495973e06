//! Dataset manifests: the deterministic list of a dataset's files and their SHA-256, whose
//! own SHA-256 is the dataset hash a licence names.
//!
//! The format (documented with a reproducing shell pipeline in `docs/MANIFEST.md`): one
//! line per regular file, `<64 lower-case hex digits of its SHA-256><two spaces><path>\n`,
//! where the path is relative to the dataset directory, uses `/` between components, and
//! the lines are sorted by path bytewise (`LC_ALL=C sort`), each path once. That is exactly
//! what `sha256sum` prints for files named in that order.
//!
//! What is refused rather than defined, so the tool and the pipeline can never disagree:
//! symbolic links and special files inside the dataset, names that are not UTF-8, names
//! with control characters or a backslash (`sha256sum` escapes those), a top-level file
//! named `-` (`sha256sum` reads standard input for it), and a dataset with no files. Empty
//! directories contribute nothing: the manifest covers file contents and paths only.

use bitcoin::hashes::{sha256, Hash, HashEngine};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use tribute_channels::DatasetHash;

/// Most files a dataset may hold (bounds memory and the manifest's size).
pub const MAX_FILES: usize = 10_000_000;
/// Longest manifest file accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 30;
/// Deepest directory nesting followed.
pub const MAX_DEPTH: usize = 256;
const READ_BUFFER_BYTES: usize = 1 << 20;

/// Why a dataset or a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A symbolic link inside the dataset.
    #[error("{}: symbolic links are not allowed in a dataset (copy the target in, or remove the link)", path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A FIFO, socket or device inside the dataset.
    #[error("{}: only regular files and directories are allowed in a dataset", path.display())]
    SpecialFile {
        /// The file.
        path: PathBuf,
    },
    /// A name the format cannot carry unambiguously.
    #[error("{}: {reason}; rename it", path.display())]
    UnsupportedName {
        /// The file (lossily displayed).
        path: PathBuf,
        /// What is wrong with the name.
        reason: &'static str,
    },
    /// No regular file at all.
    #[error("{}: the dataset has no files", path.display())]
    Empty {
        /// The dataset directory.
        path: PathBuf,
    },
    /// Past [`MAX_FILES`] or [`MAX_DEPTH`].
    #[error("{}: dataset too large: {what}", path.display())]
    TooLarge {
        /// Where the bound was hit.
        path: PathBuf,
        /// Which bound.
        what: &'static str,
    },
    /// A file changed size while it was hashed.
    #[error("{}: the file changed while it was hashed; hash again once the dataset is stable", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A manifest file does not follow the format.
    #[error("manifest line {line}: {reason}")]
    BadManifest {
        /// 1-based line number (0 for the whole file).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Path relative to the dataset directory, `/`-separated.
    pub path: String,
    /// SHA-256 of the file's contents.
    pub sha256: [u8; 32],
}

/// A dataset manifest: entries sorted bytewise by path, each path once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<ManifestEntry>,
}

/// Progress reports while a dataset is scanned and hashed.
pub trait Progress {
    /// The scan found every file: `files` of `bytes` in total.
    fn scanned(&mut self, files: u64, bytes: u64);
    /// `bytes` more were hashed.
    fn hashed(&mut self, bytes: u64);
    /// Done (or failed).
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn scanned(&mut self, _: u64, _: u64) {}
    fn hashed(&mut self, _: u64) {}
}

impl Manifest {
    /// Scans `dir` and hashes every file. `dir` itself may be reached through a symbolic
    /// link (it is what the caller named); nothing inside it may be one.
    pub fn build(dir: &Path, progress: &mut dyn Progress) -> Result<Manifest, ManifestError> {
        let files = scan(dir)?;
        let total_bytes = files.iter().map(|f| f.len).sum();
        progress.scanned(files.len() as u64, total_bytes);
        let mut entries = Vec::with_capacity(files.len());
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        let result = (|| {
            for f in files {
                let full = dir.join(&f.path);
                let sha256 = hash_file(&full, f.len, &mut buf, progress)?;
                entries.push(ManifestEntry { path: f.path, sha256 });
            }
            Ok::<_, ManifestError>(())
        })();
        progress.finish();
        result?;
        Ok(Manifest { entries })
    }

    /// Parses a manifest file strictly: every line well formed, paths valid, sorted and
    /// unique, a final newline, at least one entry. A manifest that parses re-encodes to
    /// exactly the same bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let bad = |line: usize, reason: &str| ManifestError::BadManifest {
            line,
            reason: reason.to_owned(),
        };
        if bytes.is_empty() {
            return Err(bad(0, "empty manifest (a dataset needs at least one file)"));
        }
        if bytes.last() != Some(&b'\n') {
            return Err(bad(0, "the last line must end with a newline (LF)"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad(0, "not UTF-8"))?;
        let mut entries: Vec<ManifestEntry> = Vec::new();
        for (i, line) in text[..text.len() - 1].split('\n').enumerate() {
            let n = i + 1;
            let (hash_hex, path) = line
                .split_once("  ")
                .ok_or_else(|| bad(n, "expected `<sha256 hex>  <path>` (two spaces)"))?;
            if hash_hex.len() != 64
                || !hash_hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(bad(n, "the hash must be 64 lower-case hex digits"));
            }
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(hash_hex, &mut sha256).map_err(|_| bad(n, "bad hex"))?;
            check_relative_path(path).map_err(|reason| bad(n, reason))?;
            if let Some(prev) = entries.last() {
                if prev.path.as_bytes() >= path.as_bytes() {
                    return Err(bad(n, "paths must be sorted bytewise (LC_ALL=C) and unique"));
                }
            }
            if entries.len() >= MAX_FILES {
                return Err(bad(n, "too many files"));
            }
            entries.push(ManifestEntry { path: path.to_owned(), sha256 });
        }
        Ok(Manifest { entries })
    }

    /// Reads and parses the manifest file at `path`.
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let io = |source| ManifestError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { path: path.to_owned(), what: "manifest file" });
        }
        Manifest::parse(&bytes)
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// The canonical bytes: what `sha256sum` prints for the files in path order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.iter().map(|e| e.path.len() + 67).sum());
        for e in &self.entries {
            out.extend_from_slice(hex::encode(e.sha256).as_bytes());
            out.extend_from_slice(b"  ");
            out.extend_from_slice(e.path.as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// SHA-256 of the canonical bytes: the dataset hash a licence names.
    pub fn dataset_hash(&self) -> DatasetHash {
        DatasetHash(sha256::Hash::hash(&self.to_bytes()).to_byte_array())
    }
}

struct FoundFile {
    path: String,
    len: u64,
}

/// Every regular file under `root`, with its relative path, sorted bytewise by path.
fn scan(root: &Path) -> Result<Vec<FoundFile>, ManifestError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ManifestError::Io { path, source }
    };
    let meta = fs::metadata(root).map_err(io(root))?;
    if !meta.is_dir() {
        return Err(ManifestError::SpecialFile { path: root.to_owned() });
    }
    let mut files = Vec::new();
    // (directory relative path with a trailing `/` or empty, depth)
    let mut stack: Vec<(String, usize)> = vec![(String::new(), 0)];
    while let Some((rel_dir, depth)) = stack.pop() {
        let dir = root.join(&rel_dir);
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let full = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| ManifestError::UnsupportedName {
                path: full.clone(),
                reason: "the name is not valid UTF-8",
            })?;
            check_name(name)
                .map_err(|reason| ManifestError::UnsupportedName { path: full.clone(), reason })?;
            let rel = format!("{rel_dir}{name}");
            let kind = entry.file_type().map_err(io(&full))?;
            if kind.is_symlink() {
                return Err(ManifestError::Symlink { path: full });
            } else if kind.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    return Err(ManifestError::TooLarge {
                        path: full,
                        what: "directories nested too deep",
                    });
                }
                stack.push((format!("{rel}/"), depth + 1));
            } else if kind.is_file() {
                if rel == "-" {
                    return Err(ManifestError::UnsupportedName {
                        path: full,
                        reason: "a top-level file may not be named `-` (sha256sum reads standard input for it)",
                    });
                }
                if files.len() >= MAX_FILES {
                    return Err(ManifestError::TooLarge {
                        path: root.to_owned(),
                        what: "too many files",
                    });
                }
                let len = entry.metadata().map_err(io(&full))?.len();
                files.push(FoundFile { path: rel, len });
            } else {
                return Err(ManifestError::SpecialFile { path: full });
            }
        }
    }
    if files.is_empty() {
        return Err(ManifestError::Empty { path: root.to_owned() });
    }
    files.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(files)
}

/// One path component as the format allows it.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("empty, `.` or `..` path component");
    }
    if name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("the name contains a control character (newline, tab, …)");
    }
    if name.contains('\\') {
        return Err("the name contains a backslash (sha256sum would escape it)");
    }
    if name.contains('/') {
        return Err("the name contains `/`");
    }
    Ok(())
}

fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path == "-" {
        return Err("a top-level file may not be named `-`");
    }
    if path.starts_with('/') {
        return Err("paths must be relative");
    }
    path.split('/').try_for_each(check_name)
}

fn hash_file(
    path: &Path,
    expected_len: u64,
    buf: &mut [u8],
    progress: &mut dyn Progress,
) -> Result<[u8; 32], ManifestError> {
    let io = |source| ManifestError::Io { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(io)?;
    let mut engine = sha256::Hash::engine();
    let mut total = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        engine.input(&buf[..n]);
        total += n as u64;
        progress.hashed(n as u64);
    }
    if total != expected_len {
        return Err(ManifestError::Changed { path: path.to_owned() });
    }
    Ok(sha256::Hash::from_engine(engine).to_byte_array())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, b: u8) -> String {
        format!("{}  {path}\n", hex::encode([b; 32]))
    }

    #[test]
    fn parse_round_trips_and_is_strict() {
        let good = format!("{}{}{}", entry("a.txt", 1), entry("a/b", 2), entry("b", 3));
        let m = Manifest::parse(good.as_bytes()).unwrap();
        assert_eq!(m.to_bytes(), good.as_bytes());
        assert_eq!(m.entries().len(), 3);
        let cases = [
            ("", "empty"),
            (&good[..good.len() - 1], "no final newline"),
            (&format!("{}{}", entry("b", 1), entry("a", 2)), "unsorted"),
            (&format!("{}{}", entry("a", 1), entry("a", 2)), "duplicate"),
            (&entry("/etc/passwd", 1), "absolute"),
            (&entry("a/../b", 1), "dot-dot"),
            (&entry("a//b", 1), "empty component"),
            (&entry("-", 1), "dash"),
            (&entry("a\\b", 1), "backslash"),
            (&entry("a\tb", 1), "control"),
            (&entry("x", 0xab).to_uppercase(), "upper-case hex"),
            (&entry("x", 1).replacen("  ", " ", 1), "one space"),
            (&format!("{}\n", entry("x", 1)), "blank line"),
        ];
        for (text, why) in cases {
            assert!(Manifest::parse(text.as_bytes()).is_err(), "{why} must be refused");
        }
    }

    #[test]
    fn empty_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(matches!(
            Manifest::build(dir.path(), &mut NoProgress),
            Err(ManifestError::Empty { .. })
        ));
    }
}
