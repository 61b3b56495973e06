//! Key material in the data directory: the provider's state-signing key and the settlement
//! secret.
//!
//! Both are 32 random bytes stored as one line of hex in a file of their own, created with
//! mode 0600 and written crash-safely (temp file, fsync, link into place, fsync the
//! directory, as LDK's `fs_store` does), so a crash never leaves a half-written key. On load
//! a file that group or others can read or write is refused: a readable key lets anyone sign
//! channel states (or derive keysend preimages) as this provider, and a writable one lets
//! anyone swap it.
//!
//! The state-signing key is not the Lightning node key (DESIGN.md, "Channel state").

use ldk_node::bitcoin::secp256k1::{Keypair, SecretKey};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode bits that must be clear on a key file: every permission for group and others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Longest key file accepted, in bytes: 64 hex digits, a newline and some slack. Bounds the
/// read so a wrong path (a log file, a device) fails fast instead of filling memory.
const MAX_KEY_FILE_BYTES: u64 = 256;

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

/// Loads the provider's state-signing key pair from `path`, creating a fresh random key
/// there (mode 0600) if the file does not exist.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, KeyError> {
    let bytes = load_or_create(path, &|b| SecretKey::from_slice(b).is_ok())?;
    let secret = SecretKey::from_slice(&bytes).map_err(|_| KeyError::Malformed {
        path: path.to_owned(),
        reason: "not a valid secp256k1 secret key",
    })?;
    Ok(Keypair::from_secret_key(tribute_channels::sign::secp(), &secret))
}

/// Loads the settlement secret (the HMAC key keysend preimages are derived from) from
/// `path`, creating 32 fresh random bytes there (mode 0600) if the file does not exist.
pub fn load_or_create_secret(path: &Path) -> Result<[u8; 32], KeyError> {
    load_or_create(path, &|_| true)
}

/// Loads 32 bytes from `path`, or creates them. `valid` says whether random bytes are
/// acceptable (a secp256k1 secret key must be below the curve order).
fn load_or_create(path: &Path, valid: &dyn Fn(&[u8; 32]) -> bool) -> Result<[u8; 32], KeyError> {
    match File::open(path) {
        Ok(file) => read_key_file(path, file, valid),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let bytes = random_bytes(valid)?;
            match create_key_file(path, &bytes) {
                Ok(()) => Ok(bytes),
                // Another process created it between our open and our link: use theirs, so
                // both agree on one key.
                Err(KeyError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    let file = File::open(path).map_err(|source| io_error(path, source))?;
                    read_key_file(path, file, valid)
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(io_error(path, e)),
    }
}

/// Reads the 32 bytes of an open key file at `path`: refused if group or others may access
/// it, if it is not a regular file, or if it is not one line of 64 hex digits that `valid`
/// accepts. (Also the client's contributor key file.)
pub fn read_key_file(
    path: &Path,
    file: File,
    valid: &dyn Fn(&[u8; 32]) -> bool,
) -> Result<[u8; 32], KeyError> {
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
    if !valid(&bytes) {
        return Err(malformed(path, "not a valid secp256k1 secret key"));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` so that `path` either does not exist or holds the whole key,
/// whatever happens: write a temp file (mode 0600), fsync it, hard-link it into place,
/// remove the temp name, fsync the directory. A hard link rather than a rename because a
/// link never replaces an existing file: losing a provider key that channels were signed
/// with is worse than failing.
pub fn create_key_file(path: &Path, bytes: &[u8; 32]) -> Result<(), KeyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name =
        path.file_name().ok_or_else(|| malformed(path, "path names no file"))?.to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);

    // A temp file left by a crash may have any mode; `mode()` only applies to new files.
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

/// 32 bytes from the OS generator that `valid` accepts (`|_| true`: any). For a secret key the chance of a
/// retry is about 2^-128, so the bound is never reached unless the generator is broken.
pub fn random_bytes(valid: &dyn Fn(&[u8; 32]) -> bool) -> Result<[u8; 32], KeyError> {
    for _ in 0..8 {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        if valid(&bytes) {
            return Ok(bytes);
        }
    }
    Err(KeyError::Random("the generator keeps returning invalid keys".into()))
}

/// An I/O error on `path`.
pub fn io_error(path: &Path, source: io::Error) -> KeyError {
    KeyError::Io { path: path.to_owned(), source }
}

/// `path` is not what it should be.
pub fn malformed(path: &Path, reason: &'static str) -> KeyError {
    KeyError::Malformed { path: path.to_owned(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keypair_is_created_0600_and_reloads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.key");
        let created = load_or_create_keypair(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!dir.path().join("provider.key.tmp").exists(), "temp copy removed");
        let reloaded = load_or_create_keypair(&path).unwrap();
        assert_eq!(created.secret_bytes(), reloaded.secret_bytes());
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", hex::encode(created.secret_bytes())));
    }

    #[test]
    fn secret_is_created_0600_and_reloads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settlement.secret");
        let created = load_or_create_secret(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), created);
        let other = load_or_create_secret(&dir.path().join("other.secret")).unwrap();
        assert_ne!(created, other, "fresh randomness per file");
    }

    #[test]
    fn readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.key");
        load_or_create_keypair(&path).unwrap();
        for bad in [0o644, 0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = load_or_create_keypair(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { mode, .. } if mode == bad), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        load_or_create_keypair(&path).unwrap();
    }

    #[test]
    fn malformed_files_are_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.key");
        for (content, _why) in [
            ("", "empty"),
            ("abcd\n", "short"),
            (&"zz".repeat(32)[..], "not hex"),
            (&"00".repeat(32)[..], "zero is not a secret key"),
            (&"ff".repeat(32)[..], "above the curve order"),
        ] {
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create_keypair(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), content, "left untouched");
        }
        // Any 32 bytes are a valid settlement secret.
        fs::write(&path, "00".repeat(32)).unwrap();
        assert_eq!(load_or_create_secret(&path).unwrap(), [0u8; 32]);
    }

    #[test]
    fn stale_temp_file_does_not_leak_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("provider.key.tmp");
        fs::write(&tmp, "junk").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).unwrap();
        let path = dir.path().join("provider.key");
        load_or_create_keypair(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn missing_directory_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("provider.key");
        let err = load_or_create_keypair(&path).unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }), "{err}");
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
