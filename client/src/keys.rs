//! The contributor key: the BIP340 key that signs a contributor's registration, licences,
//! revocations and login answers.
//!
//! It is 32 random bytes stored as one line of hex in a file created with mode 0600 and
//! written crash-safely (temp file, fsync, hard link into place, fsync the directory, as
//! LDK's `fs_store` does), so a crash never leaves a half-written key and an existing key is
//! never replaced. On load, a file that group or others can read or write is refused: a
//! readable key lets anyone sign licences as this contributor, a writable one lets anyone
//! swap it. The file format and its I/O are the daemon's `keys` module's (its provider key
//! file).

use bitcoin::secp256k1::{Keypair, SecretKey};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tribute_channels::PublicKey;
pub use tribute_daemon::keys::KeyError as FileError;
use tribute_daemon::keys::{self, create_key_file, io_error, malformed, read_key_file};

/// File name of the contributor key inside the contributor's home directory.
pub const CONTRIBUTOR_KEY_FILE: &str = "contributor.key";

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
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
    /// The file or directory is unreadable, accessible to others, or malformed.
    #[error(transparent)]
    File(#[from] FileError),
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
            Err(e) => return Err(io_error(path, e).into()),
        };
        let bytes = read_key_file(path, file, &is_secret_key)?;
        Self::from_secret(path, &bytes)
    }

    /// Creates a fresh random key at `path` (mode 0600); [`KeyError::Exists`] if a file is
    /// already there.
    pub fn create(path: &Path) -> Result<Self, KeyError> {
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists { path: path.to_owned() });
        }
        let bytes = keys::random_bytes(&is_secret_key)?;
        match create_key_file(path, &bytes) {
            Ok(()) => Self::from_secret(path, &bytes),
            Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                Err(KeyError::Exists { path: path.to_owned() })
            }
            Err(e) => Err(e.into()),
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
        return Err(malformed(dir, "not a directory").into());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(FileError::Permissions { path: dir.to_owned(), mode }.into());
    }
    Ok(())
}

fn is_secret_key(bytes: &[u8; 32]) -> bool {
    SecretKey::from_slice(bytes).is_ok()
}

/// 32 fresh random bytes (BIP340 auxiliary randomness, request nonces).
pub fn random_bytes() -> Result<[u8; 32], KeyError> {
    Ok(keys::random_bytes(&|_| true)?)
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
            assert!(matches!(err, KeyError::File(FileError::Malformed { .. })), "{err}");
        }
    }

    #[test]
    fn private_dir_is_0700_and_world_writable_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a").join("home");
        prepare_private_dir(&home).unwrap();
        assert_eq!(mode(&home), 0o700);
        fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            prepare_private_dir(&home),
            Err(KeyError::File(FileError::Permissions { .. }))
        ));
    }
}
