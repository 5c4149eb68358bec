//! The ACME store: one directory (a Docker volume in deployments) that survives restarts and
//! can be shared by several agents.
//!
//! ```text
//! <dir>/accounts/<directory-url>.json   account key and URL, one per CA directory
//! <dir>/certs/<name>.crt, <name>.key    as nginx-proxy names them (watched by the resolver)
//! <dir>/locks/<name>.lock               held (flock) while an agent orders <name>
//! <dir>/challenges/<token>              HTTP-01 answers, for agents sharing the directory
//! <dir>/bad/<file>.<unix time>          corrupt files, set aside
//! ```
//!
//! Every file is `0600` and written atomically (temporary file, fsync, rename, fsync of the
//! directory). Locks are `flock`s: the kernel drops them when the holder dies.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::tls::{load_pair, LoadedPair};

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

/// What the store holds for a certificate name.
#[derive(Debug)]
pub enum Stored {
    Missing,
    Usable(LoadedPair),
    /// Present but unusable (unreadable, not PEM, key and certificate that do not match).
    Corrupt(crate::tls::PairError),
}

impl Store {
    /// Opens (creating if needed) the store at `dir`, and removes temporary files an agent
    /// that died mid-write left behind.
    pub fn open(dir: &Path) -> io::Result<Self> {
        for sub in ["accounts", "certs", "locks", "challenges", "bad"] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join(sub))?;
        }
        let store = Self { dir: dir.to_owned() };
        for sub in ["accounts", "certs"] {
            for entry in std::fs::read_dir(store.dir.join(sub))?.flatten() {
                if entry.file_name().to_string_lossy().contains(".tmp.") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(store)
    }

    #[must_use]
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    #[must_use]
    pub fn challenges_dir(&self) -> PathBuf {
        self.dir.join("challenges")
    }

    /// The names obtained on demand (kept renewed though no route names them), one a line.
    #[must_use]
    pub fn on_demand_names(&self) -> std::collections::BTreeSet<String> {
        std::fs::read_to_string(self.dir.join("on-demand"))
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Adds `name` to [`Store::on_demand_names`].
    pub fn add_on_demand(&self, name: &str) -> io::Result<()> {
        let mut names = self.on_demand_names();
        names.insert(name.to_owned());
        let text = names.iter().fold(String::new(), |text, n| text + n + "\n");
        write_atomic(&self.dir.join("on-demand"), text.as_bytes())
    }

    fn account_path(&self, directory_url: &str) -> PathBuf {
        let file: String = directory_url
            .trim_start_matches("https://")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        self.dir.join("accounts").join(format!("{file}.json"))
    }

    /// The stored account for a CA directory. A corrupt file is set aside (and reported as
    /// an error once): a new account is then created.
    pub fn load_account(
        &self,
        directory_url: &str,
    ) -> Result<Option<instant_acme::AccountCredentials>, String> {
        let path = self.account_path(directory_url);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        match serde_json::from_str(&text) {
            Ok(creds) => Ok(Some(creds)),
            Err(e) => {
                let moved = self.set_aside(&path);
                Err(format!(
                    "{} is not a valid account file ({e}); set aside as {}",
                    path.display(),
                    moved.display()
                ))
            }
        }
    }

    /// Moves the account file of `directory_url` to `bad/`; returns where, if there was one.
    #[must_use]
    pub fn set_aside_account(&self, directory_url: &str) -> Option<PathBuf> {
        let path = self.account_path(directory_url);
        path.exists().then(|| self.set_aside(&path))
    }

    pub fn save_account(
        &self,
        directory_url: &str,
        creds: &instant_acme::AccountCredentials,
    ) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(creds).map_err(io::Error::other)?;
        write_atomic(&self.account_path(directory_url), &json)
    }

    /// The certificate stored under `name`.
    #[must_use]
    pub fn load_cert(&self, name: &str) -> Stored {
        let crt = self.certs_dir().join(format!("{name}.crt"));
        let key = self.certs_dir().join(format!("{name}.key"));
        if !crt.exists() && !key.exists() {
            return Stored::Missing;
        }
        match load_pair(&crt, &key) {
            Ok(pair) => Stored::Usable(pair),
            Err(e) => Stored::Corrupt(e),
        }
    }

    /// Moves `name`'s certificate and key to `bad/`; returns where they went.
    #[must_use]
    pub fn set_aside_cert(&self, name: &str) -> Vec<PathBuf> {
        ["crt", "key"]
            .iter()
            .map(|ext| self.certs_dir().join(format!("{name}.{ext}")))
            .filter(|p| p.exists())
            .map(|p| self.set_aside(&p))
            .collect()
    }

    fn set_aside(&self, path: &Path) -> PathBuf {
        let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let to = self
            .dir
            .join("bad")
            .join(format!("{}.{stamp}", path.file_name().unwrap_or_default().to_string_lossy()));
        if let Err(e) = std::fs::rename(path, &to) {
            tracing::warn!(path = %path.display(), "acme: cannot set the file aside: {e}");
        }
        to
    }

    /// Writes a certificate chain and its key. Both are written in full (and synced) before
    /// either replaces its predecessor, so a full disk leaves the old pair whole; then the key
    /// goes first: a reader that catches the pair in between sees a mismatch and keeps
    /// serving the previous pair.
    pub fn write_cert(&self, name: &str, chain_pem: &str, key_pem: &str) -> io::Result<()> {
        let key = self.certs_dir().join(format!("{name}.key"));
        let crt = self.certs_dir().join(format!("{name}.crt"));
        let key_tmp = write_temporary(&key, key_pem.as_bytes())?;
        let crt_tmp = match write_temporary(&crt, chain_pem.as_bytes()) {
            Ok(tmp) => tmp,
            Err(e) => {
                let _ = std::fs::remove_file(&key_tmp);
                return Err(e);
            }
        };
        std::fs::rename(&key_tmp, &key)?;
        std::fs::rename(&crt_tmp, &crt)?;
        sync_dir(&crt)
    }

    /// Takes the lock that says "this agent is ordering `name`". `None`: another agent
    /// (alive) holds it. Released when the returned file is dropped or the process dies.
    pub fn try_lock(&self, name: &str) -> io::Result<Option<File>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join("locks").join(format!("{name}.lock")))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part:
/// a `0600` temporary file beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_temporary(path, bytes)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Writes `bytes` in full to a temporary file beside `path` and syncs it; on failure (a full
/// disk) nothing is left behind.
fn write_temporary(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = path.with_file_name(format!(
        "{}.tmp.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let written = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()));
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::acme::test_pem_pair as pem_pair;

    #[test]
    fn certificates_are_private_atomic_and_corrupt_ones_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/x.crt.tmp.99"), "left by a dead agent").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("certs/x.crt.tmp.99").exists());
        assert!(matches!(store.load_cert("a.test"), Stored::Missing));

        let (crt, key) = pem_pair(&["a.test", "www.a.test"]);
        store.write_cert("a.test", &crt, &key).unwrap();
        let mode = std::fs::metadata(dir.path().join("certs/a.test.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let Stored::Usable(pair) = store.load_cert("a.test") else { panic!("usable") };
        assert_eq!(pair.info.dns_names, ["a.test", "www.a.test"]);

        std::fs::write(dir.path().join("certs/a.test.crt"), "garbage").unwrap();
        assert!(matches!(store.load_cert("a.test"), Stored::Corrupt(_)));
        let moved = store.set_aside_cert("a.test");
        assert_eq!(moved.len(), 2);
        assert!(moved.iter().all(|p| p.starts_with(dir.path().join("bad"))));
        assert!(matches!(store.load_cert("a.test"), Stored::Missing));
    }

    #[test]
    fn a_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = store.try_lock("a.test").unwrap().expect("free");
        assert!(store.try_lock("a.test").unwrap().is_none(), "a second holder is refused");
        assert!(store.try_lock("b.test").unwrap().is_some(), "other names are independent");
        drop(held);
        assert!(store.try_lock("a.test").unwrap().is_some());
    }

    #[test]
    fn a_corrupt_account_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let url = "https://ca.test:14000/dir";
        assert!(store.load_account(url).unwrap().is_none());
        std::fs::write(store.account_path(url), "{not json").unwrap();
        let Err(err) = store.load_account(url) else { panic!("a corrupt account file is an error") };
        assert!(err.contains("set aside"), "{err}");
        assert!(store.load_account(url).unwrap().is_none());
    }
}
