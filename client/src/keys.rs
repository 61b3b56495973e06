//! The contributor key: the BIP340 key that signs a contributor's registration, licences,
//! revocations and login answers.
//!
//! It is 32 random bytes stored as one line of hex in a file created with mode 0600 and
//! written crash-safely (temp file, fsync, hard link into place, fsync the directory, as
//! LDK's `fs_store` does), so a crash never leaves a half-written key and an existing key is
//! never replaced. On load, a file that group or others can read or write is refused: a
//! readable key lets anyone sign licences as this contributor, a writable one lets anyone
//! swap it. The format and rules are the daemon's `keys` module's (its provider key file);
//! they are repeated here so the client does not link the daemon.

use bitcoin::secp256k1::{Keypair, SecretKey};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tribute_channels::PublicKey;

/// Mode bits that must be clear on a key file: every permission for group and others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Longest key file accepted, in bytes: 64 hex digits, a newline and some slack.
const MAX_KEY_FILE_BYTES: u64 = 256;

/// File name of the contributor key inside the contributor's home directory.
pub const CONTRIBUTOR_KEY_FILE: &str = "contributor.key";

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, writing or syncing the file failed.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file (or its directory).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No key file: the contributor has not run `tribute contributor init`.
    #[error("no contributor key at {}: run `tribute contributor init` first", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A key already exists where a new one was to be created.
    #[error("a key already exists at {}: refusing to replace it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file is accessible to group or others.
    #[error(
        "key file {} has mode {mode:03o}: it must not be readable or writable by group or \
         others; fix it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a valid key.
    #[error("key file {} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness available: {0}")]
    Random(String),
}

/// A loaded contributor key.
#[derive(Clone)]
pub struct ContributorKey {
    keypair: Keypair,
    public: PublicKey,
}

impl std::fmt::Debug for ContributorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContributorKey({})", self.public)
    }
}

impl ContributorKey {
    /// The key pair with this secret.
    pub fn from_keypair(keypair: Keypair) -> Self {
        let public = PublicKey::from(keypair.x_only_public_key().0);
        ContributorKey { keypair, public }
    }

    /// The signing key pair.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The contributor's identity.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Loads the key at `path`; [`KeyError::Missing`] if there is none.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::Missing { path: path.to_owned() })
            }
            Err(e) => return Err(io_error(path, e)),
        };
        let bytes = read_key_file(path, file)?;
        Self::from_secret(path, &bytes)
    }

    /// Creates a fresh random key at `path` (mode 0600); [`KeyError::Exists`] if a file is
    /// already there.
    pub fn create(path: &Path) -> Result<Self, KeyError> {
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists { path: path.to_owned() });
        }
        let bytes = random_secret()?;
        match create_key_file(path, &bytes) {
            Ok(()) => Self::from_secret(path, &bytes),
            Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                Err(KeyError::Exists { path: path.to_owned() })
            }
            Err(e) => Err(e),
        }
    }

    fn from_secret(path: &Path, bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let secret = SecretKey::from_slice(bytes)
            .map_err(|_| malformed(path, "not a valid secp256k1 secret key"))?;
        Ok(Self::from_keypair(Keypair::from_secret_key(tribute_channels::sign::secp(), &secret)))
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist; refuses a directory
/// that group or others can write.
pub fn prepare_private_dir(dir: &Path) -> Result<(), KeyError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(dir, e))?;
    }
    let meta = fs::metadata(dir).map_err(|e| io_error(dir, e))?;
    if !meta.is_dir() {
        return Err(malformed(dir, "not a directory"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(KeyError::Permissions { path: dir.to_owned(), mode });
    }
    Ok(())
}

fn read_key_file(path: &Path, file: File) -> Result<[u8; 32], KeyError> {
    // Checked on the open handle, not the path, so the file checked is the file read.
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyError::Permissions { path: path.to_owned(), mode });
    }
    if !meta.is_file() {
        return Err(malformed(path, "not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES).read_to_string(&mut text).map_err(|e| io_error(path, e))?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim_end(), &mut bytes)
        .map_err(|_| malformed(path, "expected one line of 64 hex digits"))?;
    Ok(bytes)
}

/// Writes the key so that `path` either does not exist or holds the whole key: temp file
/// (0600), fsync, hard link (never replaces an existing file), remove temp, fsync dir.
fn create_key_file(path: &Path, bytes: &[u8; 32]) -> Result<(), KeyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name =
        path.file_name().ok_or_else(|| malformed(path, "path names no file"))?.to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&tmp, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_error(&tmp, e))?;
    let mut line = hex::encode(bytes);
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(|e| io_error(&tmp, e))?;
    file.sync_all().map_err(|e| io_error(&tmp, e))?;
    drop(file);
    let linked = fs::hard_link(&tmp, path).map_err(|e| io_error(path, e));
    // Remove the temp name whether or not the link worked: it holds a copy of the secret.
    let removed = fs::remove_file(&tmp).map_err(|e| io_error(&tmp, e));
    linked?;
    removed?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

/// 32 random bytes that are a valid secret key (a retry has probability ~2^-128).
fn random_secret() -> Result<[u8; 32], KeyError> {
    for _ in 0..8 {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        if SecretKey::from_slice(&bytes).is_ok() {
            return Ok(bytes);
        }
    }
    Err(KeyError::Random("the generator keeps returning invalid keys".into()))
}

/// 32 fresh random bytes (BIP340 auxiliary randomness, request nonces).
pub fn random_bytes() -> Result<[u8; 32], KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(bytes)
}

fn io_error(path: &Path, source: io::Error) -> KeyError {
    KeyError::Io { path: path.to_owned(), source }
}

fn malformed(path: &Path, reason: &'static str) -> KeyError {
    KeyError::Malformed { path: path.to_owned(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_0600_reloads_the_same_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTRIBUTOR_KEY_FILE);
        assert!(matches!(ContributorKey::load(&path), Err(KeyError::Missing { .. })));
        let created = ContributorKey::create(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!dir.path().join("contributor.key.tmp").exists());
        assert_eq!(ContributorKey::load(&path).unwrap().public(), created.public());
        assert!(matches!(ContributorKey::create(&path), Err(KeyError::Exists { .. })));
        assert_eq!(ContributorKey::load(&path).unwrap().public(), created.public());
    }

    #[test]
    fn readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTRIBUTOR_KEY_FILE);
        ContributorKey::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ContributorKey::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTRIBUTOR_KEY_FILE);
        for content in ["", "abcd\n", &"zz".repeat(32), &"00".repeat(32), &"ff".repeat(32)] {
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = ContributorKey::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
        }
    }

    #[test]
    fn private_dir_is_0700_and_world_writable_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a").join("home");
        prepare_private_dir(&home).unwrap();
        assert_eq!(mode(&home), 0o700);
        fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(prepare_private_dir(&home), Err(KeyError::Permissions { .. })));
    }
}
